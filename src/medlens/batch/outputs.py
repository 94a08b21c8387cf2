"""What a batch run writes: ``results.jsonl`` (one envelope per successful row, in manifest order, with its
``row_id`` and ``key``), ``errors.jsonl`` (one line per failed row) and, with ``--format parquet``,
``results.parquet``: every row, flat columns (:data:`PARQUET_COLUMNS`) plus the whole envelope as JSON.
Every file is written whole to a temporary name and renamed, so a reader never sees half of one."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens import DISCLAIMER
from medlens.errors import MedlensError
from medlens.files import write_atomic, write_jsonl_atomic
from medlens.registry import Registry

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
PARQUET = "results.parquet"

#: one row of the run's outcome table: ``row_id``, ``line``, ``inputs``, ``task``, ``question``, ``key`` and
#: either ``envelope`` (a result) or ``error`` (``{"error", "reason", "stage", "path"?, "untyped"?}``)
Outcome = dict[str, Any]

#: Parquet columns: name -> (pyarrow type name, what it holds); the schema of ``results.parquet``
PARQUET_COLUMNS: dict[str, tuple[str, str]] = {
    "row_id": ("string", "the manifest row's id"),
    "line": ("int64", "the row's line in the manifest"),
    "key": ("string", "the row's journal key (null when the row failed before it had one)"),
    "ok": ("bool", "the row has a result"),
    "task": ("string", "the task name"),
    "inputs": ("list<string>", "the inputs, resolved against the manifest's folder"),
    "question": ("string", "the question asked (the task's default when the row gave none)"),
    "model": ("string", "the model that answered"),
    "engine": ("string", "the engine it ran on"),
    "model_fingerprint": ("string", "the weights' revision (adapter included)"),
    "final_answer": ("string", "the parsed short answer (null when none was parsed)"),
    "answer": ("string", "the model's answer, thinking removed"),
    "parse_error": ("string", "why the output could not be parsed"),
    "n_images": ("int64", "images sent to the model"),
    "prompt_tokens": ("int64", "prompt tokens"),
    "completion_tokens": ("int64", "generated tokens"),
    "finish_reason": ("string", "stop or length"),
    "warnings": ("list<string>", "the envelope's warnings"),
    "error": ("string", "the failed row's error type (null for results)"),
    "reason": ("string", "the failed row's one-line reason"),
    "stage": ("string", "where it failed: manifest, key, prepare or answer"),
    "envelope_json": ("string", "the whole result envelope as JSON (null for failed rows)"),
    "disclaimer": ("string", "research use only"),
}


def result_line(outcome: Outcome) -> dict[str, Any]:
    """A results.jsonl line: the envelope with the row's id and key."""
    return {"row_id": outcome["row_id"], "key": outcome["key"], **outcome["envelope"]}


def error_line(outcome: Outcome) -> dict[str, Any]:
    """An errors.jsonl line: which row, its inputs, and the typed error."""
    error = outcome["error"]
    line = {
        "row_id": outcome["row_id"],
        "line": outcome["line"],
        "input": outcome["inputs"][0] if len(outcome["inputs"]) == 1 else outcome["inputs"],
        "task": outcome["task"],
        **error,
        "disclaimer": DISCLAIMER,
    }
    return line


def write_jsonl(out: Path, outcomes: list[Outcome]) -> list[Path]:
    """results.jsonl and errors.jsonl (the latter empty when no row failed)."""
    ok = [result_line(o) for o in outcomes if o.get("envelope") is not None]
    failed = [error_line(o) for o in outcomes if o.get("envelope") is None]
    return [write_jsonl_atomic(out / RESULTS, ok), write_jsonl_atomic(out / ERRORS, failed)]


def parquet_row(outcome: Outcome) -> dict[str, Any]:
    """One row of results.parquet."""
    envelope = outcome.get("envelope") or {}
    error = outcome.get("error") or {}
    return {
        "row_id": outcome["row_id"],
        "line": outcome["line"],
        "key": outcome.get("key"),
        "ok": bool(envelope),
        "task": outcome["task"],
        "inputs": list(outcome["inputs"]),
        "question": envelope.get("question", outcome.get("question")),
        **{name: envelope.get(name) for name in _ENVELOPE_COLUMNS},
        "warnings": list(envelope.get("warnings") or []),
        "error": error.get("error"),
        "reason": error.get("reason"),
        "stage": error.get("stage"),
        "envelope_json": json.dumps(envelope, ensure_ascii=False) if envelope else None,
        "disclaimer": DISCLAIMER,
    }


_ENVELOPE_COLUMNS = (
    "model",
    "engine",
    "model_fingerprint",
    "final_answer",
    "answer",
    "parse_error",
    "n_images",
    "prompt_tokens",
    "completion_tokens",
    "finish_reason",
)


def parquet_schema() -> Any:
    """The pyarrow schema of results.parquet, from :data:`PARQUET_COLUMNS`."""
    pa = require_pyarrow()
    types = {"string": pa.string(), "int64": pa.int64(), "bool": pa.bool_(), "list<string>": pa.list_(pa.string())}
    return pa.schema([(name, types[kind]) for name, (kind, _) in PARQUET_COLUMNS.items()])


def write_parquet(out: Path, outcomes: list[Outcome]) -> list[Path]:
    """results.parquet: every row, results and failures, in manifest order."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([parquet_row(o) for o in outcomes], schema=parquet_schema())

    def write(handle: Any) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        handle.write(buffer.getvalue())

    return [write_atomic(out / PARQUET, write)]


def require_pyarrow() -> Any:
    """pyarrow, or a typed error saying how to install it."""
    try:
        import pyarrow
    except ImportError:
        raise MedlensError("--format parquet needs pyarrow: pip install 'medlens[scale]'") from None
    return pyarrow


#: output format -> writer(out folder, outcomes) -> written paths; jsonl is always written
FORMATS: Registry[Callable[[Path, list[Outcome]], list[Path]]] = Registry("batch output format")
FORMATS.add("jsonl", lambda out, outcomes: [])
FORMATS.add("parquet", write_parquet)
