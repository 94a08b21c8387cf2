"""Preparation recipes: an ImageStack in, the exact RGB uint8 images the model sees out.

A recipe maps an image family (ct, mr, radiograph, color) to a function ``(stack, indices) -> (k, H, W, 3)``.
No resizing happens here (the model's processor resizes) and nothing is JPEG-encoded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from medlens.io.types import ImageStack
from medlens.prep.prepared import Prepared
from medlens.prep.sampling import MEDGEMMA_MAX_SLICES, sample_indices
from medlens.prep.slide_recipe import prepare_slide
from medlens.prep.windows import (
    apply_voi,
    ct_to_rgb,
    gray_to_rgb,
    minmax_to_uint8,
    unit_to_uint8,
)
from medlens.registry import Registry

FamilyFn = Callable[[ImageStack, list[int]], np.ndarray]
#: (slide spec, recipe name, SlideOptions | None, progress) -> Prepared, for whole-slide images
SlideFn = Callable[..., Prepared]

#: the recipe used when none is named
DEFAULT_RECIPE = "medgemma-1.5"
#: DICOM modality -> image family; anything else grey is a 2-D picture ("radiograph")
MODALITY_FAMILY = {"CT": "ct", "MR": "mr", "PT": "mr", "NM": "mr"}
#: modalities MedGemma 1.5 was trained on as volumes
TRAINED_VOLUME_MODALITIES = {"CT", "MR"}
#: slices are decoded this many at a time, so decoded float32 copies of a whole volume never exist
DECODE_CHUNK = 8


@dataclass(frozen=True)
class Recipe:
    """A named, versioned way of turning a study into model images."""

    name: str
    description: str
    families: Mapping[str, FamilyFn]
    slide: SlideFn | None = None
    max_slices: int = MEDGEMMA_MAX_SLICES
    min_volume_slices: int = 5


RECIPES: Registry[Recipe] = Registry("recipe")


def family_of(stack: ImageStack) -> str:
    if stack.is_color:
        return "color"
    return MODALITY_FAMILY.get(stack.modality.upper(), "radiograph")


def prepare(stack: ImageStack, recipe: str = DEFAULT_RECIPE) -> Prepared:
    """Apply ``recipe`` to ``stack``: sample slices, decode only those, map intensities to RGB uint8."""
    spec = RECIPES.get(recipe)
    family = family_of(stack)
    indices = sample_indices(len(stack), spec.max_slices)  # every slice when there are at most max_slices
    rgb = spec.families[family](stack, indices)
    warnings = list(stack.notes)
    if len(indices) < len(stack):
        warnings.append(f"{len(stack)} slices: {len(indices)} sampled equidistantly (first and last included)")
    if family in ("ct", "mr") and len(stack) > 1:
        if stack.modality.upper() not in TRAINED_VOLUME_MODALITIES:
            warnings.append(f"MedGemma 1.5 was not trained on {stack.modality} volumes; min-max scaling used")
        if len(stack) < spec.min_volume_slices:
            warnings.append(f"only {len(stack)} slices; MedGemma 1.5's volumes had at least {spec.min_volume_slices}")
    return Prepared(
        recipe=spec.name,
        modality=stack.modality,
        family=family,
        images=[np.ascontiguousarray(img) for img in rgb],
        slices=[stack.slices[i] for i in indices],
        source=stack.source,
        series_uid=stack.series_uid,
        n_source_slices=len(stack),
        warnings=warnings,
        acquired=stack.acquired,
    )


def _ct(stack: ImageStack, indices: list[int]) -> np.ndarray:
    """HU windows, decoded and windowed a few slices at a time straight into the output."""
    out = np.empty((len(indices), stack.rows, stack.columns, 3), np.uint8)
    for start in range(0, len(indices), DECODE_CHUNK):
        chunk = indices[start : start + DECODE_CHUNK]
        ct_to_rgb(stack.load(chunk), out=out[start : start + len(chunk)])
    return out


def _volume_minmax(stack: ImageStack, indices: list[int]) -> np.ndarray:
    """Min-max over the whole volume (all slices streamed), applied to the sampled slices; grey in R=G=B."""
    wanted = set(indices)
    low, high = np.inf, -np.inf
    kept: dict[int, np.ndarray] = {}
    for start in range(0, len(stack), DECODE_CHUNK):
        chunk = list(range(start, min(start + DECODE_CHUNK, len(stack))))
        values = stack.load(chunk)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        kept.update({i: values[j] for j, i in enumerate(chunk) if i in wanted})
    volume = np.stack([kept[i] for i in indices])
    gray = minmax_to_uint8(volume, low, high)
    if stack.slices[indices[0]].invert:
        gray = 255 - gray
    return gray_to_rgb(gray)


def _radiograph(stack: ImageStack, indices: list[int]) -> np.ndarray:
    """Each image through its own VOI LUT or window when the file has one, else min-max; MONOCHROME1
    inverted; grey replicated to RGB."""
    values = stack.load(indices)
    out = []
    for img, ref in zip(values, (stack.slices[i] for i in indices), strict=True):
        if ref.voi is not None:
            gray = unit_to_uint8(apply_voi(img, ref.voi))
        else:
            gray = minmax_to_uint8(img, float(img.min()), float(img.max()))
        out.append(255 - gray if ref.invert else gray)
    return gray_to_rgb(np.stack(out))


def _color(stack: ImageStack, indices: list[int]) -> np.ndarray:
    return stack.load(indices)


RECIPES.add(
    "medgemma-1.5",
    Recipe(
        name="medgemma-1.5",
        description=(
            "MedGemma 1.5: CT as three HU windows in R/G/B (-1024..1024, -135..215, 0..80); MR per-volume "
            "min-max; at most 85 equidistant slices; radiographs through their VOI LUT/window or min-max; "
            "whole slides as at most 126 896x896 tissue patches at 5x/10x/20x (HSV tissue mask at ~5x)"
        ),
        families={"ct": _ct, "mr": _volume_minmax, "radiograph": _radiograph, "color": _color},
        slide=prepare_slide,
    ),
)
