"""Strict benchmark files: a pydantic error becomes one line naming the key path and the nearest valid name."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ValidationError

from medlens.errors import MedlensError

M = TypeVar("M", bound=BaseModel)
Where = tuple[str | int, ...]


class SpecProblem(MedlensError):
    """Something wrong at the key path ``where`` of a benchmark file (the file is added by ``load_spec``)."""

    def __init__(self, where: Where, reason: str) -> None:
        self.where = where
        super().__init__(reason)


def dotted(loc: Sequence[str | int]) -> str:
    """``("metrics", 0, "options", "labels")`` -> ``metrics[0].options.labels``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def suggestion(name: str, names: Sequence[str]) -> str:
    """``did you mean 'x'?`` for the nearest of ``names``, else the valid names."""
    close = difflib.get_close_matches(name, list(names), n=1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"valid: {', '.join(names)}" if names else "no key is valid here"


def unknown_key(where: Where, names: Sequence[str]) -> SpecProblem:
    return SpecProblem(where, f"unknown key {dotted(where)!r} ({suggestion(str(where[-1]), names)})")


def validated(model: type[M], data: Any, where: Where = ()) -> M:
    """``model`` validated from ``data`` (found at ``where`` in the file); a :class:`SpecProblem` when invalid."""
    try:
        return model.model_validate({} if data is None and where else data)
    except ValidationError as exc:
        raise problem(exc, model, where) from None


def problem(exc: ValidationError, model: type[BaseModel], where: Where = ()) -> SpecProblem:
    """The first error of ``exc`` as a one-line :class:`SpecProblem`; an unknown key comes first (a misspelt
    required key is both unknown and missing, and the unknown name says more)."""
    errors = exc.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    inner = tuple(first["loc"])
    loc = (*where, *inner)
    if first["type"] == "extra_forbidden":
        return unknown_key(loc, fields_at(model, inner[:-1]))
    if first["type"] == "missing":
        return SpecProblem(loc, f"missing key {dotted(loc)!r}")
    message = str(first["msg"]).removeprefix("Value error, ")
    if not loc:
        keys = ", ".join(names_of(model))
        return SpecProblem(loc, f"not a benchmark file: it must hold a mapping with the keys {keys}")
    got = "" if first["type"] == "value_error" else f" (got {_short(first.get('input'))})"
    return SpecProblem(loc, f"{dotted(loc)}: {message}{got}")


def names_of(model: type[BaseModel]) -> list[str]:
    """The required keys of ``model`` first, then the optional ones."""
    fields = model.model_fields
    return sorted(fields, key=lambda name: not fields[name].is_required())


def fields_at(model: type[BaseModel], loc: Sequence[str | int]) -> list[str]:
    """The field names of the model found at ``loc`` inside ``model`` (none when it is not a model)."""
    annotation: Any = model
    for part in loc:
        found = _model_in(annotation)
        if isinstance(part, str) and found is not None and part in found.model_fields:
            annotation = found.model_fields[part].annotation
        elif isinstance(part, int):
            annotation = _item_type(annotation)
        else:
            return []
    found = _model_in(annotation)
    return list(found.model_fields) if found is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (list, dict):
        return None
    return next((m for m in map(_model_in, get_args(annotation)) if m is not None), None)


def _item_type(annotation: Any) -> Any:
    if get_origin(annotation) is list:
        return get_args(annotation)[0]
    return next((_item_type(arg) for arg in get_args(annotation) if _item_type(arg) is not None), None)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
