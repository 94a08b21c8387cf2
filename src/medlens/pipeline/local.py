"""The local runner: prepare a batch of units in this process, answer it, hand each outcome over as it is
made (so the caller journals it at once), then the next batch: memory stays that of one batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from medlens.backends import Backend
from medlens.pipeline.failures import answer_batch, prepare_one
from medlens.pipeline.spec import BackendSpec, Outcome, Stages, Unit


def run_local(
    units: Iterable[Unit],
    stages: Stages,
    backend: Backend | BackendSpec,
    *,
    batch_size: int,
    on_outcome: Callable[[Outcome], None],
) -> None:
    """Run every unit; the backend loads (from its spec) only when a unit is left to answer."""
    loaded: Backend | None = backend if isinstance(backend, Backend) else None
    for batch in _batches(units, batch_size):
        ready: list[tuple[Unit, object]] = []
        for unit in batch:
            prepared, error = prepare_one(stages, unit)
            if error is not None:
                on_outcome(Outcome(unit.key, unit.row, error=error))
            else:
                ready.append((unit, prepared))
        if not ready:
            continue
        if loaded is None:
            assert isinstance(backend, BackendSpec)
            loaded = backend.load()  # a model that fails to load fails the run (every row needs it)
        answer_batch(stages, loaded, [u for u, _ in ready], [p for _, p in ready], on_outcome)


def _batches(units: Iterable[Unit], size: int) -> Iterator[list[Unit]]:
    batch: list[Unit] = []
    for unit in units:
        batch.append(unit)
        if len(batch) >= max(1, size):
            yield batch
            batch = []
    if batch:
        yield batch
