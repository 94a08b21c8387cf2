"""``medlens ask`` (run a task on your files), ``medlens parse`` (parse output made elsewhere), ``medlens tasks``.

The task-specific options of ``ask`` (``--overlay``, ``--dpi`` ...) are those the tasks declare
(:attr:`medlens.tasks.Task.options`): a new task with a new setting gets its flag without changes here.
"""

from __future__ import annotations

import functools
import sys
import tempfile
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
from medlens.cli.prepare import DicomwebConfig, use_dicomweb_config
from medlens.errors import MedlensError, NotFoundError

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
        flag = decl.type is bool  # a plain flag (no --no- twin); None unless given, like every task option
        kind = bool if flag else decl.type | None
        flags = ("--" + decl.name.replace("_", "-"),) if flag else ()
        params.append(option(decl.name, kind, None, *flags, help=text, panel="Task options", **bounds))
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
            help="Input(s), then optionally the question (or give it with --question). After one input, a last "
            "argument that does not exist is the question unless it looks like a path (a file suffix, a '/'); "
            "after two or more only if it has a space or '?'. Other missing inputs are an error. Tasks with a "
            "default prompt (localize, lab-extract, report ...) need no question.",
            metavar="INPUT... [QUESTION]",
        ),
    ],
    question_opt: Annotated[
        str | None, typer.Option("--question", "-Q", help="The question (then every argument is an input).")
    ] = None,
    task: Annotated[str, typer.Option("--task", "-t", help=_task_help())] = "qa",
    instruction: Annotated[str | None, typer.Option(help="Replace the text placed before the images.")] = None,
    think: Annotated[bool, typer.Option("--think", help="Switch on MedGemma's thinking mode.")] = False,
    max_new_tokens: Annotated[int | None, typer.Option(min=1, help="Cap on generated tokens.")] = None,
    deid: Annotated[
        bool | None,
        typer.Option(
            "--deid/--no-deid",
            help="De-identify the text sent to the model (names, identifiers, contacts, exact dates from records, "
            "notes and headers). Default: on for a remote engine (a server not on this machine), off for local ones.",
        ),
    ] = None,
    allow_burned_in: Annotated[
        bool,
        typer.Option(
            "--allow-burned-in",
            help="Send images that may carry burned-in text (PDF pages; DICOM with BurnedInAnnotation YES, or "
            "unknown for US/SC/XA/ES) to a remote engine or server anyway (refused by default; a warning says so).",
        ),
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="json, or a task's own format (csv for lab-extract).")] = "json",
    html: Annotated[
        Path | None, typer.Option("--html", help="Also write a one-page HTML view: images, answer, boxes, warnings.")
    ] = None,
    sr_out: Annotated[
        Path | None,
        typer.Option(
            "--sr-out",
            help="Also write the result as a DICOM Comprehensive 3D SR in the source study (DICOM inputs only).",
            rich_help_panel="Hospital outputs",
        ),
    ] = None,
    fhir_out: Annotated[
        Path | None,
        typer.Option(
            "--fhir-out",
            help="Also write the result as a FHIR R4 Bundle (DiagnosticReport + Observations), DICOM inputs only.",
            rich_help_panel="Hospital outputs",
        ),
    ] = None,
    store_sr: Annotated[
        str | None,
        typer.Option(
            "--store-sr",
            metavar="SERVER",
            help="Also store the result as a DICOM SR in the source study on this configured DICOMweb server.",
            rich_help_panel="Hospital outputs",
        ),
    ] = None,
    dicomweb_config: DicomwebConfig = None,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help="Ask a running `medlens serve` at this URL (http://host:port) instead of loading a model here.",
            rich_help_panel="Remote server",
        ),
    ] = None,
    api_key_file: Annotated[
        Path | None,
        typer.Option(
            "--api-key-file",
            help="File holding the server's API key (default: $MEDLENS_API_KEY).",
            rich_help_panel="Remote server",
        ),
    ] = None,
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
    from medlens.tasks.runner import ALLOW_BURNED_IN

    chosen = get_task(task)
    settings = task_settings(chosen, task_values)
    if allow_burned_in:
        settings["extra"] = {**settings.get("extra", {}), ALLOW_BURNED_IN: True}
    use_dicomweb_config(dicomweb_config)
    inputs, question = split_inputs(args, question_opt)
    if api_key_file is not None and server is None:
        raise MedlensError("--api-key-file goes with --server URL")
    if server is not None:
        if html is not None:
            raise MedlensError("--html draws the images prepared here and cannot be used with --server")
        options = {
            "recipe": study.recipe,
            "series": study.series,
            "modality": study.modality,
            "instruction": instruction,
            "thinking": think or None,
            "max_new_tokens": max_new_tokens,
            "deid": deid,
            **{name: value for name, value in task_values.items() if value is not None},
        }
        result = ask_server(
            server, api_key_file, inputs, question, task, options, slide, model, output, allow_burned_in
        )
        write_results(result, inputs, sr_out, fhir_out, store_sr, output)
        emit(chosen, result, fmt, output)
        return
    builds: list[Any] = []
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
        deid=deid,
        slide=slide,
        on_build=builds.append if html else None,
        **settings,
    )
    if html:
        from medlens.cli.result_page import write_page

        output.note([f"wrote {write_page(html, result, builds)}"])
    write_results(result, inputs, sr_out, fhir_out, store_sr, output)
    emit(chosen, result, fmt, output)


