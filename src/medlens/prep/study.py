"""A study from disk to the images the model sees: read it (``medlens.io``), run the recipe, and write the
prepared images and their manifest for ``medlens prepare``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.errors import UnsupportedInputError
from medlens.files import write_json_atomic
from medlens.io import discover_input, open_input
from medlens.io.slide import find_slide
from medlens.prep.prepared import Prepared
from medlens.prep.recipes import DEFAULT_RECIPE, RECIPES, prepare
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
    """Read ``path`` and turn it into the images the model sees. Whole-slide images (OpenSlide formats,
    DICOM WSI) go through the recipe's slide part with ``slide`` options."""
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
    ``overview.png`` when the recipe drew one (whole slides: thumbnail, tissue mask, chosen patches). The
    manifest is written last and atomically: a folder with a manifest holds every image it lists."""
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
    return write_json_atomic(out / "manifest.json", manifest)
