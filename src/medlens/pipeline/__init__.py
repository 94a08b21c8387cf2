"""Run rows through "prepare on CPU, answer on a loaded model" locally or on a Ray cluster: the machinery
``medlens batch`` and ``medlens eval --ray`` share. Consumers supply the stages (:class:`Stages`); the
pipeline owns scheduling, per-row failure isolation and progress. Ray is imported only by the Ray runner."""

from medlens.pipeline.run import run_pipeline
from medlens.pipeline.spec import BackendSpec, Outcome, RaySettings, Stages, Unit

__all__ = ["BackendSpec", "Outcome", "RaySettings", "Stages", "Unit", "run_pipeline"]
