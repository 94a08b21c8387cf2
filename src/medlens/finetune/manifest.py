"""The training manifest: one JSON object per line, each a study (inputs) with a question and its target answer.

    {"id": "r1", "inputs": ["ct/series1", "cxr.png"], "task": "qa", "question": "...", "answer": "...",
     "options": {...}}

``inputs`` are anything ``medlens ask`` takes (files, folders, zips, ``dicomweb://`` references); relative
paths are relative to the manifest's folder. ``task`` defaults to ``qa``; ``options`` are task options
(:class:`~medlens.tasks.TaskOptions` fields) for that row. Unknown keys are errors, so a typo such as
``"anwser"`` never silently drops a target.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medlens.errors import CorruptFileError, InputError, NotFoundError
from medlens.files import write_jsonl_atomic

#: marks an input reference that is not a local path (``dicomweb://SERVER/STUDY``): kept as a string
REMOTE_MARK = "://"


@dataclass(frozen=True)
class TrainRow:
    """One training example: ``inputs`` resolved (local ones to absolute paths), ``base`` the manifest folder."""

    id: str
    inputs: list[Path | str]
    task: str = "qa"
    question: str | None = None
    answer: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    base: Path = field(default_factory=Path.cwd)

    def to_json(self) -> dict[str, Any]:
        """The manifest line for this row, with local inputs relative to ``base`` where they lie below it."""
        line: dict[str, Any] = {"id": self.id, "inputs": [_relative(ref, self.base) for ref in self.inputs]}
        line["task"] = self.task
        if self.question is not None:
            line["question"] = self.question
        line["answer"] = self.answer
        if self.options:
            line["options"] = self.options
        return line


class _Line(BaseModel):
    """Schema of one manifest line."""

    model_config = ConfigDict(extra="forbid", strict=True)

    id: str = Field(min_length=1)
    inputs: list[str] = Field(default_factory=list)
    task: str = "qa"
    question: str | None = None
    answer: str = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict)


def read_manifest(path: str | Path, *, check_inputs: bool = True) -> list[TrainRow]:
    """Read and validate a JSONL training manifest.

    Raises :class:`~medlens.errors.NotFoundError` when the manifest (or, with ``check_inputs``, a local input)
    does not exist, :class:`~medlens.errors.CorruptFileError` for a line that is not JSON, and
    :class:`~medlens.errors.InputError` for a line that breaks the schema, a duplicate id, or an empty manifest;
    every message names the manifest and the line number.
    """
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("training manifest not found" if not path.exists() else "not a file", str(path))
    base = path.resolve().parent
    rows: list[TrainRow] = []
    seen: dict[str, int] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(f"not UTF-8 text ({exc.reason})", str(path)) from exc
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        line = _parse_line(raw, where)
        if line.id in seen:
            raise InputError(f"duplicate id {line.id!r} (first on line {seen[line.id]})", where)
        seen[line.id] = number
        inputs = [_resolve(ref, base, where, check_inputs) for ref in line.inputs]
        rows.append(TrainRow(line.id, inputs, line.task, line.question, line.answer, dict(line.options), base))
    if not rows:
        raise InputError("the training manifest holds no rows", str(path))
    return rows


def write_manifest(rows: Iterable[TrainRow], path: str | Path) -> Path:
    """Write ``rows`` as a manifest at ``path`` (atomically), inputs relative to the new manifest's folder."""
    path = Path(path)
    target = path.resolve().parent
    lines = []
    for row in rows:
        inputs = [_relative(_absolute(ref, row.base), target) for ref in row.inputs]
        lines.append({**row.to_json(), "inputs": inputs})
    return write_jsonl_atomic(path, lines)


def _parse_line(raw: str, where: str) -> _Line:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"not a JSON object ({exc.msg}, column {exc.colno})", where) from exc
    if not isinstance(value, dict):
        raise InputError(f"expected a JSON object, got {type(value).__name__}", where)
    try:
        return _Line.model_validate(value)
    except ValidationError as exc:
        errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        first = errors[0]
        key = ".".join(str(part) for part in first["loc"]) or "line"
        problem = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].lower()
        raise InputError(f"{key}: {problem}", where) from None


def _is_remote(ref: str) -> bool:
    return REMOTE_MARK in ref


def _resolve(ref: str, base: Path, where: str, check: bool) -> Path | str:
    if _is_remote(ref):
        return ref
    resolved = (base / ref).resolve()
    if check and not resolved.exists():
        raise NotFoundError(f"input {ref!r} does not exist (looked in {base})", where)
    return resolved


def _absolute(ref: Path | str, base: Path) -> Path | str:
    if isinstance(ref, str) and _is_remote(ref):
        return ref
    return (base / ref).resolve()


def _relative(ref: Path | str, base: Path) -> str:
    if isinstance(ref, str) and _is_remote(ref):
        return ref
    ref = Path(ref)
    try:
        return ref.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(ref)


def input_paths(rows: Sequence[TrainRow]) -> list[Path]:
    """Every local input of ``rows`` (remote references left out), in order, without repeats."""
    out: dict[Path, None] = {}
    for row in rows:
        for ref in row.inputs:
            if isinstance(ref, Path):
                out.setdefault(ref, None)
    return list(out)


__all__ = ["REMOTE_MARK", "TrainRow", "input_paths", "read_manifest", "write_manifest"]
