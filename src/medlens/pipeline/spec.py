"""The pipeline's contract: units in, outcomes out, the stages a consumer supplies and how the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from medlens.backends import Backend, GenerationOutput, GenerationRequest, load_backend


@dataclass(frozen=True)
class BackendSpec:
    """How to load the model where it runs (the driver locally, each replica on Ray): picklable."""

    model: str
    engine: str = "transformers"
    options: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Backend:
        return load_backend(self.model, self.engine, **self.options)


@dataclass(frozen=True)
class RaySettings:
    """Where and how wide to run on Ray. ``address``: ``local`` (start a private Ray on this machine),
    ``auto`` (the cluster this machine belongs to) or a ``ray://host:port`` / ``host:port`` address."""

    address: str = "local"
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    cpus_per_prepare: float = 1.0
    #: CPUs of a private (``local``) Ray; None: all usable cores
    num_cpus: int | None = None
    #: a row whose worker process dies this many times while working on it alone (a native crash, an abort,
    #: out of memory) fails with ``WorkerCrashedError``; Ray retries the other rows of those tasks
    crash_attempts: int = 2


@dataclass(frozen=True)
class Unit:
    """One row of work: its journal key and the consumer's JSON-ready payload."""

    key: str
    row: dict[str, Any]


@dataclass
class Outcome:
    """What became of one unit: the consumer's record, or the error that failed only this row
    (``{"error": type name, "reason": one line, "stage": "prepare" | "answer"}``)."""

    key: str
    row: dict[str, Any]
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class Stages(Protocol):
    """A consumer's stages. The object is pickled to Ray workers, so keep it a plain dataclass whose fields
    are names and settings, not loaded models or open files.

    - ``prepare`` reads and prepares one unit on a CPU worker (raise :class:`~medlens.errors.MedlensError`
      for a bad input); what it returns travels to the model replica once.
    - ``requests`` are the unit's prompts (a task may ask several); the pipeline generates them, batched
      across units, on whichever engine runs the model.
    - ``finish`` turns the unit's outputs (one per request, in order) into its JSON-ready record. ``backend``
      is the loaded model when there is one (a second stage may ask it again); None on Ray's own vLLM path."""

    def prepare(self, unit: Unit) -> Any: ...

    def requests(self, unit: Unit, prepared: Any) -> list[GenerationRequest]: ...

    def finish(
        self, unit: Unit, prepared: Any, outputs: list[GenerationOutput], backend: Backend | None
    ) -> dict[str, Any]: ...
