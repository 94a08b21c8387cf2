"""Which rows took their worker down: a small Ray actor that counts, per stage and row, the attempts that
started and never finished. Ray retries a task whose worker died (Ray Data: without limit); before working
on a row a worker asks how many earlier attempts at it were cut short, so a row that kills its worker every
time (a native decoder abort, a crash in generation) fails after ``RaySettings.crash_attempts`` with an error
saying so, while the other rows of the run go on. Plain Python here; :func:`start_ledger` makes the actor."""

from __future__ import annotations

import uuid
from typing import Any


class Ledger:
    """Open attempts per ``(stage, row index)``; an attempt is open from :meth:`start` to :meth:`done`."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, int], int] = {}

    def start(self, stage: str, indices: list[int]) -> list[int]:
        """Open an attempt at each row; for each, the earlier attempts that never finished (their worker died)."""
        earlier = []
        for index in indices:
            count = self._open.get((stage, index), 0)
            earlier.append(count)
            self._open[(stage, index)] = count + 1
        return earlier

    def done(self, stage: str, indices: list[int]) -> None:
        """The attempts at these rows finished (with a result or a typed error)."""
        for index in indices:
            self._open.pop((stage, index), None)


def start_ledger(ray: Any) -> tuple[Any, str]:
    """A ledger actor for one run (no CPU of its own, on this node) and its name, by which workers find it."""
    name = f"medlens-ledger-{uuid.uuid4().hex[:12]}"
    actor = ray.remote(num_cpus=0, max_restarts=0)(Ledger).options(name=name).remote()
    return actor, name


def ledger_named(name: str) -> Any:
    """The run's ledger, from a worker (cached per process)."""
    import ray

    found = _HANDLES.get(name)
    if found is None:
        found = _HANDLES[name] = ray.get_actor(name)
    return found


_HANDLES: dict[str, Any] = {}
