"""Generation on an actor pool of any medlens backend: ``replicas`` actors, each loading the model once (the
``BackendSpec``) and answering batches of prepared rows with the local runner's per-row isolation
(:func:`~medlens.pipeline.failures.answer_batch`). A batch whose earlier attempt took its actor down is
answered one row at a time, so that only the row that kills the process fails (after ``crash_attempts``)."""

from __future__ import annotations

import pickle
from typing import Any

from medlens.pipeline.failures import answer_batch
from medlens.pipeline.ray_rows import ANSWER, BATCH, AttemptLedger, RemoteLedger, crashed, unpack
from medlens.pipeline.spec import BackendSpec, Outcome, RaySettings, Stages, Unit

#: what a replica sends back per row: ``index`` and the pickled ``(result, error)``
RowOutcome = tuple[int, dict[str, Any] | None, dict[str, Any] | None]


class Replica:
    """One model replica (a Ray Data actor): ``__call__`` takes a pyarrow batch of prepared rows."""

    def __init__(self, stages: Stages, spec: BackendSpec, ledger: AttemptLedger, crash_attempts: int) -> None:
        self.stages, self.ledger, self.crash_attempts = stages, ledger, crash_attempts
        self.backend = spec.load()

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        outcomes = self.answer(
            [int(i) for i in batch.column("index").to_pylist()],
            [pickle.loads(u) for u in batch.column("unit").to_pylist()],
            batch.column("payload").to_pylist(),
        )
        return pa.table(
            {
                "index": pa.array([index for index, _, _ in outcomes], pa.int64()),
                "outcome": pa.array(
                    [pickle.dumps((result, error), protocol=5) for _, result, error in outcomes], pa.large_binary()
                ),
            }
        )

    def answer(self, indices: list[int], units: list[Unit], payloads: list[bytes]) -> list[RowOutcome]:
        """Each row's ``(index, result, error)``: rows that failed to prepare pass through with their error."""
        outcomes: list[RowOutcome] = []
        ready: list[tuple[int, Unit, Any]] = []
        for index, unit, payload in zip(indices, units, payloads, strict=True):
            prepared, error = unpack(payload)
            if error is not None:
                outcomes.append((index, None, error))
            else:
                ready.append((index, unit, prepared))
        if not ready:
            return outcomes
        numbers = [index for index, _, _ in ready]
        if len(ready) > 1 and max(self.ledger.start(BATCH, numbers)) == 0:
            outcomes.extend(self._answer(ready))
        else:  # one row, or a batch that took a replica down before: a row at a time, the culprit known
            for item in ready:
                earlier = self.ledger.start(ANSWER, [item[0]])[0]
                if earlier >= self.crash_attempts:
                    outcomes.append((item[0], None, crashed(ANSWER, earlier)))
                else:
                    outcomes.extend(self._answer([item]))
                self.ledger.done(ANSWER, [item[0]])
        if len(ready) > 1:
            self.ledger.done(BATCH, numbers)
        return outcomes

    def _answer(self, ready: list[tuple[int, Unit, Any]]) -> list[RowOutcome]:
        made: list[Outcome] = []
        answer_batch(self.stages, self.backend, [u for _, u, _ in ready], [p for _, _, p in ready], made.append)
        # answer_batch hands over exactly one outcome per unit, in the units' order
        return [(index, o.result, o.error) for (index, _, _), o in zip(ready, made, strict=True)]


class ReplicaStage:
    """The generation stage on an actor pool of medlens backends (any engine)."""

    name = "replicas"

    def __init__(self, stages: Stages, spec: BackendSpec, settings: RaySettings, batch_size: int, ledger: str) -> None:
        self.stages, self.spec, self.settings, self.batch_size, self.ledger = stages, spec, settings, batch_size, ledger

    @staticmethod
    def fits(spec: BackendSpec, settings: RaySettings) -> bool:
        """Every engine runs as replicas."""
        return True

    def build(self, dataset: Any) -> Any:
        import ray.data

        return dataset.map_batches(
            Replica,
            fn_constructor_kwargs={
                "stages": self.stages,
                "spec": self.spec,
                "ledger": RemoteLedger(self.ledger),
                "crash_attempts": self.settings.crash_attempts,
            },
            batch_size=max(1, self.batch_size),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=max(1, self.settings.replicas)),
            num_cpus=self.settings.cpus_per_replica,
            num_gpus=self.settings.gpus_per_replica or None,
        )

    def collect(self, row: dict[str, Any]) -> list[RowOutcome]:
        """The outcome a result row carries."""
        result, error = pickle.loads(row["outcome"])
        return [(int(row["index"]), result, error)]

    def finish_all(self) -> list[RowOutcome]:
        """Nothing is held back on this path."""
        return []