def write_results(
    result: dict[str, Any],
    inputs: list[str],
    sr_out: Path | None,
    fhir_out: Path | None,
    store_sr: str | None,
    output: Output,
) -> None:
    """``--sr-out`` / ``--fhir-out`` / ``--store-sr``: the result as a DICOM SR and a FHIR Bundle, joined to the
    source study (local DICOM inputs, or a dicomweb:// study's headers from its server)."""
    if sr_out is None and fhir_out is None and store_sr is None:
        return
    from medlens.privacy import short_hash
    from medlens.results import store_sr as store
    from medlens.results import write_outputs

    notes = [f"wrote {p}" for p in write_outputs(result, inputs, sr_out, fhir_out)]
    if store_sr is not None:
        notes.append(f"stored the SR {short_hash(store(result, inputs, store_sr))} on dicomweb://{store_sr}")
    output.note(notes)


#: the task options that name a file written on this machine: a remote server cannot write them
LOCAL_OUTPUTS = {"overlay": "--overlay"}


def ask_server(
    url: str,
    api_key_file: Path | None,
    inputs: list[str],
    question: str | None,
    task: str,
    options: dict[str, Any],
    slide: SlideOptions,
    model: ModelChoice,
    output: Output,
    allow_burned_in: bool = False,
) -> dict[str, Any]:
    """The envelope of ``task`` run by the ``medlens serve`` at ``url`` (no model is loaded here). Inputs whose
    images may carry burned-in text are refused for a server on another machine unless ``allow_burned_in``."""
    import dataclasses

    from medlens.backends.openai_backend import is_remote_url
    from medlens.client import Client
    from medlens.io.burned_in import burned_in_inputs
    from medlens.io.dicomweb import is_dicomweb
    from medlens.prep.slide_recipe import SlideOptions
    from medlens.tasks.runner import burned_in_verdict

    local = [flag for name, flag in LOCAL_OUTPUTS.items() if options.get(name) is not None]
    if local:
        raise MedlensError(f"{', '.join(local)} writes a file here and cannot be used with --server")
    if model.args.get("adapter") is not None:
        raise MedlensError(
            "--adapter cannot be used with --server: start the server with it (medlens serve --adapter DIR)"
        )
    changed = {
        f.name: getattr(slide, f.name)
        for f in dataclasses.fields(SlideOptions)
        if getattr(slide, f.name) != getattr(SlideOptions(), f.name)
    }
    if changed:
        options = {**options, "slide": changed}
    if (model.name, model.engine) != ("test-tiny", "transformers") or model.args:
        output.note(["--model, --engine and --model-arg are ignored with --server: the server's model answers"])
    shown: list[str] = []

    def stage(name: str, data: dict[str, Any]) -> None:  # progress on stderr, each line once
        total = data.get("total") or 0
        line = f"{data.get('stage')} {data.get('done', 0)}/{total}" if total else str(data.get("stage"))
        if name == "stage" and line not in shown:
            shown.append(line)
            output.note([line])

    deid = options.get("deid")
    remote = is_remote_url(url)
    found = (
        burned_in_inputs([i for i in inputs if not is_dicomweb(i)]) if remote else []
    )  # the server reads a PACS itself
    sent_anyway = burned_in_verdict(found, allow_burned_in, "the server is not on this machine")
    with tempfile.TemporaryDirectory(prefix="medlens-upload-") as workdir:
        if deid if deid is not None else remote:  # files leaving the machine are de-identified
            inputs = leaving_the_machine(inputs, Path(workdir), allow_burned_in)
            output.note([f"de-identified the DICOM inputs before sending them to {url} (--no-deid: as they are)"])
        with Client(url, api_key=read_api_key(api_key_file)) as client:
            events = None if output.quiet else stage
            result = client.analyze(inputs, task=task, question=question, on_event=events, **options)
    result["warnings"] = [*(result.get("warnings") or []), *sent_anyway]
    return result


