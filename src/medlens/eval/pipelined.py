"""The items a run lacks, generated through :func:`medlens.pipeline.run_pipeline` (``medlens eval --ray``).

The driver journals each study's records the moment its outcome arrives, under the keys a local run uses, so
local and Ray runs share one journal and a rerun after a killed driver does only what is missing. A study that
fails (a corrupt file, a request the engine refuses) fails only its items: the run finishes the others, then
raises :class:`ItemsFailedError` naming the failed items, of the failures' own type when they share one
(``except CorruptFileError`` still catches it). A replica whose weights are not those the keys were made
for (another node's model cache) stops the run before anything of it is journaled.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medlens.backends import Backend
from medlens.errors import MedlensError
from medlens.eval.kinds import Item
from medlens.eval.stages import EvalStages
from medlens.journal import Journal
from medlens.pipeline import BackendSpec, Outcome, RaySettings, Unit, run_pipeline
from medlens.progress import Reporter

#: failed items named in the error (the rest are counted)
NAMED_FAILURES = 5


class ItemsFailedError(MedlensError):
    """Some items of a run failed; the others are journaled. ``failures``: item id -> its error record."""

    def __init__(self, reason: str, failures: dict[str, dict[str, Any]]) -> None:
        MedlensError.__init__(self, reason)
        self.failures = failures


def study_units(todo: list[int], items: list[Item], files: list[list[Path]], keys: list[str]) -> list[Unit]:
    """The items of ``todo`` as pipeline units: consecutive items about the same (non-empty) input files form
    one unit, so a study is prepared once and its questions share its prefix; a text item is its own unit."""
    groups: list[list[int]] = []
    for i in todo:
        if groups and files[i] and files[i] == files[groups[-1][-1]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    units = []
    for number, group in enumerate(groups):
        members = [items[i] for i in group]
        digest = hashlib.sha256("|".join(keys[i] for i in group).encode()).hexdigest()[:16]
        units.append(Unit(f"{number}-{digest}", {"items": members, "keys": [keys[i] for i in group]}))
    return units


def generate_on_pipeline(
    journal: Journal,
    stages: EvalStages,
    units: list[Unit],
    backend: Backend | BackendSpec,
    *,
    revision: str,
    ray: RaySettings | None,
    batch_size: int,
    reporter: Reporter,
    title: str,
) -> dict[str, float]:
    """Run ``units`` (see :func:`study_units`) and journal every record as its study finishes; ``batch_size``
    counts requests, as in a local run. Raises :class:`ItemsFailedError` at the end when items failed."""
    failures: dict[str, dict[str, Any]] = {}
    journaled = [0]

    def on_outcome(outcome: Outcome) -> None:
        if not outcome.ok:
            for item in outcome.row["items"]:
                failures[str(item["id"])] = dict(outcome.error or {})
            return
        result = outcome.result or {}
        if result.get("revision") not in (None, revision):
            raise MedlensError(
                f"a replica loaded model revision {result['revision']}, not {revision} as on the driver: give "
                "every node the same weights (nothing of this study was journaled)"
            )
        for record in result["records"]:
            journal.add(record)
            journaled[0] += 1
        for line in result.get("warnings", []):
            warnings.warn(line, stacklevel=2)

    requests = sum(len(unit.row["items"]) for unit in units)
    per_batch = max(1, round(batch_size * len(units) / max(1, requests)))
    summary = run_pipeline(
        units, stages, backend, on_outcome=on_outcome, ray=ray, batch_size=per_batch, reporter=reporter, title=title
    )
    if failures:
        raise failed_items(failures, journaled[0])
    return summary


def failed_items(failures: dict[str, dict[str, Any]], journaled: int) -> ItemsFailedError:
    """One error naming the failed items and why, of their error type when they all share a typed one."""
    named = []
    for item_id, error in list(failures.items())[:NAMED_FAILURES]:
        where = f"{error['path']}: " if error.get("path") and error["path"] not in error["reason"] else ""
        named.append(f"item {item_id}: {error['error']}: {where}{error['reason']}")
    more = f"; and {len(failures) - NAMED_FAILURES} more" if len(failures) > NAMED_FAILURES else ""
    reason = (
        f"{len(failures)} items failed ({journaled} outputs journaled; rerun the same command to retry the failed "
        f"ones): {'; '.join(named)}{more}"
    )
    types = {_typed(error) for error in failures.values()}
    kind = types.pop() if len(types) == 1 else None
    cls = _combined(kind) if kind is not None else ItemsFailedError
    return cls(reason, failures)


def _typed(error: dict[str, Any]) -> type[MedlensError] | None:
    """The medlens error class an error record names (``GenerationFailed[X]`` names X), else None."""
    if error.get("untyped"):
        return None
    name = str(error.get("error", ""))
    if name.startswith("GenerationFailed[") and name.endswith("]"):
        name = name[len("GenerationFailed[") : -1]
    return _error_classes().get(name)


def _error_classes() -> dict[str, type[MedlensError]]:
    """Every loaded medlens error class made like :class:`MedlensError` (reason, path), by name."""
    found: dict[str, type[MedlensError]] = {}
    pending: list[type[MedlensError]] = [MedlensError]
    while pending:
        cls = pending.pop()
        if cls.__init__ is MedlensError.__init__:
            found.setdefault(cls.__name__, cls)
        pending.extend(cls.__subclasses__())
    return found


@functools.cache
def _combined(kind: type[MedlensError]) -> Callable[..., ItemsFailedError]:
    if issubclass(ItemsFailedError, kind):
        return ItemsFailedError
    return type(f"ItemsFailedError[{kind.__name__}]", (ItemsFailedError, kind), {"__module__": __name__})
