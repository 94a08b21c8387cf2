"""The MedGemma 1.5 whole-slide recipe (docs/wsi.md; report section 2.3.2), on a real slide.

Thumbnail at about 5x -> HSV tissue mask -> one magnification (5x/10x/20x) -> non-overlapping 896x896
patches on a grid over tissue -> at most 126 of them (seeded, spatial order kept) -> read in worker
processes. Every region is read through :func:`medlens.io.slide_workers.read_regions`, the thumbnail too, so
a bad tile fails one region with a reason instead of the run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from medlens.errors import CorruptFileError, InputError, NoImagesFoundError
from medlens.io.slide import Slide, SlideSpec
from medlens.io.slide_workers import (
    DEFAULT_REGION_TIMEOUT_S,
    DEFAULT_WORKER_MEMORY_MB,
    RegionRequest,
    RegionResult,
    read_regions,
)
from medlens.io.types import SliceRef
from medlens.prep.prepared import Prepared
from medlens.prep.wsi import (
    DEFAULT_WSI_MAGNIFICATION,
    MASK_MAGNIFICATION,
    WSI_MAGNIFICATIONS,
    WSI_MAX_PATCHES,
    WSI_PATCH_SIZE,
    PatchBox,
    base_magnification,
    choose_magnification,
    inner_edge,
    level_for,
    patch_grid,
    sample_patches,
    tissue_mask,
)

#: the mask thumbnail's long side is capped here (a 5x thumbnail of a 40x 100k-pixel slide would be 12.5k)
MASK_MAX_SIDE = 6144
#: thumbnail strips are read this many level pixels at a time, at most
STRIP_PIXELS = 2**24
#: when a slide states neither mpp nor objective power, level 0 is taken to be this magnification
ASSUMED_BASE_MAGNIFICATION = 40.0
#: DICOM modality of slide microscopy
SLIDE_MODALITY = "SM"


@dataclass
class SlideOptions:
    """What a user can set for the whole-slide recipe."""

    magnification: float | None = None  # 5, 10 or 20; None: 20x or the highest of those the slide reaches
    max_patches: int = WSI_MAX_PATCHES
    min_tissue: float = 0.5  # a patch is kept when tissue covers at least this fraction of it
    seed: int = 0
    tissue: str | None = None  # tissue type for the prompt ("breast", "colon" ...)
    procedure: str | None = None  # procedure for the prompt ("core needle biopsy", "resection" ...)
    mpp: float | None = None  # level-0 microns per pixel when the file's is missing or wrong
    workers: int | None = None  # reader processes (None: one per CPU; 0: in this process, no isolation)
    timeout_s: float = DEFAULT_REGION_TIMEOUT_S
    memory_mb: int = DEFAULT_WORKER_MEMORY_MB
    backend: str | None = None  # openslide, tiffslide or wsidicom (None: chosen by format)

    def check(self, source: str) -> None:
        if not 0.0 <= self.min_tissue <= 1.0:
            raise InputError(f"--min-tissue must be within 0..1, got {self.min_tissue}", source)
        if self.max_patches < 1:
            raise InputError(f"--max-patches must be at least 1, got {self.max_patches}", source)
        if self.magnification is not None and self.magnification not in WSI_MAGNIFICATIONS:
            allowed = ", ".join(f"{m:g}" for m in WSI_MAGNIFICATIONS)
            raise InputError(f"--magnification must be one of {allowed}, got {self.magnification:g}", source)
        if self.mpp is not None and self.mpp <= 0:
            raise InputError(f"--mpp must be positive, got {self.mpp}", source)


Progress = Callable[[int, int], None]


def prepare_slide(
    spec: SlideSpec, recipe: str, options: SlideOptions | None = None, progress: Progress | None = None
) -> Prepared:
    """Run the whole-slide recipe on the slide ``spec`` opens; the patches become ``Prepared.images``."""
    opts = options or SlideOptions()
    opts.check(spec.path)
    if opts.backend is not None and spec.backend is None:
        spec = dataclasses.replace(spec, backend=opts.backend)
    with spec.open() as slide:
        return _prepare(slide, spec, recipe, opts, progress)


def _prepare(slide: Slide, spec: SlideSpec, recipe: str, opts: SlideOptions, progress: Progress | None) -> Prepared:
    warnings: list[str] = []
    width0, height0 = slide.dimensions
    base = base_magnification(mpp=opts.mpp) if opts.mpp else slide.base_magnification
    if base is None:
        base = ASSUMED_BASE_MAGNIFICATION
        warnings.append(f"the slide states no mpp or objective power; level 0 taken as {base:g}x (set --mpp)")
    wanted = opts.magnification or DEFAULT_WSI_MAGNIFICATION
    magnification = choose_magnification(objective_power=base, wanted=wanted)
    if magnification != wanted:
        warnings.append(f"{wanted:g}x is beyond the slide's {base:g}x; read at {magnification:g}x")
    downsamples = [lv.downsample for lv in slide.levels]
    workers = dict(workers=opts.workers, timeout_s=opts.timeout_s, memory_mb=opts.memory_mb)

    # 1. Thumbnail and tissue mask.
    mask_ds = max(base / MASK_MAGNIFICATION, max(width0, height0) / MASK_MAX_SIDE, 1.0)
    thumb, thumb_failures = _read_thumbnail(spec, slide, mask_ds, workers)
    if thumb_failures:
        warnings.append(f"{thumb_failures} thumbnail strip(s) unreadable, taken as glass")
    mask = tissue_mask(thumb)

    # 2. Grid at the chosen magnification, tissue patches, sampled.
    level, extra = level_for(magnification, base, downsamples)
    read_size = max(1, round(WSI_PATCH_SIZE / extra))
    grid = patch_grid(mask, mask_ds, read_size, downsamples[level], opts.min_tissue, slide_dimensions=(width0, height0))
    if not grid:
        raise NoImagesFoundError(
            f"no {WSI_PATCH_SIZE}x{WSI_PATCH_SIZE} patch at {magnification:g}x has tissue over "
            f"{opts.min_tissue:.0%} of its area (tissue mask covers {mask.mean():.1%} of the slide); "
            "lower --min-tissue or --magnification",
            spec.path,
        )
    chosen = sample_patches(grid, opts.max_patches, opts.seed)
    if len(chosen) < len(grid):
        warnings.append(f"{len(grid)} tissue patches: {len(chosen)} sampled at random (seed {opts.seed}), in order")
    if extra > 1.0:
        warnings.append(f"level 0 is only {base:g}x: patches upsampled {extra:.2f}x to reach {magnification:g}x")

    # 3. Read the patches in worker processes.
    requests = [RegionRequest(b.x0, b.y0, level, read_size, read_size, WSI_PATCH_SIZE, WSI_PATCH_SIZE) for b in chosen]
    done = [0]

    def tick(_: int, __: RegionResult) -> None:
        done[0] += 1
        if progress:
            progress(done[0], len(requests))

    # The overview is drawn meanwhile (the parent mostly waits on the workers); redrawn if patches fail.
    with ThreadPoolExecutor(max_workers=1) as drawer:
        drawing = drawer.submit(draw_overview, thumb, mask, mask_ds, chosen, set())
        results = read_regions(spec, requests, on_done=tick, **workers)
        overview = drawing.result()
    images, refs, entries, failed = [], [], [], []
    for box, result in zip(chosen, results, strict=True):
        entry = _entry(box, level, magnification)
        if result.image is None:
            failed.append({**entry, "error": result.error})
            continue
        images.append(result.image)
        refs.append(SliceRef(file=spec.path, frame=len(refs)))
        entries.append(entry)
    if failed:
        warnings.append(f"{len(failed)} of {len(chosen)} patches unreadable and left out (see the manifest)")
        overview = draw_overview(thumb, mask, mask_ds, chosen, {tuple(f["x0_y0"]) for f in failed})
    if not images:
        raise CorruptFileError(f"none of the {len(chosen)} patches could be read: {failed[0]['error']}", spec.path)

    meta = {
        "slide": slide.summary() | ({"mpp_override": opts.mpp} if opts.mpp else {}),
        "magnification": magnification,
        "level": level,
        "level_downsample": downsamples[level],
        "read_size": read_size,
        "patch_size": WSI_PATCH_SIZE,
        "mask_magnification": base / mask_ds,
        "min_tissue": opts.min_tissue,
        "seed": opts.seed,
        "n_tissue_patches": len(grid),
        "tissue": opts.tissue,
        "procedure": opts.procedure,
        "failed_patches": failed,
    }
    return Prepared(
        recipe=recipe,
        modality=SLIDE_MODALITY,
        family="wsi",
        images=images,
        slices=refs,
        source=spec.path,
        series_uid=None,
        n_source_slices=len(grid),
        warnings=warnings,
        image_meta=entries,
        meta=meta,
        overview=overview,
    )


def _entry(box: PatchBox, level: int, magnification: float) -> dict:
    return {
        "x0_y0": [box.x0, box.y0],
        "size_level0": box.size0,
        "level": level,
        "magnification": magnification,
        "grid": [box.row, box.col],
        "tissue_fraction": round(box.tissue, 4),
    }


def _read_thumbnail(spec: SlideSpec, slide: Slide, mask_ds: float, workers: dict) -> tuple[np.ndarray, int]:
    """The whole slide at ``1 / mask_ds`` of level 0, read in horizontal strips from the coarsest level that
    is at least that fine; unreadable strips come back white (glass)."""
    width0, height0 = slide.dimensions
    tw, th = max(1, math.ceil(width0 / mask_ds)), max(1, math.ceil(height0 / mask_ds))
    level = max(
        (i for i, lv in enumerate(slide.levels) if lv.downsample <= mask_ds * 1.01),
        key=lambda i: slide.levels[i].downsample,
        default=0,
    )
    lds = slide.levels[level].downsample
    level_w = math.ceil(width0 / lds)
    rows_per_strip = max(1, int(STRIP_PIXELS / max(level_w, 1) * lds / mask_ds))
    requests = []
    for r0 in range(0, th, rows_per_strip):
        r1 = min(th, r0 + rows_per_strip)
        y0 = round(r0 * mask_ds)
        read_h = max(1, round((r1 - r0) * mask_ds / lds))
        requests.append(RegionRequest(0, y0, level, level_w, read_h, tw, r1 - r0))
    thumb = np.full((th, tw, 3), 255, np.uint8)
    results = read_regions(spec, requests, **workers)
    if all(r.image is None for r in results):
        raise CorruptFileError(f"the slide's thumbnail could not be read: {results[0].error}", spec.path)
    failures = 0
    for req, result, r0 in zip(requests, results, range(0, th, rows_per_strip), strict=True):
        if result.image is None:
            failures += 1
        else:
            thumb[r0 : r0 + req.out_h] = result.image
    return thumb, failures


def draw_overview(
    thumb: np.ndarray, mask: np.ndarray, mask_ds: float, patches: list[PatchBox], failed: set[tuple[int, int]]
) -> np.ndarray:
    """The thumbnail with the tissue mask's outline in green and the chosen patches outlined (blue; red if
    unreadable)."""
    from PIL import Image, ImageDraw

    edge = inner_edge(mask, max(1, round(min(mask.shape) / 300)))
    picture = thumb.copy()
    picture[edge] = (0, 200, 0)
    # the outlines are drawn as colour indices on a one-band image (a third of the bytes of an RGB round trip
    # through PIL), later ones over earlier ones as when drawn in colour, then painted in
    colours = np.array([(0, 0, 0), (0, 60, 255), (220, 0, 0)], np.uint8)
    image = Image.new("L", (picture.shape[1], picture.shape[0]), 0)
    draw = ImageDraw.Draw(image)
    line = max(1, round(min(image.size) / 400))
    for box in patches:
        x0, y0 = box.x0 / mask_ds, box.y0 / mask_ds
        side = box.size0 / mask_ds
        draw.rectangle(
            [x0, y0, x0 + side - 1, y0 + side - 1], outline=2 if (box.x0, box.y0) in failed else 1, width=line
        )
    index = np.asarray(image)
    drawn = index > 0
    picture[drawn] = colours[index[drawn]]
    return picture


__all__ = ["ASSUMED_BASE_MAGNIFICATION", "SLIDE_MODALITY", "SlideOptions", "draw_overview", "prepare_slide"]