def leaving_the_machine(inputs: list[str], workdir: Path, allow_burned_in: bool = False) -> list[str]:
    """The inputs as they may go to a server on another machine: DICOM de-identified (PS3.15 Basic Profile,
    one key for all inputs, so that their UIDs and pseudonyms agree), images as they are; documents (PDF,
    FHIR, notes) and zips, which cannot be de-identified file by file here, are refused with the way out."""
    import secrets

    from medlens.errors import InputError
    from medlens.io.deid import DeidOptions, deidentify
    from medlens.io.dicomweb import is_dicomweb
    from medlens.io.discover import discover, document_kind

    options = DeidOptions(salt=secrets.token_bytes(32), allow_burned_in=allow_burned_in)
    out: list[str] = []
    for n, raw in enumerate(inputs):
        path = Path(raw)
        if is_dicomweb(raw) or not path.exists():
            out.append(raw)
            continue
        if document_kind(path) or path.suffix.lower() == ".zip":
            raise InputError(
                "cannot be de-identified before it is sent to a server on another machine; de-identify it "
                "yourself (medlens deid for DICOM), then pass --no-deid",
                raw,
            )
        found = discover(path)
        if found.tempdir is not None:
            found.tempdir.cleanup()
        if not found.dicom:
            out.append(raw)  # images and NIfTI volumes: no header fields medlens sends
            continue
        target = workdir / f"input{n}"
        deidentify(path, target, options)
        out.append(str(target))
    return out


