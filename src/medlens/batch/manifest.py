"""The batch manifest: one row per study or per question, as JSONL or CSV (chosen by the file's suffix).

Fields: ``id`` (default: the row's number), ``input`` (a path, a folder or a ``dicomweb://`` reference;
relative paths are read against the manifest's folder) or ``inputs`` (a list in JSONL, ``;``-separated in
CSV) for tasks of several inputs, ``task``, ``question`` and ``options`` (a JSON object of task options; in
CSV a JSON text). A file that cannot be read as its format is an error naming the file and the line; a row
whose content is wrong fails only that row (:class:`RowProblem`).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.errors import InputError, MedlensError, NotFoundError
from medlens.registry import Registry

#: the fields a manifest row may have
FIELDS = ("id", "input", "inputs", "task", "question", "options")


class ManifestError(MedlensError):
    """The manifest cannot be read (not found, not its format, a line that is not a row)."""


class RowProblem(InputError):
    """One manifest row is wrong (a missing field, an unknown option ...): that row fails, the others run."""


@dataclass
class ManifestRow:
    """One row as written: its id, where it is, and its raw fields (checked by :func:`checked_row`)."""

    row_id: str
    line: int
    fields: dict[str, Any]


@dataclass
class BatchRow:
    """A checked row: inputs resolved against the manifest's folder, the task chosen."""

    row_id: str
    line: int
    inputs: list[str]
    task: str
    question: str | None
    options: dict[str, Any] = field(default_factory=dict)


RawRows = Iterator[tuple[int, Any]]
#: manifest suffix -> reader of (line number, raw row) pairs
READERS: Registry[Callable[[Path], RawRows]] = Registry("manifest format")


def read_manifest(path: str | Path) -> list[ManifestRow]:
    """Every row of the manifest at ``path`` with its id (ids default to the row number and must be unique:
    a repeated id is that row's problem, reported by :func:`checked_row`)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise ManifestError(f"unknown manifest format {suffix or '(no suffix)'!r}: use .jsonl or .csv", str(path))
    if not path.is_file():
        raise NotFoundError("no such manifest file", str(path))
    rows: list[ManifestRow] = []
    try:
        for number, (line, raw) in enumerate(READERS.get(suffix)(path), start=1):
            if not isinstance(raw, dict):
                raise ManifestError(f"line {line}: a row must be a JSON object, not {type(raw).__name__}", str(path))
            given = raw.get("id")
            row_id = str(number) if given is None or given == "" else str(given)
            rows.append(ManifestRow(row_id, line, raw))
    except UnicodeDecodeError as exc:
        raise ManifestError(f"not UTF-8 text ({exc.reason} at byte {exc.start})", str(path)) from None
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest ({exc.strerror or exc})", str(path)) from None
    if not rows:
        raise ManifestError("the manifest has no rows", str(path))
    return rows


def _jsonl(path: Path) -> RawRows:
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as exc:
                raise ManifestError(f"line {line}: not JSON ({exc.msg}, column {exc.colno})", str(path)) from None


def _csv(path: Path) -> RawRows:
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh, strict=True)
        try:
            header = reader.fieldnames or []
            unknown = [name for name in header if name not in FIELDS]
            if unknown or len(set(header)) != len(header):
                what = f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "a repeated column"
                raise ManifestError(f"line 1: {what} (columns: {', '.join(FIELDS)})", str(path))
            for raw in reader:
                if None in raw:
                    raise ManifestError(f"line {reader.line_num}: more cells than columns", str(path))
                yield reader.line_num, {k: v for k, v in raw.items() if v not in (None, "")}
        except csv.Error as exc:
            raise ManifestError(f"line {reader.line_num}: not CSV ({exc})", str(path)) from None


READERS.add(".jsonl", _jsonl)
READERS.add(".ndjson", _jsonl)
READERS.add(".csv", _csv)


def checked_row(row: ManifestRow, base: Path, default_task: str | None, seen: dict[str, int]) -> BatchRow:
    """The row's fields checked and its inputs resolved against ``base`` (the manifest's folder); a
    :class:`RowProblem` saying what is wrong otherwise. ``seen`` maps the ids met so far to their lines."""
    raw = row.fields
    if row.row_id in seen:
        raise RowProblem(f"id {row.row_id!r} is already used on line {seen[row.row_id]}")
    seen[row.row_id] = row.line
    unknown = [name for name in raw if name not in FIELDS]
    if unknown:
        raise RowProblem(f"unknown field(s) {', '.join(map(repr, unknown))} (fields: {', '.join(FIELDS)})")
    inputs = _inputs(raw)
    task = raw.get("task") or default_task
    if not task:
        raise RowProblem("no task: give the row a 'task' or the run --task")
    if not isinstance(task, str):
        raise RowProblem(f"'task' must be a name, not {type(task).__name__}")
    question = raw.get("question")
    if question is not None and not isinstance(question, str):
        raise RowProblem(f"'question' must be text, not {type(question).__name__}")
    options = raw.get("options") or {}
    if isinstance(options, str):
        try:
            options = json.loads(options)
        except json.JSONDecodeError as exc:
            raise RowProblem(f"'options' is not JSON ({exc.msg})") from None
    if not isinstance(options, dict):
        raise RowProblem(f"'options' must be a JSON object, not {type(options).__name__}")
    return BatchRow(row.row_id, row.line, [resolve_input(i, base) for i in inputs], task, question or None, options)


def _inputs(raw: dict[str, Any]) -> list[str]:
    if ("input" in raw) == ("inputs" in raw):
        raise RowProblem("give exactly one of 'input' (one path) and 'inputs' (several)")
    if "input" in raw:
        value = raw["input"]
        if not isinstance(value, str) or not value.strip():
            raise RowProblem("'input' must be a path or a dicomweb:// reference")
        return [value.strip()]
    value = raw["inputs"]
    if isinstance(value, str):  # CSV: "a.dcm;b.dcm"
        value = [part for part in value.split(";")]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise RowProblem("'inputs' must be a non-empty list of paths (in CSV: separated by ';')")
    return [v.strip() for v in value]


def resolve_input(value: str, base: Path) -> str:
    """A ``dicomweb://`` reference as it is; a path relative to the manifest's folder (``~`` expanded)."""
    from medlens.io.dicomweb import is_dicomweb

    if is_dicomweb(value):
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base / path)
