"""A row's task options: the run's options (from the command line) with the row's own ``options`` on top,
checked by name and type; as JSON they travel to the workers and into the row's key."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

from medlens.batch.manifest import RowProblem
from medlens.prep.slide_recipe import SlideOptions
from medlens.tasks import Task, TaskOption, TaskOptions

#: options every task takes, with their types
COMMON: dict[str, Any] = {
    "recipe": str,
    "series": str | None,
    "modality": str | None,
    "instruction": str | None,
    "thinking": bool,
    "max_new_tokens": int | None,
    "deid": bool | None,
}
#: ``TaskOptions.extra`` keys every task takes
COMMON_EXTRA: dict[str, Any] = {"allow_burned_in": bool}
#: options that write a file of their own: one per run, not one per row
REFUSED = {"overlay": "it writes one file per run (use medlens ask for an overlay)"}
#: slide settings that change how, not what, is read: not part of a row's key
SLIDE_RUNTIME = ("workers", "timeout_s", "memory_mb")


def row_options(task: Task, base: TaskOptions, given: dict[str, Any]) -> TaskOptions:
    """``base`` with the row's ``given`` options set; an unknown name, a value of the wrong type, or an option
    the task does not take is a :class:`RowProblem` naming it."""
    declared = {decl.name: decl for decl in task.options}
    fields: dict[str, Any] = {}
    extra = dict(base.extra)
    for name, value in given.items():
        if name in REFUSED:
            raise RowProblem(f"option {name!r} is not available in batch: {REFUSED[name]}")
        if name == "slide":
            fields["slide"] = _slide(base.slide, value)
        elif name in COMMON:
            fields[name] = _checked(name, value, COMMON[name])
        elif name in declared:
            value = _bounded(declared[name], _checked(name, value, declared[name].type))
            if name in TaskOptions.__dataclass_fields__:
                fields[name] = value
            else:
                extra[name] = value
        elif name in COMMON_EXTRA:
            extra[name] = _checked(name, value, COMMON_EXTRA[name])
        else:
            known = sorted([*COMMON, *COMMON_EXTRA, *declared, "slide"])
            raise RowProblem(f"unknown option {name!r} for task {task.name} (it takes: {', '.join(known)})")
    return dataclasses.replace(base, **fields, extra=extra)


def _checked(name: str, value: Any, kind: Any) -> Any:
    allowed = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
    if value is None and type(None) in allowed:
        return None
    for wanted in allowed:
        if wanted is bool and isinstance(value, bool):
            return value
        if wanted is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if wanted is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if wanted in (str, Path) and isinstance(value, str):
            return value
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in allowed)
    raise RowProblem(f"option {name!r} must be {names}, not {value!r}")


def _bounded(decl: TaskOption, value: Any) -> Any:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and ((decl.min is not None and value < decl.min) or (decl.max is not None and value > decl.max)):
        raise RowProblem(f"option {decl.name!r} must be within {decl.min}..{decl.max}, not {value}")
    return value


def _slide(base: SlideOptions, value: Any) -> SlideOptions:
    if not isinstance(value, dict):
        raise RowProblem(f"option 'slide' must be an object of slide settings, not {value!r}")
    known = [f.name for f in dataclasses.fields(SlideOptions)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise RowProblem(f"unknown slide setting(s) {', '.join(map(repr, unknown))} (known: {', '.join(known)})")
    return dataclasses.replace(base, **value)


def options_to_json(options: TaskOptions) -> dict[str, Any]:
    """``options`` as JSON (what a row's payload carries to a worker)."""
    out = dataclasses.asdict(options)
    out["overlay"] = str(options.overlay) if options.overlay is not None else None
    return out


def options_from_json(data: dict[str, Any]) -> TaskOptions:
    """The :class:`TaskOptions` :func:`options_to_json` made."""
    values = dict(data)
    values["slide"] = SlideOptions(**values.get("slide", {}))
    values["overlay"] = Path(values["overlay"]) if values.get("overlay") else None
    return TaskOptions(**values)


def key_options(task: Task, options: TaskOptions) -> dict[str, Any]:
    """What of ``options`` can change the task's result: the common options, the task's own, the slide's
    settings but its worker counts and limits."""
    data = options_to_json(options)
    slide = {k: v for k, v in data["slide"].items() if k not in SLIDE_RUNTIME}
    own = {decl.name: data[decl.name] for decl in task.options if decl.name in data}
    return {**{name: data[name] for name in COMMON}, **own, "slide": slide, "extra": data["extra"]}
