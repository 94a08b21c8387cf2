"""What travels between the Ray stages, and the preparation step. A dataset row is ``index`` (the unit's
place in the run), ``unit`` (the pickled :class:`Unit`) and, once prepared, ``payload``: the prepared object
(or the row's error) pickled once, with protocol 5, into one binary column, so Ray Data stores it in the
object store as it is and never converts it (arrays of any shape, the consumer's own dataclasses)."""

from __future__ import annotations

import pickle
from typing import Any, Protocol

from medlens.pipeline.failures import describe, prepare_one
from medlens.pipeline.spec import Stages, Unit

PREPARE = "prepare"
ANSWER = "answer"
#: ledger stage of a whole generation batch (a crash there says nothing about which row caused it)
BATCH = "batch"
#: error name of a row whose worker process died on every attempt
CRASHED = "WorkerCrashedError"
_DOING = {PREPARE: "preparing", ANSWER: "answering"}


class AttemptLedger(Protocol):
    """:class:`~medlens.pipeline.ray_ledger.Ledger`'s calls, made locally or on the actor."""

    def start(self, stage: str, indices: list[int]) -> list[int]: ...

    def done(self, stage: str, indices: list[int]) -> None: ...


class RemoteLedger:
    """The run's ledger actor, found by name and called synchronously (a worker may die right after)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, stage: str, indices: list[int]) -> list[int]:
        import ray

        from medlens.pipeline.ray_ledger import ledger_named

        return ray.get(ledger_named(self.name).start.remote(stage, indices))

    def done(self, stage: str, indices: list[int]) -> None:
        import ray

        from medlens.pipeline.ray_ledger import ledger_named

        ray.get(ledger_named(self.name).done.remote(stage, indices))


def unit_rows(units: list[Unit]) -> list[dict[str, Any]]:
    """The run's input rows, one per unit."""
    return [{"index": index, "unit": pickle.dumps(unit, protocol=5)} for index, unit in enumerate(units)]


def crashed(stage: str, times: int) -> dict[str, Any]:
    """The error of a row whose worker died ``times`` times while working on it alone."""
    return {
        "error": CRASHED,
        "reason": f"the worker process died {times} times while {_DOING[stage]} this row (a native crash, an "
        "abort or running out of memory); it was not tried again",
        "stage": stage,
    }


def pack(prepared: Any, error: dict[str, Any] | None) -> bytes:
    """``(prepared, error)`` pickled once; a prepared object that cannot be pickled fails its row."""
    try:
        return pickle.dumps((prepared, error), protocol=5)
    except Exception as exc:  # an open file, a lock, a lambda in the consumer's prepared object
        failed = describe(exc, PREPARE)
        failed["reason"] = f"the prepared row cannot be sent to a model replica: {failed['reason']}"
        return pickle.dumps((None, failed), protocol=5)


def unpack(payload: bytes) -> tuple[Any, dict[str, Any] | None]:
    """The ``(prepared, error)`` of :func:`pack`."""
    return pickle.loads(payload)


def prepare_row(
    row: dict[str, Any], *, stages: Stages, ledger: AttemptLedger, crash_attempts: int, decode_workers: int
) -> dict[str, Any]:
    """The preparation step (a Ray Data ``map`` over one-row blocks, on a CPU worker): the unit prepared,
    or its error; a unit whose earlier attempts took their worker down ``crash_attempts`` times is not tried
    again and fails with :func:`crashed`. The worker's decode pool gets ``decode_workers`` processes (its
    CPUs on Ray), not one per core of the node: Ray runs several preparations side by side."""
    size_decode_pool(decode_workers)
    index = int(row["index"])
    earlier = ledger.start(PREPARE, [index])[0]
    if earlier >= crash_attempts:
        payload = pack(None, crashed(PREPARE, earlier))
    else:
        payload = pack(*prepare_one(stages, pickle.loads(row["unit"])))
    ledger.done(PREPARE, [index])
    return {"index": index, "unit": row["unit"], "payload": payload}


def size_decode_pool(workers: int) -> None:
    """This process's shared decode pool with ``workers`` processes (a no-op once it has them)."""
    from medlens.io import worker_pool

    current = worker_pool.settings()
    if current.workers != workers:
        worker_pool.configure(workers, current.memory_mb)
