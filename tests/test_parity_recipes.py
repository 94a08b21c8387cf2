"""The parity recipes against independent re-implementations of Google's published CT code.

The references below read the files with pydicom and follow the sources step by step (docs/recipe.md,
Parity recipes): they never call medlens.prep. The series has InstanceNumbers, positions and file names in
three different shuffled orders, so each recipe's order is visible.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_series
from PIL import Image

from medlens.prep.study import prepare_study

ROWS, COLS = 24, 40  # not square: the HAI-DEF container pads to a square


def _series(folder: Path, n: int, seed: int, hu: np.ndarray | None = None) -> None:
    """A CT series of ``n`` slices whose file names, InstanceNumbers and positions are three orders."""
    rng = np.random.default_rng(seed)
    arrays = hu if hu is not None else rng.integers(-1100, 1500, size=(n, ROWS, COLS)).astype(np.int16)
    z = rng.permutation(n)
    numbers = rng.permutation(n) + 1
    names = [f"im{q:04d}.dcm" for q in rng.permutation(n)]
    folder.mkdir()
    write_series(
        folder,
        list(arrays),
        positions=[(0.0, 0.0, float(v)) for v in z],
        instance_numbers=[int(v) for v in numbers],
        filenames=names,
        rescale=(1.0, 0.0),  # signed stored values = HU (the container casts HU back to the stored type)
    )


def _jpeg(rgb: np.ndarray, **options: int) -> np.ndarray:
    with io.BytesIO() as buffer:
        Image.fromarray(rgb).save(buffer, format="jpeg", **options)
        buffer.seek(0)
        return np.asarray(Image.open(buffer).convert("RGB"))


def notebook_reference(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    """high_dimensional_ct_hugging_face.ipynb: sort by int(InstanceNumber); more than 85 instances ->
    instances[int(round(i / 85 * (n - 1)))] for i in 1..85; apply_rescale; per window clip, float32,
    -= min, /= (max - min), *= 255; np.round; uint8; PIL save format "jpeg" with no options."""
    instances = sorted((pydicom.dcmread(f) for f in folder.iterdir()), key=lambda d: int(d.InstanceNumber))
    if len(instances) > 85:
        instances = [instances[int(round(i / 85 * (len(instances) - 1)))] for i in range(1, 86)]  # noqa: RUF046
    images = []
    for ds in instances:
        hu = pydicom.pixels.apply_rescale(ds.pixel_array, ds)
        channels = []
        for low, high in [(-1024, 1024), (-135, 215), (0, 80)]:
            c = np.clip(hu, low, high).astype(np.float32)
            c -= low
            c /= high - low
            c *= 255.0
            channels.append(c)
        images.append(_jpeg(np.round(np.stack(channels, axis=-1), 0).astype(np.uint8)))
    return [Path(ds.filename).name for ds in instances], images


def hai_def_reference(folder: Path) -> tuple[list[str], list[np.ndarray]]:
    """generic_dicom_handler.py + predictor.py: files in the order given (here: the sorted listing); HU =
    round(stored * slope + intercept) cast to the stored dtype; window_accurate per (centre, width) =
    (0, 2048), (175, 80), (40, 80); zero pad to square (half the extra before); JPEG quality 95."""
    files = sorted(folder.iterdir())
    if len(files) > 85:  # the container sends all; medlens samples as medgemma-1.5 (docs/recipe.md)
        files = [files[int(i)] for i in np.rint(np.linspace(0, len(files) - 1, 85))]
    images = []
    for f in files:
        ds = pydicom.dcmread(f)
        arr = ds.pixel_array
        hu = np.round(arr.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept), 0)
        hu = hu.astype(arr.dtype)
        channels = []
        for center, width in [(0, 2048), (175, 80), (40, 80)]:
            bottom, top = center - width // 2, center + width // 2
            channels.append(np.round(np.interp(hu.clip(bottom, top), (bottom, top), (0, 255)), 0).astype(np.uint8))
        rgb = np.stack(channels, axis=-1)
        h, w = rgb.shape[:2]
        if h < w:
            rgb = np.pad(rgb, (((w - h) // 2, w - h - (w - h) // 2), (0, 0), (0, 0)))
        elif w < h:
            rgb = np.pad(rgb, ((0, 0), ((h - w) // 2, h - w - (h - w) // 2), (0, 0)))
        images.append(_jpeg(rgb, quality=95))
    return [f.name for f in files], images


REFERENCES = {"medgemma-1.5-notebook": notebook_reference, "medgemma-1.5-hai-def": hai_def_reference}


@pytest.mark.parametrize("recipe", sorted(REFERENCES))
@pytest.mark.parametrize("n", [100, 40])
def test_parity_recipe_matches_its_reference(tmp_path: Path, recipe: str, n: int) -> None:
    folder = tmp_path / "ct"
    _series(folder, n, seed=n)
    names, images = REFERENCES[recipe](folder)
    prepared = prepare_study(folder, recipe=recipe)
    assert prepared.recipe == recipe
    assert [Path(ref.file).name for ref in prepared.slices] == names
    assert len(prepared.images) == len(images) == min(n, 85)
    for ours, theirs in zip(prepared.images, images, strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_where_the_three_recipes_differ(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    _series(folder, 100, seed=7)
    by_recipe = {r: prepare_study(folder, recipe=r) for r in ("medgemma-1.5", *REFERENCES)}
    headers = {p.name: pydicom.dcmread(p, stop_before_pixels=True) for p in folder.iterdir()}
    first_by_number = min(headers, key=lambda k: int(headers[k].InstanceNumber))
    first_by_z = min(headers, key=lambda k: float(headers[k].ImagePositionPatient[2]))
    chosen = {r: [Path(s.file).name for s in p.slices] for r, p in by_recipe.items()}
    # the notebook never feeds the first slice (by InstanceNumber); medgemma-1.5 keeps both ends
    assert first_by_number not in chosen["medgemma-1.5-notebook"]
    assert chosen["medgemma-1.5"][0] == first_by_z
    assert chosen["medgemma-1.5-hai-def"][0] == sorted(headers)[0]
    assert len({tuple(c) for c in chosen.values()}) == 3  # three different orders


def test_green_channel_at_minus_100_hu(tmp_path: Path) -> None:
    """Soft tissue window: -135..215 HU (notebook, report, medgemma-1.5) vs 135..215 HU (HAI-DEF)."""
    folder = tmp_path / "flat"
    _series(folder, 6, seed=1, hu=np.full((6, ROWS, COLS), -100, np.int16))
    green = {r: prepare_study(folder, recipe=r).images[0][..., 1] for r in ("medgemma-1.5", *REFERENCES)}
    expected = round((-100 + 135) / 350 * 255)  # 25.5 -> 26 (half to even)
    assert np.all(green["medgemma-1.5"] == expected)
    assert abs(int(np.median(green["medgemma-1.5-notebook"])) - expected) <= 1  # JPEG of a flat image
    assert int(np.median(green["medgemma-1.5-hai-def"])) == 0  # below 135 HU: black
