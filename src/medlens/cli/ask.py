"""``medlens ask`` (run a task on your files), ``medlens parse`` (parse output made elsewhere), ``medlens tasks``.

The task-specific options of ``ask`` (``--overlay``, ``--dpi`` ...) are those the tasks declare
(:attr:`medlens.tasks.Task.options`): a new task with a new setting gets its flag without changes here.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from medlens import DISCLAIMER
from medlens.cli.options import (
    OUTPUT,
    STUDY,
    ModelChoice,
    OptionGroup,
    Output,
    StudyChoice,
    model_group,
    option,
    print_json,
    slide_group,
    uses,
)
from medlens.errors import MedlensError

if TYPE_CHECKING:
    from medlens.prep.slide_recipe import SlideOptions
    from medlens.tasks import Task, TaskOption

MODEL_HELP = "test-tiny, gemma-3-270m, a local model folder, a .gguf file, a cached HF id, or ENGINE:MODEL@URL."


@functools.cache
def declared_task_options() -> dict[str, tuple[TaskOption, tuple[str, ...]]]:
    """Every option a task declares, with the tasks that declare it (one declaration per name)."""
    from medlens.tasks import TASKS, task_class

    found: dict[str, tuple[TaskOption, tuple[str, ...]]] = {}
    for name in TASKS:
        for decl in task_class(name).options:
            known, users = found.get(decl.name, (decl, ()))
            if known != decl:
                raise ValueError(f"tasks declare the option {decl.name!r} differently")
            found[decl.name] = (decl, (*users, name))
    return found


def task_option_group() -> OptionGroup:
    """One flag per option any task declares, unset (None) unless given; the command receives
    ``{name: value}`` and the task's own default applies to what was not given."""
    params = []
    for decl, users in declared_task_options().values():
        shown = f" (default {decl.default})" if decl.default is not None else ""
        bounds = {k: v for k, v in (("min", decl.min), ("max", decl.max)) if v is not None}
        text = f"{', '.join(users)}: {decl.help}{shown}"
        params.append(option(decl.name, decl.type | None, None, help=text, panel="Task options", **bounds))
    return OptionGroup("task_values", tuple(params), lambda **values: values)


def task_settings(task: Task, values: dict[str, Any]) -> dict[str, Any]:
    """The :class:`~medlens.tasks.TaskOptions` keywords of the options given for the task; an option of
    another task is an error (it would be silently ignored)."""
    from medlens.tasks import TaskOptions

    own = {decl.name for decl in task.options}
    declared = declared_task_options()
    fields: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            continue
        if name not in own:
            flag = "--" + name.replace("_", "-")
            raise MedlensError(f"{flag} is an option of {', '.join(declared[name][1])}, not of task {task.name}")
        (fields if name in TaskOptions.__dataclass_fields__ else extra)[name] = value
    return {**fields, "extra": extra} if extra else fields


def _task_help() -> str:
    from medlens.tasks import TASKS

    return f"{', '.join(TASKS)} (see `medlens tasks`)."


@uses(model_group("test-tiny", MODEL_HELP), STUDY, task_option_group(), slide_group(prompt=True), OUTPUT)
def ask(
    args: Annotated[
        list[str],
        typer.Argument(
            help="Input(s) then the question: INPUT [INPUT2] QUESTION. Tasks with a default prompt "
            "(localize, lab-extract, report ...) need no question.",
            metavar="INPUT... [QUESTION]",
        ),
    ],
    task: Annotated[str, typer.Option("--task", "-t", help=_task_help())] = "qa",
    instruction: Annotated[str | None, typer.Option(help="Replace the text placed before the images.")] = None,
    think: Annotated[bool, typer.Option("--think", help="Switch on MedGemma's thinking mode.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on generated tokens.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="json, or a task's own format (csv for lab-extract).")] = "json",
    *,
    model: ModelChoice,
    study: StudyChoice,
    task_values: dict[str, Any],
    slide: SlideOptions,
    output: Output,
) -> None:
    """Run a task on your files with MedGemma; prints the result envelope as JSON (or --format)."""
    from medlens.api import ask as ask_api
    from medlens.tasks import get_task

    chosen = get_task(task)
    settings = task_settings(chosen, task_values)
    inputs, question = split_inputs(args)
    result = ask_api(
        inputs,
        question,
        model.name or "test-tiny",
        task=task,
        engine=model.engine,
        reporter=output.reporter,
        device=model.device,
        dtype=model.dtype,
        model_args=model.args,
        recipe=study.recipe,
        series=study.series,
        modality=study.modality,
        instruction=instruction,
        thinking=think,
        max_new_tokens=max_new_tokens,
        slide=slide,
        **settings,
    )
    emit(chosen, result, fmt, output)


def parse(
    task: Annotated[str, typer.Argument(help="Task whose parser to use.")],
    image_size: Annotated[
        str | None, typer.Option(help="localize: WxH of the original image, for pixel boxes.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or a task's own format.")] = "json",
) -> None:
    """Parse a model's raw output (stdin) with a task's parser, e.g. output from a hosted endpoint."""
    from medlens.tasks import get_task
    from medlens.tasks.runner import parse_output

    chosen = get_task(task)
    context = chosen.parse_context(image_size=image_size)
    parsed = parse_output(chosen, sys.stdin.read(), context)
    result = {
        "task": chosen.name,
        "final_answer": parsed.final_answer,
        "payload": parsed.payload,
        "parse_error": parsed.error,
        "warnings": parsed.warnings,
        "disclaimer": DISCLAIMER,
    }
    emit(chosen, result, fmt, Output(quiet=False))


def tasks() -> None:
    """List the tasks and their own options."""
    from medlens.tasks import TASKS, task_class

    for name in TASKS:
        cls = task_class(name)
        flags = " ".join("--" + decl.name.replace("_", "-") for decl in cls.options)
        typer.echo(f"{name:<14} {cls.description}" + (f" [{flags}]" if flags else ""))


def split_inputs(args: list[str]) -> tuple[list[str], str | None]:
    """INPUT... [QUESTION]: the last argument is the question when it is not an existing file or folder."""
    if len(args) > 1 and not Path(args[-1]).exists():
        return args[:-1], args[-1]
    return args, None


def emit(task: Task, result: dict[str, Any], fmt: str, output: Output) -> None:
    """Print the result as JSON, or in the task's own format (warnings then go to stderr)."""
    if fmt == "json":
        print_json(result)
        return
    rendered = task.render(result.get("payload") or {}, fmt)
    if rendered is None:
        raise MedlensError(f"task {task.name} has no {fmt!r} format (use json)")
    typer.echo(rendered, nl=False)
    output.note(result.get("warnings", []))
    if result.get("parse_error"):
        raise MedlensError(f"could not parse the model output: {result['parse_error']}")


def register(app: typer.Typer) -> None:
    app.command()(ask)
    app.command()(parse)
    app.command()(tasks)
