"""MedSigLIP preparation: bilinear without antialiasing (checked against torch), pixels in [-1, 1]."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.prep.siglip import MEDSIGLIP_SIZE, medsiglip_pixels, resize_bilinear

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(("shape", "out"), [((896, 896), (448, 448)), ((224, 300), (448, 448)), ((37, 61), (20, 90))])
def test_resize_matches_torch_bilinear_without_antialias(shape, out):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3)).astype(np.float32)
    ours = resize_bilinear(image, *out)
    reference = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=out,
            mode="bilinear",
            align_corners=False,
            antialias=False,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    assert ours.shape == (*out, 3) and np.max(np.abs(ours - reference)) < 1e-2  # float32 rounding, 0..255 scale


def test_no_antialiasing_when_shrinking():
    """A one-pixel checkerboard shrunk 2x samples between pixels (0.5 grey), where an antialiasing filter
    would also average; a 4x shrink without antialiasing lands on whole pixels and keeps the extremes."""
    board = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    quarter = resize_bilinear(board, 16, 16)
    assert set(np.unique(quarter)) <= {0.0, 127.5, 255.0}


def test_medsiglip_pixels_range_layout_and_grey_input():
    image = np.zeros((100, 50, 3), np.uint8)
    image[:, 25:] = 255
    pixels = medsiglip_pixels(image)
    assert pixels.shape == (3, MEDSIGLIP_SIZE, MEDSIGLIP_SIZE) and pixels.dtype == np.float32
    assert pixels.min() == -1.0 and pixels.max() == 1.0
    assert medsiglip_pixels(np.full((10, 10), 255, np.uint8)).min() == 1.0
    with pytest.raises(ValueError, match="RGB"):
        medsiglip_pixels(np.zeros((4, 4, 4), np.uint8))
