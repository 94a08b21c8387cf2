"""Training examples: a prompt (chat messages, built on use) and the target answer.

The messages of a manifest row come from the row's registered task (``task.build``), the very code
``medlens ask`` runs: same reading, same preparation recipe, same prompt layout. A benchmark's train split
comes through ``medlens.eval.training_rows`` (the benchmark's own hook kind), wired in by the API layer.
Messages are built when the collator needs them, so a dataset of 85-slice CT volumes is never in memory at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.chat import Messages
from medlens.errors import InputError, MedlensError
from medlens.finetune.manifest import TrainRow


@dataclass(frozen=True)
class Example:
    """One training example. ``messages()`` builds the prompt; ``row`` describes it for the overlap guard."""

    id: str
    answer: str
    messages: Callable[[], Messages]
    row: TrainRow
    meta: dict[str, Any] = field(default_factory=dict)


def task_options(row: TrainRow, recipe: str) -> Any:
    """The :class:`~medlens.tasks.TaskOptions` of a manifest row (its ``options`` over the run's recipe)."""
    from medlens.prep.slide_recipe import SlideOptions
    from medlens.tasks import TaskOptions

    values = dict(row.options)
    known = {item.name for item in dataclasses.fields(TaskOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"row {row.id!r}: unknown task option {unknown[0]!r} (valid: {', '.join(sorted(known))})")
    if isinstance(values.get("slide"), dict):
        values["slide"] = SlideOptions(**values["slide"])
    values.setdefault("recipe", recipe)
    return TaskOptions(**values)


def from_manifest(rows: Sequence[TrainRow], recipe: str) -> list[Example]:
    """An example per manifest row; its task, options and number of inputs are checked now, the inputs are read
    when the example is first used."""
    from medlens.tasks import get_task
    from medlens.tasks.runner import check_inputs

    out = []
    for row in rows:
        try:
            task = get_task(row.task)
            options = task_options(row, recipe)
            question = check_inputs(task, [Path(str(p)) for p in row.inputs], row.question)
        except MedlensError as exc:
            raise InputError(f"row {row.id!r}: {exc.reason}", str(row.base)) from None
        except TypeError as exc:
            raise InputError(f"row {row.id!r}: bad task options ({exc})", str(row.base)) from None
        out.append(Example(row.id, row.answer, _builder(task, row, question, options), row, {"task": row.task}))
    return out


def _builder(task: Any, row: TrainRow, question: str, options: Any) -> Callable[[], Messages]:
    def build() -> Messages:
        made = task.build([Path(str(p)) for p in row.inputs], question, options)
        if len(made.requests) != 1:
            raise InputError(
                f"row {row.id!r}: task {task.name} builds {len(made.requests)} prompts for these inputs; "
                "a training row needs exactly one",
                str(row.base),
            )
        return made.requests[0].messages

    return build


__all__ = ["Example", "from_manifest", "task_options"]
