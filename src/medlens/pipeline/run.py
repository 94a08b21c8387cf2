"""One entry point for both runners, chosen by registry (``local`` here, ``ray`` on a cluster)."""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from medlens.backends import Backend
from medlens.pipeline.spec import BackendSpec, Outcome, RaySettings, Stages, Unit
from medlens.progress import Reporter
from medlens.registry import Registry

#: runner name -> "module:function" (imported when used: the Ray runner imports ray)
RUNNERS: Registry[str] = Registry("pipeline runner")
RUNNERS.add("local", "medlens.pipeline.local:run_local")
RUNNERS.add("ray", "medlens.pipeline.ray_runner:run_ray")


def run_pipeline(
    units: list[Unit],
    stages: Stages,
    backend: Backend | BackendSpec,
    *,
    on_outcome: Callable[[Outcome], None],
    ray: RaySettings | None = None,
    batch_size: int = 8,
    reporter: Reporter | None = None,
    title: str = "rows",
) -> dict[str, float]:
    """Run ``units`` through ``stages`` on ``backend``, locally or (``ray`` given) on a Ray cluster, calling
    ``on_outcome`` on this process for every unit as it finishes, in completion order. Progress shows rows
    done, rows/s and failures. Returns the counts and the wall time."""
    reporter = reporter or Reporter(False)
    counts = {"done": 0, "failed": 0}
    start = time.perf_counter()
    with reporter.stage(f"{title}: 0 done", total=len(units)) as update:

        def record(outcome: Outcome) -> None:
            on_outcome(outcome)
            counts["done"] += 1
            counts["failed"] += 0 if outcome.ok else 1
            update(counts["done"], len(units))

        module, attr = RUNNERS.get("ray" if ray is not None else "local").split(":")
        run = getattr(importlib.import_module(module), attr)
        extra = {"settings": ray} if ray is not None else {}
        run(units, stages, backend, batch_size=batch_size, on_outcome=record, **extra)
    wall = time.perf_counter() - start
    return {"rows": len(units), "done": counts["done"], "failed": counts["failed"], "wall_s": round(wall, 3)}
