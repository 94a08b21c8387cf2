"""A manifest row as :mod:`medlens.pipeline` stages: ``prepare`` is the task's build half (read, prepare,
build the requests, refuse or de-identify for a remote engine) on a CPU worker; ``requests`` the build's
prompts; ``finish`` the answer half (parse, a second stage on the loaded model, the envelope), exactly as
:func:`medlens.tasks.runner.run_task` makes it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from medlens.backends import Backend, BackendIdentity, GenerationOutput, GenerationRequest, load_backend
from medlens.batch.options import options_from_json
from medlens.pipeline import Unit
from medlens.tasks import get_task
from medlens.tasks.runner import (
    PreparedTask,
    answer_task,
    backend_identity,
    guard_task,
    prepare_task,
    task_requests,
)
from medlens.warnings_capture import capture_warnings


@dataclass
class PreparedRow:
    """A row's prepared task (its images travel to the model once) and the library warnings raised meanwhile."""

    task: PreparedTask
    caught: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BatchStages:
    """The stages of one batch run: names and settings only (pickled to the Ray workers)."""

    #: the model's identity (:class:`~medlens.backends.BackendIdentity` fields), for envelopes made where no
    #: model is loaded (Ray's own vLLM path)
    identity: dict[str, Any]
    #: requests leave this machine: burned-in images are refused and the text is de-identified by default
    remote: bool = False
    #: engine and engine options a reasoner model (``options.reasoner``) loads with
    engine: str = "transformers"
    reasoner_options: dict[str, Any] = field(default_factory=dict)

    def prepare(self, unit: Unit) -> PreparedRow:
        row = unit.row
        with capture_warnings() as caught:
            prepared = prepare_task(
                get_task(row["task"]), row["inputs"], row["question"], options_from_json(row["options"])
            )
            guard_task(prepared, self.remote)
        return PreparedRow(prepared, caught)

    def requests(self, unit: Unit, prepared: PreparedRow) -> list[GenerationRequest]:
        return task_requests(prepared.task)

    def finish(
        self, unit: Unit, prepared: PreparedRow, outputs: list[GenerationOutput], backend: Backend | None
    ) -> dict[str, Any]:
        identity = backend_identity(backend) if backend is not None else BackendIdentity(**self.identity)
        with capture_warnings() as caught:
            envelope = answer_task(prepared.task, outputs, identity, backend, reasoner=self.reasoner)
        spent = sum(o.timings.get("generate", 0.0) for o in outputs)
        if spent:
            envelope.timings["generate"] = round(spent, 4)
        envelope.warnings += [w for w in [*prepared.caught, *caught] if w not in envelope.warnings]
        return envelope.model_dump(mode="json")

    def reasoner(self, name: str) -> Backend:
        """The second-stage model ``name``, loaded once per process."""
        key = (name, self.engine, json.dumps(self.reasoner_options, sort_keys=True, default=str))
        if key not in _REASONERS:
            _REASONERS[key] = load_backend(name, self.engine, **self.reasoner_options)
        return _REASONERS[key]


#: reasoner models loaded in this process (a replica loads each once)
_REASONERS: dict[tuple[str, str, str], Backend] = {}
