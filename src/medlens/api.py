"""The Python API: prepare a study, ask MedGemma about it. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.backends import Backend, GenerationRequest, load_backend
from medlens.io import open_input
from medlens.prep import DEFAULT_RECIPE, RECIPES, Prepared, prepare
from medlens.privacy import short_hash
from medlens.progress import Reporter, Timer
from medlens.prompts import auto_final_answer, messages_for, split_thinking


def prepare_study(
    path: str | Path,
    recipe: str = DEFAULT_RECIPE,
    series: str | None = None,
    modality: str | None = None,
    reporter: Reporter | None = None,
    timer: Timer | None = None,
) -> Prepared:
    """Read ``path`` and turn it into the images the model sees (see ``medlens.prep``)."""
    RECIPES.get(recipe)  # an unknown recipe fails before any file is read
    reporter = reporter or Reporter(False)
    timer = timer or Timer()
    with timer("read"), reporter.stage("Reading headers") as update:
        stack = open_input(path, series=series, modality=modality, progress=update)
    with timer("prepare"), reporter.stage(f"Preparing ({recipe})"):
        return prepare(stack, recipe)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    """Write ``0001.png, 0002.png, ...`` (RGB, prompt order, before any resize) and ``manifest.json``."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"{i:04d}.png" for i in range(1, len(prepared.images) + 1)]

    def save(name: str, image: np.ndarray) -> None:
        Image.fromarray(image, mode="RGB").save(out / name, compress_level=1)

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # zlib releases the GIL
        list(pool.map(save, names, prepared.images))
    manifest = {**prepared.manifest(names), "medlens_version": __version__, "disclaimer": DISCLAIMER}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def ask(
    path: str | Path,
    question: str,
    model: str | Backend = "test-tiny",
    *,
    engine: str = "transformers",
    recipe: str = DEFAULT_RECIPE,
    series: str | None = None,
    modality: str | None = None,
    instruction: str | None = None,
    thinking: bool = False,
    max_new_tokens: int | None = None,
    reporter: Reporter | None = None,
) -> dict[str, Any]:
    """Prepare ``path`` exactly as MedGemma 1.5 expects, ask ``question``, return the parsed result.

    ``model`` is a built-in name (``test-tiny``), a local directory, a cached Hugging Face id, or an
    already loaded :class:`~medlens.backends.Backend` (reused across calls).
    """
    reporter = reporter or Reporter(False)
    timer = Timer()
    prepared = prepare_study(path, recipe, series, modality, reporter, timer)
    messages = messages_for(prepared, question, instruction=instruction, thinking=thinking)
    if isinstance(model, Backend):
        backend = model
    else:
        with timer("load_model"), reporter.stage(f"Loading {model}"):
            backend = load_backend(model, engine)
    with timer("generate"), reporter.stage("Generating", total=1) as update:
        request = GenerationRequest(messages, max_new_tokens=max_new_tokens)
        output = backend.generate([request], progress=lambda n: update(n, 1))[0]
    split = split_thinking(output.text)
    warnings = list(prepared.warnings)
    if backend.is_test_model:
        from medlens.backends.models import TEST_MODEL_WARNING

        warnings.insert(0, TEST_MODEL_WARNING)
    if output.finish_reason == "length":
        warnings.append("the answer was cut at max_new_tokens")
    return {
        "answer": split.answer,
        "final_answer": auto_final_answer(split.answer, question),
        "thinking": split.thinking,
        "model": backend.model_name,
        "engine": backend.engine,
        "untrained_test_model": backend.is_test_model,
        "recipe": prepared.recipe,
        "modality": prepared.modality,
        "series": short_hash(prepared.series_uid) if prepared.series_uid else None,
        "n_images": len(prepared.images),
        "n_source_slices": prepared.n_source_slices,
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "finish_reason": output.finish_reason,
        "timings": timer.seconds,
        "warnings": warnings,
        "medlens_version": __version__,
        "disclaimer": DISCLAIMER,
    }
