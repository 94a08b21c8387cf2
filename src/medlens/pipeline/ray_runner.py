"""The Ray runner: the same units, stages and outcomes as the local runner, on a Ray cluster.

A Ray Data pipeline of three parts: the units (one per block), a ``map`` that prepares each on a CPU worker
(``cpus_per_prepare`` CPUs; the prepared object is pickled once into the object store), and a generation
stage chosen by registry (:data:`GENERATION`): an actor pool of medlens backends, or Ray Data LLM's vLLM
processor for the vllm engine on GPUs. The driver iterates the results as they stream in, hands each
unit's outcome over once (a retried task never gives a second one) and, at the end, an error for every
unit whose result never came back. Ray retries tasks whose worker died; the run's ledger
(:mod:`~medlens.pipeline.ray_ledger`) stops a row that kills its worker every time."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from medlens.backends import Backend
from medlens.errors import MedlensError
from medlens.pipeline.ray_ledger import start_ledger
from medlens.pipeline.ray_rows import ANSWER, PREPARE, RemoteLedger, prepare_row, unit_rows
from medlens.pipeline.ray_session import BlockErrors, connect, import_ray, quiet_data, typed_error
from medlens.pipeline.spec import BackendSpec, Outcome, RaySettings, Stages, Unit
from medlens.registry import Registry

#: generation stages, "module:class"; the first in :data:`PREFERENCE` whose ``fits`` accepts the run is used
GENERATION: Registry[str] = Registry("Ray generation stage")
GENERATION.add("vllm", "medlens.pipeline.ray_vllm:VLLMStage")
GENERATION.add("replicas", "medlens.pipeline.ray_replicas:ReplicaStage")
PREFERENCE = ("vllm", "replicas")


def generation_stage(spec: BackendSpec, settings: RaySettings) -> type:
    """The class of the generation stage for this model and these settings."""
    for name in PREFERENCE:
        module, attr = GENERATION.get(name).split(":")
        stage = getattr(importlib.import_module(module), attr)
        if stage.fits(spec, settings):
            return stage
    raise MedlensError(f"no Ray generation stage runs engine {spec.engine}")  # "replicas" runs every engine


def run_ray(
    units: Iterable[Unit],
    stages: Stages,
    backend: Backend | BackendSpec,
    *,
    batch_size: int,
    on_outcome: Callable[[Outcome], None],
    settings: RaySettings,
) -> None:
    """Run every unit on the Ray cluster of ``settings``, calling ``on_outcome`` here, once per unit, in
    completion order."""
    if not isinstance(backend, BackendSpec):
        raise MedlensError(
            "on Ray each replica loads the model itself: give the runner a BackendSpec (model, engine, options), "
            "not a loaded backend"
        )
    units = list(units)
    if not units:
        return
    ray = import_ray()
    stage_class = generation_stage(backend, settings)
    started = connect(settings)
    ledger = None
    try:
        with quiet_data() as block_errors:
            ledger, name = start_ledger(ray)
            stage = stage_class(stages, backend, settings, batch_size, name)
            dataset = ray.data.from_items(unit_rows(units), override_num_blocks=len(units))
            dataset = dataset.map(
                prepare_row,
                fn_kwargs={
                    "stages": stages,
                    "ledger": RemoteLedger(name),
                    "crash_attempts": settings.crash_attempts,
                    "decode_workers": max(1, int(settings.cpus_per_prepare)),
                },
                num_cpus=settings.cpus_per_prepare,
                # a runtime env of its own keeps Ray Data from fusing preparation into the replicas (both
                # would then run in the actor, one after the other)
                runtime_env={"env_vars": {"MEDLENS_RAY_STAGE": PREPARE}},
            )
            seen: set[int] = set()

            def hand(index: int, result: dict[str, Any] | None, error: dict[str, Any] | None) -> None:
                if index not in seen:
                    seen.add(index)
                    on_outcome(Outcome(units[index].key, units[index].row, result=result, error=error))

            for row in _rows(stage.build(dataset)):
                for outcome in stage.collect(row):
                    hand(*outcome)
            for outcome in stage.finish_all():
                hand(*outcome)
            for index in range(len(units)):
                if index not in seen:
                    hand(index, None, lost(block_errors))
    finally:
        if ledger is not None:
            ray.kill(ledger)
        if started:
            ray.shutdown()


def _rows(dataset: Any) -> Iterator[dict[str, Any]]:
    """The result rows as they stream in; a failure of the run itself as its typed error."""
    try:
        for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            yield from batch.to_pylist()
    except MedlensError:
        raise
    except Exception as exc:  # RayTaskError, UserCodeException ... around the cause
        raise typed_error(exc) from None


def lost(errors: BlockErrors) -> dict[str, Any]:
    """The error of a unit whose result never came back: the task that held it failed for good."""
    if not errors.seen:
        return {"error": "LostRowError", "reason": "its result never came back from the Ray cluster", "stage": ANSWER}
    message, error = errors.seen[-1]
    stage = PREPARE if all("prepare_row" in m for m, _ in errors.seen) else ANSWER
    return {
        "error": "LostRowError",
        "reason": f"the Ray task that held it failed for good ({error or message})",
        "stage": stage,
        "untyped": True,
    }
