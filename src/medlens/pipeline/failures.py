"""Per-row failure isolation shared by the local and the Ray runner: an exception becomes that row's error."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medlens.backends import Backend
from medlens.errors import MedlensError
from medlens.pipeline.spec import Outcome, Stages, Unit


def describe(exc: BaseException, stage: str) -> dict[str, Any]:
    """A row's error record: the typed error's name and its one-line reason (untyped exceptions say so)."""
    reason = str(exc).replace("\n", " ").strip() or type(exc).__name__
    record: dict[str, Any] = {"error": type(exc).__name__, "reason": reason, "stage": stage}
    if not isinstance(exc, MedlensError):
        record["untyped"] = True
    path = getattr(exc, "path", None)
    if path:
        record["path"] = str(path)
    return record


def prepare_one(stages: Stages, unit: Unit) -> tuple[Any, dict[str, Any] | None]:
    """``stages.prepare`` for one unit: (prepared, None) or (None, error record)."""
    try:
        return stages.prepare(unit), None
    except Exception as exc:  # one bad study fails only its row
        return None, describe(exc, "prepare")


def answer_batch(
    stages: Stages, backend: Backend, units: list[Unit], prepared: list[Any], on_outcome: Callable[[Outcome], None]
) -> None:
    """Generate every request of a batch of units in one call, then finish each unit; when the batch fails,
    answer its units one by one so only the bad one fails (a prompt over the context, a parser bug)."""
    try:
        records = _answer(stages, backend, units, prepared)
    except Exception as exc:
        if len(units) == 1:
            on_outcome(Outcome(units[0].key, units[0].row, error=describe(exc, "answer")))
            return
        for unit, one in zip(units, prepared, strict=True):
            answer_batch(stages, backend, [unit], [one], on_outcome)
        return
    for unit, record in zip(units, records, strict=True):
        on_outcome(Outcome(unit.key, unit.row, result=record))


def _answer(stages: Stages, backend: Backend, units: list[Unit], prepared: list[Any]) -> list[dict[str, Any]]:
    per_unit = [stages.requests(unit, one) for unit, one in zip(units, prepared, strict=True)]
    outputs = backend.generate([request for requests in per_unit for request in requests])
    records, start = [], 0
    for unit, one, requests in zip(units, prepared, per_unit, strict=True):
        mine = list(outputs[start : start + len(requests)])
        start += len(requests)
        records.append(stages.finish(unit, one, mine, backend))
    return records
