"""Preparation recipes: an ImageStack in, the exact RGB uint8 images the model sees out.

A recipe maps an image family (ct, mr, radiograph, color) to a function ``(stack, indices) -> (k, H, W, 3)``.
A recipe also names the slice order it feeds (``order``, see :data:`medlens.prep.sampling.ORDERS`) and its
slice sampler. ``medgemma-1.5`` does no resizing (the model's processor resizes) and no JPEG encoding; the
parity recipes ``medgemma-1.5-notebook`` and ``medgemma-1.5-hai-def`` reproduce Google's published code for CT,
JPEG round trip included (docs/recipe.md, Parity recipes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from medlens.io.types import ImageStack
from medlens.prep.prepared import Prepared
from medlens.prep.sampling import MEDGEMMA_MAX_SLICES, notebook_indices, reorder, sample_indices
from medlens.prep.slide_recipe import prepare_slide
from medlens.prep.square import pad_to_square
from medlens.prep.windows import (
    HAI_DEF_CT_WINDOWS,
    apply_voi,
    ct_to_rgb,
    gray_to_rgb,
    interp_to_uint8,
    minmax_to_uint8,
    unit_to_uint8,
)
from medlens.registry import Registry

FamilyFn = Callable[[ImageStack, list[int]], np.ndarray]
#: (n_slices, max_slices) -> the indices of the (ordered) stack the model sees
SampleFn = Callable[[int, int], list[int]]
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
    #: slice order fed to the sampler, a name in medlens.prep.sampling.ORDERS
    order: str = "geometric"
    sample: SampleFn = sample_indices
    #: how the warning describes the sampling of a long stack
    sample_note: str = "sampled equidistantly (first and last included)"


RECIPES: Registry[Recipe] = Registry("recipe")


def family_of(stack: ImageStack) -> str:
    if stack.is_color:
        return "color"
    return MODALITY_FAMILY.get(stack.modality.upper(), "radiograph")


def prepare(stack: ImageStack, recipe: str = DEFAULT_RECIPE) -> Prepared:
    """Apply ``recipe`` to ``stack``: sample slices, decode only those, map intensities to RGB uint8."""
    spec = RECIPES.get(recipe)
    family = family_of(stack)
    stack = reorder(stack, spec.order)
    indices = spec.sample(len(stack), spec.max_slices)  # every slice when there are at most max_slices
    if stack.prefetch is not None:
        stack.prefetch(indices)
    rgb = spec.families[family](stack, indices)
    warnings = list(stack.notes)
    if len(indices) < len(stack):
        warnings.append(f"{len(stack)} slices: {len(indices)} {spec.sample_note}")
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
        identity=dict(stack.identity),
    )


def _ct(stack: ImageStack, indices: list[int]) -> np.ndarray:
    """HU windows, decoded and windowed a few slices at a time straight into the output."""
    out = np.empty((len(indices), stack.rows, stack.columns, 3), np.uint8)
    for start in range(0, len(indices), DECODE_CHUNK):
        chunk = indices[start : start + DECODE_CHUNK]
        ct_to_rgb(stack.load(chunk), out=out[start : start + len(chunk)])
    return out


def _ct_hai_def(stack: ImageStack, indices: list[int]) -> np.ndarray:
    """The HAI-DEF container's CT path: HU rounded to whole numbers, windows 0/2048, 175/80, 40/80 with its
    np.interp arithmetic, each image zero-padded to a square."""
    out = []
    for start in range(0, len(indices), DECODE_CHUNK):
        hu = np.rint(stack.load(indices[start : start + DECODE_CHUNK]))
        channels = [interp_to_uint8(hu, low, high) for low, high in HAI_DEF_CT_WINDOWS]
        out.extend(pad_to_square(img)[0] for img in np.stack(channels, axis=-1))
    return np.stack(out)


def jpeg_round_trip(images: np.ndarray, quality: int | None = None) -> np.ndarray:
    """Encode each RGB uint8 image as a JPEG with Pillow (``quality`` None: Pillow's default, 75; chroma
    4:2:0, Pillow's default for RGB) and decode it back: the pixels a model fed that JPEG sees."""
    import io

    from PIL import Image

    out = np.empty_like(images)
    options = {} if quality is None else {"quality": quality}
    for k, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", **options)
        buffer.seek(0)
        with Image.open(buffer) as decoded:
            out[k] = np.asarray(decoded.convert("RGB"))
    return out


def _with_jpeg(family: FamilyFn, quality: int | None) -> FamilyFn:
    """``family`` followed by a JPEG round trip at ``quality``."""

    def run(stack: ImageStack, indices: list[int]) -> np.ndarray:
        return jpeg_round_trip(family(stack, indices), quality)

    return run


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

#: quality of the HAI-DEF container's JPEGs (IMAGE_INPUT_JPEG_COMPRESSION_QUALITY, default 95)
HAI_DEF_JPEG_QUALITY = 95

RECIPES.add(
    "medgemma-1.5-notebook",
    Recipe(
        name="medgemma-1.5-notebook",
        description=(
            "Google's CT notebook (high_dimensional_ct_hugging_face.ipynb): slices by InstanceNumber, "
            "round(i / 85 * (n - 1)) for i = 1..85 (first slice never sampled), CT windows as medgemma-1.5, "
            "each CT slice JPEG-encoded by Pillow at its defaults (quality 75, 4:2:0) and decoded back; "
            "other images as medgemma-1.5"
        ),
        families={"ct": _with_jpeg(_ct, None), "mr": _volume_minmax, "radiograph": _radiograph, "color": _color},
        slide=prepare_slide,
        order="instance_number",
        sample=notebook_indices,
        sample_note="sampled as the CT notebook does (round(i / 85 * (n - 1)), i = 1..85; first slice skipped)",
    ),
)

RECIPES.add(
    "medgemma-1.5-hai-def",
    Recipe(
        name="medgemma-1.5-hai-def",
        description=(
            "Google's HAI-DEF serving container: slices in file order, CT as whole HU through windows "
            "0/2048, 175/80, 40/80 (R -1024..1024, G 135..215, B 0..80), zero-padded to a square, "
            "JPEG quality 95 (4:2:0) and decoded back; more than 85 slices sampled as medgemma-1.5 "
            "(the container itself sends every slice); other images as medgemma-1.5"
        ),
        families={
            "ct": _with_jpeg(_ct_hai_def, HAI_DEF_JPEG_QUALITY),
            "mr": _volume_minmax,
            "radiograph": _radiograph,
            "color": _color,
        },
        slide=prepare_slide,
        order="files",
    ),
)
