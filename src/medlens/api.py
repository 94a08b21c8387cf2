"""The Python API: prepare a study, ask MedGemma about it. The CLI is a thin layer over these."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medlens.backends import Backend, engine_options
from medlens.prep import prepare_study, write_prepared
from medlens.progress import Reporter
from medlens.tasks import TaskOptions, get_task
from medlens.tasks.runner import run_task


def ask(
    path: str | Path | Sequence[str | Path],
    question: str | None,
    model: str | Backend = "test-tiny",
    *,
    task: str = "qa",
    engine: str = "transformers",
    reporter: Reporter | None = None,
    device: str = "auto",
    dtype: str = "auto",
    model_args: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``task`` (default ``qa``: a question about one study) and return the result envelope as a dict.

    ``path`` is one input or a list (``compare`` takes prior and current). ``model`` is a built-in name
    (``test-tiny``), a local directory, a cached Hugging Face id, or a loaded
    :class:`~medlens.backends.Backend` (reused across calls). ``device``, ``dtype`` and ``model_args`` go to
    the engine when it loads the model. ``options`` are :class:`~medlens.tasks.TaskOptions` fields: recipe,
    series, modality, instruction, thinking, max_new_tokens, overlay, dpi, token_budget, reasoner, slide.
    """
    inputs = [path] if isinstance(path, str | Path) else list(path)
    envelope = run_task(
        get_task(task),
        inputs,
        question,
        model,
        TaskOptions(**options),
        engine=engine,
        reporter=reporter,
        backend_options=engine_options(device, dtype, model_args),
    )
    return envelope.model_dump(mode="json")


__all__ = ["ask", "prepare_study", "write_prepared"]
