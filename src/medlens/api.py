"""The Python API: prepare a study, ask MedGemma about it. The CLI is a thin layer over these."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medlens.backends import Backend, engine_options
from medlens.io.discover import unsafe_members
from medlens.prep import prepare_study, write_prepared
from medlens.progress import Reporter
from medlens.tasks import TaskBuild, TaskOptions, get_task
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
    on_build: Callable[[TaskBuild], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``task`` (default ``qa``: a question about one study) and return the result envelope as a dict.

    ``path`` is one input or a list (``compare`` takes prior and current). ``model`` is a built-in name
    (``test-tiny``), a local directory, a cached Hugging Face id, or a loaded
    :class:`~medlens.backends.Backend` (reused across calls). ``device``, ``dtype`` and ``model_args`` go to
    the engine when it loads the model. ``options`` are :class:`~medlens.tasks.TaskOptions` fields: recipe,
    series, modality, instruction, thinking, max_new_tokens, overlay, dpi, token_budget, reasoner, slide.
    ``on_build``, when given, is called with each :class:`~medlens.tasks.TaskBuild` the task makes (its
    requests hold the prepared images exactly as sent, and each request's parse context), e.g. to show them.
    Zip members skipped for safety are named in the envelope's warnings.
    """
    inputs = [path] if isinstance(path, str | Path) else list(path)
    chosen = get_task(task)
    if on_build is not None:
        chosen.build = _watched(chosen.build, on_build)  # type: ignore[method-assign]
    envelope = run_task(
        chosen,
        inputs,
        question,
        model,
        TaskOptions(**options),
        engine=engine,
        reporter=reporter,
        backend_options=engine_options(device, dtype, model_args),
    )
    unsafe = [line for p in inputs if str(p).lower().endswith(".zip") for line in unsafe_members(p)]
    envelope.warnings[:0] = [w for w in unsafe if w not in envelope.warnings]
    return envelope.model_dump(mode="json")


def finetune(
    config: str | Path,
    overrides: Sequence[str] = (),
    *,
    say: Callable[[str], None] = lambda line: None,
    callbacks: Sequence[Any] = (),
) -> Any:
    """Run the fine-tuning recipe of ``config`` (a YAML file or a shipped config name) with ``key=value``
    overrides; returns the :class:`~medlens.finetune.recipe.FinetuneResult`. A benchmark's split as training
    data comes from the benchmark's own hook (:mod:`medlens.eval.training_rows`)."""
    from medlens.finetune.config import load_config
    from medlens.finetune.recipe import run

    return run(load_config(config, list(overrides)), benchmark_examples, say, callbacks)


def benchmark_examples(data: Any, split: str) -> list[Any]:
    """The examples of ``data.benchmark``'s ``split`` for the fine-tuning recipe (eval's requests, as rows)."""
    from medlens.eval.training_rows import training_items
    from medlens.finetune.examples import Example
    from medlens.finetune.manifest import TrainRow

    items = training_items(data.benchmark, split, data.root, data.recipe, None)
    base = Path.cwd()
    return [
        Example(
            item.id,
            item.answer,
            item.messages,
            TrainRow(item.id, list(item.inputs), f"benchmark:{item.benchmark}", item.question, item.answer, {}, base),
            {"task": f"benchmark:{item.benchmark}"},
        )
        for item in items
    ]


def _watched(build: Callable[..., TaskBuild], on_build: Callable[[TaskBuild], None]) -> Callable[..., TaskBuild]:
    def run(*args: Any, **kwargs: Any) -> TaskBuild:
        made = build(*args, **kwargs)
        on_build(made)
        return made

    return run


__all__ = ["ask", "finetune", "prepare_study", "write_prepared"]
