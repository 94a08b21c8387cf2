"""The Python API: prepare a study, ask MedGemma about it. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.backends import Backend
from medlens.errors import UnsupportedInputError
from medlens.io import discover_input, open_input
from medlens.prep import DEFAULT_RECIPE, RECIPES, Prepared, prepare
from medlens.prep.slide_recipe import SlideOptions
from medlens.progress import Reporter, Timer


def prepare_study(
    path: str | Path,
    recipe: str = DEFAULT_RECIPE,
    series: str | None = None,
    modality: str | None = None,
    reporter: Reporter | None = None,
    timer: Timer | None = None,
    slide: SlideOptions | None = None,
) -> Prepared:
    """Read ``path`` and turn it into the images the model sees (see ``medlens.prep``). Whole-slide images
    (OpenSlide formats, DICOM WSI) go through the recipe's slide part with ``slide`` options."""
    from medlens.io.slide import find_slide

    spec = RECIPES.get(recipe)  # an unknown recipe fails before any file is read
    reporter = reporter or Reporter(False)
    timer = timer or Timer()
    with timer("read"):
        found = discover_input(path)
        slide_spec = find_slide(path, found)
    if slide_spec is not None:
        if spec.slide is None:
            raise UnsupportedInputError(f"recipe {recipe} has no whole-slide part", str(path))
        with timer("prepare"), reporter.stage(f"Reading slide patches ({recipe})") as update:
            return spec.slide(slide_spec, recipe, slide, update)
    with timer("read"), reporter.stage("Reading headers") as update:
        stack = open_input(path, series=series, modality=modality, progress=update, found=found)
    with timer("prepare"), reporter.stage(f"Preparing ({recipe})"):
        return prepare(stack, recipe)


def write_prepared(prepared: Prepared, out_dir: str | Path) -> Path:
    """Write ``0001.png, 0002.png, ...`` (RGB, prompt order, before any resize) and ``manifest.json``; and
    ``overview.png`` when the recipe drew one (whole slides: thumbnail, tissue mask, chosen patches)."""
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
    if prepared.overview is not None:
        save("overview.png", prepared.overview)
        manifest["overview"] = "overview.png"
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def ask(
    path: str | Path | Sequence[str | Path],
    question: str | None,
    model: str | Backend = "test-tiny",
    *,
    task: str = "qa",
    engine: str = "transformers",
    reporter: Reporter | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Run ``task`` (default ``qa``: a question about one study) and return the result envelope as a dict.

    ``path`` is one input or a list (``compare`` takes prior and current). ``model`` is a built-in name
    (``test-tiny``), a local directory, a cached Hugging Face id, or a loaded
    :class:`~medlens.backends.Backend` (reused across calls). ``options`` are
    :class:`~medlens.tasks.TaskOptions` fields: recipe, series, modality, instruction, thinking,
    max_new_tokens, overlay, dpi, token_budget, reasoner.
    """
    from medlens.tasks import TaskOptions, get_task
    from medlens.tasks.runner import run_task

    inputs = [path] if isinstance(path, str | Path) else list(path)
    envelope = run_task(
        get_task(task), inputs, question, model, TaskOptions(**options), engine=engine, reporter=reporter
    )
    return envelope.model_dump(mode="json")