def read_api_key(path: Path | None) -> str | None:
    """The API key: the first line of ``path``, else ``$MEDLENS_API_KEY``, else None."""
    import os

    if path is None:
        return os.environ.get("MEDLENS_API_KEY") or None
    try:
        key = next(iter(path.read_text(encoding="utf-8").strip().splitlines()), "").strip()
    except FileNotFoundError:
        raise NotFoundError("no such API key file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MedlensError(f"cannot read the API key file ({exc})", str(path)) from None
    if not key:
        raise MedlensError("the API key file is empty", str(path))
    return key


def parse(
    task: Annotated[str, typer.Argument(help="Task whose parser to use.")],
    image_size: Annotated[
        str | None, typer.Option(help="localize: WxH of the original image, for pixel boxes.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json or a task's own format.")] = "json",
    overlay: Annotated[
        Path | None, typer.Option("--overlay", help="localize: an image to draw the parsed boxes on (needs --out).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="localize: where the --overlay PNG goes.")] = None,
) -> None:
    """Parse a model's raw output (stdin) with a task's parser, e.g. output from a hosted endpoint."""
    from medlens.tasks import get_task
    from medlens.tasks.runner import parse_output

    chosen = get_task(task)
    if (overlay is None) != (out is None):
        raise MedlensError("--overlay IMAGE and --out OUT.png go together")
    if overlay is not None and chosen.name != "localize":
        raise MedlensError(f"--overlay draws localize boxes; task {chosen.name} has none")
    image = read_overlay_image(overlay) if overlay is not None else None
    if image is not None and image_size is None:
        image_size = f"{image.shape[1]}x{image.shape[0]}"  # boxes in this image's pixels
    context = chosen.parse_context(image_size=image_size)
    parsed = parse_output(chosen, sys.stdin.read(), context)
    warnings = list(parsed.warnings)
    if image is not None and out is not None:
        warnings += draw_boxes(image, (parsed.payload or {}).get("boxes") or [], out)
    result = {
        "task": chosen.name,
        "final_answer": parsed.final_answer,
        "payload": parsed.payload,
        "parse_error": parsed.error,
        "warnings": warnings,
        "disclaimer": DISCLAIMER,
    }
    emit(chosen, result, fmt, Output(quiet=False))


def read_overlay_image(path: Path) -> Any:
    """The image to draw boxes on, as RGB uint8; a missing or unreadable file is a typed error."""
    from PIL import Image

    from medlens.errors import CorruptFileError

    if not path.is_file():
        raise NotFoundError("no such image file", str(path))
    import numpy as np

    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for a bad file
        raise CorruptFileError(f"cannot read image ({exc})", str(path)) from None


def draw_boxes(image: Any, boxes: list[dict[str, Any]], out: Path) -> list[str]:
    """Draw ``boxes`` on ``image`` into ``out`` (PNG) with the localize task's drawing; warnings if not."""
    from medlens.tasks.localize import draw_overlay

    if not boxes:
        return ["overlay not written: no boxes were parsed"]
    try:
        draw_overlay(image, boxes).save(out, format="PNG")
    except OSError as exc:
        raise MedlensError(f"cannot write the overlay ({exc})", str(out)) from None
    return []


def tasks() -> None:
    """List the tasks and their own options."""
    from medlens.tasks import TASKS, task_class

    for name in TASKS:
        cls = task_class(name)
        flags = " ".join("--" + decl.name.replace("_", "-") for decl in cls.options)
        typer.echo(f"{name:<14} {cls.description}" + (f" [{flags}]" if flags else ""))


#: endings of the files medlens reads: an argument ending so is a path, never a question
PATH_SUFFIXES = (
    ".dcm", ".dicom", ".ima", ".nii", ".nii.gz", ".gz", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".zip",
    ".pdf", ".json", ".txt", ".md", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
)  # fmt: skip


def looks_like_path(arg: str) -> bool:
    """A name that is a path, never a question: it ends with a file suffix medlens reads or a path separator,
    or holds a separator and neither a space nor a '?'."""
    text = arg.strip()
    separator = "/" in text or "\\" in text
    if not text or text.lower().endswith(PATH_SUFFIXES) or text.endswith(("/", "\\")):
        return True
    return separator and "?" not in text and not any(c.isspace() for c in text)


def looks_like_question(arg: str) -> bool:
    """Clearly not a path: not :func:`looks_like_path`, has a space or a '?' or ends with '.'/'!', and holds
    no path separator unless it has a '?'."""
    text = arg.strip()
    if looks_like_path(text):
        return False
    sentence = any(c.isspace() for c in text) or "?" in text or text.endswith((".", "!"))
    return sentence and ("?" in text or not ("/" in text or "\\" in text))


def split_inputs(args: list[str], question: str | None = None) -> tuple[list[str], str | None]:
    """The inputs and the question of ``INPUT... [QUESTION]`` (``question``: the --question value).

    A last argument that does not exist is the question when it reads as one: with exactly one input before
    it (``INPUT QUESTION``) unless it :func:`looks_like_path`; after two or more inputs only when it
    :func:`looks_like_question`. Every other argument must exist: all missing ones are named in one error.
    With --question every argument is an input, and a last one that reads as a question is an error.
    """
    from medlens.io.dicomweb import is_dicomweb  # a dicomweb:// reference is an input, never a question

    inputs = list(args)
    last = inputs[-1] if len(inputs) > 1 else None
    if last is not None and not is_dicomweb(last) and not Path(last).exists():
        reads = not looks_like_path(last) if len(inputs) == 2 else looks_like_question(last)
        if reads and question is not None and (len(inputs) > 2 or looks_like_question(last)):
            raise MedlensError(f"two questions: --question and {last!r}; give one")
        if reads and question is None:
            question = inputs.pop()
    missing = [a for a in inputs if not is_dicomweb(a) and not Path(a).exists()]
    if missing:
        hint = "" if question is not None else " (to ask a question, use --question TEXT)"
        raise NotFoundError(f"no such file or folder: {', '.join(missing)}{hint}")
    return inputs, question


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
