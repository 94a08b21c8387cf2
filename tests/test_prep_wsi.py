"""Tests for medlens.prep.wsi: tissue mask, patch grid, sampling, magnification and level choice."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.prep.wsi import (
    DEFAULT_WSI_MAGNIFICATION,
    PatchBox,
    base_magnification,
    choose_magnification,
    level_for,
    patch_grid,
    sample_patches,
    tissue_mask,
)

H, W = 300, 400


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _synthetic_slide(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """White noisy glass, a pink ellipse and a purple disk of tissue (with texture), a black pen stroke and
    a few saturated dust specks. Returns (thumbnail, tissue truth, pen truth)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.full((H, W, 3), 246.0)
    ellipse = ((xx - 120) / 80.0) ** 2 + ((yy - 150) / 100.0) ** 2 <= 1.0
    disk = (xx - 290) ** 2 + (yy - 110) ** 2 <= 55**2
    img[ellipse] = (225, 150, 190)  # eosin pink
    img[disk] = (150, 90, 170)  # haematoxylin purple
    # nuclei-like darker purple dots inside the tissue
    dots = (rng.random((H, W)) < 0.03) & (ellipse | disk)
    img[dots] = (110, 60, 140)
    pen = (np.abs((yy - 260) - 0.3 * (xx - 250)) <= 4) & (xx >= 230) & (xx <= 390)
    img[pen] = (25, 25, 30)
    specks = np.zeros((H, W), dtype=bool)
    for y, x in [(20, 20), (280, 30), (30, 380), (200, 230)]:
        specks[y, x] = True
    img[specks] = (200, 120, 170)
    img += rng.normal(0.0, 6.0, img.shape)
    thumb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return thumb, ellipse | disk, pen


# ---------------------------------------------------------------------------------------------- tissue mask


def test_mask_matches_tissue_and_excludes_pen_and_background() -> None:
    thumb, tissue, pen = _synthetic_slide()
    mask = tissue_mask(thumb)
    assert mask.dtype == bool and mask.shape == (H, W)
    assert _iou(mask, tissue) > 0.9
    assert not (mask & pen).any()
    background = ~tissue & ~pen
    assert (mask & background).sum() < 0.01 * background.sum()
    # dust specks far from tissue are gone
    assert not mask[20, 20] and not mask[280, 30] and not mask[30, 380]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mask_robust_across_noise(seed: int) -> None:
    thumb, tissue, pen = _synthetic_slide(seed)
    mask = tissue_mask(thumb)
    assert _iou(mask, tissue) > 0.9
    assert not (mask & pen).any()


def test_pen_inside_tissue_is_not_filled_back() -> None:
    thumb, tissue, _ = _synthetic_slide()
    thumb = thumb.copy()
    thumb[140:160, 90:150] = 20  # a black ink blot over the pink ellipse
    mask = tissue_mask(thumb)
    assert not mask[140:160, 90:150].any()
    assert _iou(mask, tissue) > 0.85


def test_all_white_and_blank_are_empty() -> None:
    assert not tissue_mask(np.full((64, 80, 3), 255, np.uint8)).any()
    rng = np.random.default_rng(0)
    glass = np.clip(rng.normal(245, 4, (64, 80, 3)), 0, 255).astype(np.uint8)
    assert not tissue_mask(glass).any()
    assert not tissue_mask(np.zeros((32, 32, 3), np.uint8)).any()  # all black: artefact, not tissue


def test_all_tissue_is_full() -> None:
    rng = np.random.default_rng(0)
    img = np.empty((80, 100, 3))
    img[...] = (215, 140, 185)
    img[:, 50:] = (150, 90, 170)  # two stains: Otsu would split them without the ceiling
    img += rng.normal(0, 8, img.shape)
    mask = tissue_mask(np.clip(img, 0, 255).astype(np.uint8))
    assert mask.all()


def test_mask_input_validation_and_alpha() -> None:
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        tissue_mask(np.zeros((10, 10, 3), np.float32))
    thumb, _, _ = _synthetic_slide()
    rgba = np.concatenate([thumb, np.full((H, W, 1), 255, np.uint8)], axis=-1)
    assert np.array_equal(tissue_mask(rgba), tissue_mask(thumb))


# ---------------------------------------------------------------------------------------------- patch grid


def _rect_mask() -> np.ndarray:
    """A 100x100 mask with tissue rows 10..49, cols 20..79 (mask pixels)."""
    m = np.zeros((100, 100), dtype=bool)
    m[10:50, 20:80] = True
    return m


def test_patch_grid_coordinates_exact() -> None:
    # mask pixel = 16 level-0 px; patch = 80 px at a level of downsample 2 -> 160 level-0 px = 10 mask px
    boxes = patch_grid(_rect_mask(), mask_scale=16, patch_size_level=80, level_downsample=2.0, min_tissue=1.0)
    rows = [1, 2, 3, 4]
    cols = [2, 3, 4, 5, 6, 7]
    assert [(b.row, b.col) for b in boxes] == [(r, c) for r in rows for c in cols]
    for b in boxes:
        assert b.size0 == 160
        assert (b.x0, b.y0) == (b.col * 160, b.row * 160)
        assert b.tissue == pytest.approx(1.0)
    assert isinstance(boxes[0], PatchBox)
    with pytest.raises(AttributeError):
        boxes[0].x0 = 1  # type: ignore[misc]


def test_patch_grid_fractions_and_thresholds() -> None:
    # patch = 15 mask px -> 6x6 grid over 90 px (last 10 mask px do not make a whole patch).
    # rows: [0,15) has 5/15 tissue rows, [15,30) 15/15, [30,45) 15/15, [45,60) 5/15
    # cols: [15,30) 10/15, [30,45)..[60,75) 15/15, [75,90) 5/15
    m = _rect_mask()
    boxes = patch_grid(m, mask_scale=1.0, patch_size_level=15, level_downsample=1.0, min_tissue=0.0)
    assert len(boxes) == 36
    frac = {(b.row, b.col): b.tissue for b in boxes}
    assert frac[(0, 1)] == pytest.approx((5 / 15) * (10 / 15))
    assert frac[(1, 2)] == pytest.approx(1.0)
    assert frac[(3, 5)] == pytest.approx((5 / 15) * (5 / 15))
    assert frac[(5, 5)] == 0.0
    counts = {t: len(patch_grid(m, 1.0, 15, 1.0, min_tissue=t)) for t in (0.01, 0.3, 0.5, 2 / 3, 0.9, 1.0)}
    # row factors: 1/3, 1, 1, 1/3 ; col factors: 2/3, 1, 1, 1, 1/3
    assert counts == {0.01: 20, 0.3: 16, 0.5: 8, 2 / 3: 8, 0.9: 6, 1.0: 6}
    kept = patch_grid(m, 1.0, 15, 1.0, min_tissue=0.5)
    assert [(b.row, b.col) for b in kept] == sorted((b.row, b.col) for b in kept)  # row-major


def test_patch_grid_partial_pixels_and_slide_dimensions() -> None:
    # a patch (5 level-0 px) smaller than a mask pixel (10 px): fraction follows the covering pixel
    m = np.array([[True, False], [False, False]])
    boxes = patch_grid(m, mask_scale=10, patch_size_level=5, level_downsample=1.0, min_tissue=0.5)
    assert [(b.x0, b.y0) for b in boxes] == [(0, 0), (5, 0), (0, 5), (5, 5)]
    # a patch straddling pixels: 15 px = 1.5 mask pixels -> 10*10 of 15*15 tissue
    (b,) = patch_grid(m, mask_scale=10, patch_size_level=15, level_downsample=1.0, min_tissue=0.0)
    assert b.tissue == pytest.approx(100 / 225)
    # explicit slide size limits the grid to whole patches inside the slide
    full = np.ones((10, 10), bool)
    assert len(patch_grid(full, 100.0, 300, 1.0, slide_dimensions=(950, 610))) == 3 * 2
    assert patch_grid(full, 1.0, 20, 1.0) == []  # patch larger than the slide
    assert patch_grid(np.zeros((50, 50), bool), 1.0, 10, 1.0) == []


def test_patch_grid_validation() -> None:
    with pytest.raises(ValueError):
        patch_grid(np.zeros((3, 3, 3), bool), 1.0, 10, 1.0)
    with pytest.raises(ValueError):
        patch_grid(np.zeros((3, 3), bool), 0.0, 10, 1.0)


def test_mask_to_grid_end_to_end() -> None:
    thumb, tissue, _ = _synthetic_slide()
    # thumbnail at 5x of a 40x slide (mask_scale 8); small patches so the tiny synthetic slide has a grid
    boxes = patch_grid(tissue_mask(thumb), 8.0, 56, 2.0, min_tissue=0.5)
    truth = {(b.row, b.col): b.tissue for b in patch_grid(tissue, 8.0, 56, 2.0, min_tissue=0.0)}
    got = {(b.row, b.col) for b in boxes}
    want = {k for k, t in truth.items() if t >= 0.5}
    assert len(got) >= 10
    assert all(abs(truth[k] - 0.5) < 0.1 for k in got ^ want)  # disagreements only on borderline patches


# ---------------------------------------------------------------------------------------------- sampling


def _grid(n: int) -> list[PatchBox]:
    return [PatchBox(i * 10, 0, 10, 0, i, 1.0) for i in range(n)]


def test_sample_patches_subsamples_in_order() -> None:
    patches = _grid(500)
    out = sample_patches(patches, max_patches=126, seed=3)
    assert len(out) == 126
    assert len(set(out)) == 126  # without replacement
    idx = [p.col for p in out]
    assert idx == sorted(idx)  # spatial order preserved
    assert out == sample_patches(patches, max_patches=126, seed=3)  # deterministic per seed
    assert out != sample_patches(patches, max_patches=126, seed=4)
    assert set(out) <= set(patches)


def test_sample_patches_keeps_all_when_few() -> None:
    patches = _grid(100)
    assert sample_patches(patches) == patches
    assert sample_patches(_grid(126)) == _grid(126)
    assert sample_patches([]) == []
    assert sample_patches(patches, max_patches=0) == []
    with pytest.raises(ValueError):
        sample_patches(patches, max_patches=-1)


# ---------------------------------------------------------------------------------------------- magnification


def test_base_magnification() -> None:
    assert base_magnification(40) == 40.0
    assert base_magnification(None, 0.25) == pytest.approx(40.0)
    assert base_magnification(20, 0.25) == 20.0  # objective power wins
    assert base_magnification() is None


def test_choose_magnification() -> None:
    assert DEFAULT_WSI_MAGNIFICATION == 20.0
    assert choose_magnification(40) == 20.0
    assert choose_magnification(mpp=0.5) == 20.0
    assert choose_magnification(mpp=0.505) == 20.0  # within tolerance of 20x
    assert choose_magnification(40, wanted=5) == 5.0
    assert choose_magnification(10) == 10.0  # slide does not reach 20x
    assert choose_magnification(mpp=1.0, wanted=20) == 10.0
    assert choose_magnification(2.5) == 5.0  # reaches none: lowest, upsampled later
    assert choose_magnification(None, None, 10) == 10.0
    with pytest.raises(ValueError):
        choose_magnification(40, wanted=40)


def test_level_for() -> None:
    ds = [1.0, 4.0, 16.0, 32.0]
    assert level_for(20, 40, ds) == (0, 0.5)  # read 1792 at level 0, shrink by 2
    assert level_for(10, 40, ds) == (1, 1.0)
    assert level_for(5, 40, ds) == (1, 0.5)
    assert level_for(5, 20, ds) == (1, 1.0)
    assert level_for(20, 20, [1.0, 2.0, 4.0]) == (0, 1.0)
    assert level_for(10, 20, [1.0, 2.0000153, 4.0001]) == (1, 1.0)  # level downsamples are rarely exact
    level, extra = level_for(5, 40, [1.0, 3.9, 8.1])
    assert level == 1 and extra == pytest.approx(3.9 / 8)
    assert level_for(20, 10, [1.0, 4.0]) == (0, 2.0)  # only upsampling reaches 20x
    with pytest.raises(ValueError):
        level_for(20, 40, [])


@pytest.mark.parametrize("radius", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
def test_fast_morphology_equals_scipy(radius, density):
    from scipy import ndimage

    from medlens.prep.wsi import _disk, binary_dilate, binary_erode

    rng = np.random.default_rng(radius * 10 + int(density * 100))
    for shape in [(1, 1), (3, 40), (41, 29), (64, 64)]:
        m = rng.random(shape) < density
        disk = _disk(radius)
        assert np.array_equal(binary_erode(m, disk), ndimage.binary_erosion(m, structure=disk))
        assert np.array_equal(binary_dilate(m, disk), ndimage.binary_dilation(m, structure=disk))
        cross = ndimage.generate_binary_structure(2, 1)
        assert np.array_equal(binary_erode(m, cross, 4), ndimage.binary_erosion(m, structure=cross, iterations=4))


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    from medlens.prep.wsi import fill_holes

    rng = np.random.default_rng(7)
    for trial in range(60):
        m = rng.random(tuple(rng.integers(1, 50, 2))) < rng.random()
        assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m)), trial
    ring = np.zeros((9, 9), bool)
    ring[2:7, 2:7], ring[3:6, 3:6] = True, False  # a square ring: its inside is a hole, the outside is not
    assert fill_holes(ring)[2:7, 2:7].all() and not fill_holes(ring)[0].any()
    assert np.array_equal(fill_holes(np.ones((4, 4), bool)), np.ones((4, 4), bool))  # no background at all


def test_opencv_edge_and_components_equal_scipy():
    from scipy import ndimage

    from medlens.prep.wsi import drop_small_components, inner_edge

    rng = np.random.default_rng(11)
    cross = ndimage.generate_binary_structure(2, 1)
    for trial in range(40):
        m = rng.random(tuple(rng.integers(1, 60, 2))) < rng.uniform(0.3, 0.95)
        width = int(rng.integers(1, 6))
        assert np.array_equal(inner_edge(m, width), m & ~ndimage.binary_erosion(m, cross, iterations=width)), trial
        labels, n = ndimage.label(m)
        minimum = float(rng.integers(1, 12))
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= minimum
        keep[0] = False
        assert np.array_equal(drop_small_components(m, minimum), keep[labels]), trial


def test_components_beyond_16_bit_labels_fall_back_to_32_bit():
    from medlens.prep.wsi import drop_small_components

    speckle = np.zeros((600, 600), bool)
    speckle[::2, ::2] = True  # 90,000 one-pixel components: more than 16-bit labels hold
    speckle[300:340, 300:340] = True  # one big component (1,600 pixels with the dots inside it)
    kept = drop_small_components(speckle, 2)
    # the square and the 40 dots touching its bottom and right edges (rows/columns 340 are even)
    assert kept[300:340, 300:340].all() and kept.sum() == 1600 + 40


def test_banded_product_equals_the_dense_one():
    from medlens.prep.wsi import _banded_product, _overlap_matrix

    rng = np.random.default_rng(5)
    mask = rng.random((300, 410)) < 0.6
    for cell, pixel in ((64, 1.0), (100, 7.3), (1792, 8.0)):
        wy, wx = _overlap_matrix(300 * 8 // cell, cell, 300, pixel), _overlap_matrix(410 * 8 // cell, cell, 410, pixel)
        dense = wy @ mask.astype(np.float64) @ wx.T
        np.testing.assert_allclose(_banded_product(wx, _banded_product(wy, mask).T).T, dense, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_table_colour_stages_equal_the_per_pixel_way(seed):
    """S/V from the (max, max - min) table and the Otsu cut from pair counts equal the per-pixel float way."""
    from scipy import ndimage

    from medlens.prep.wsi import _otsu_threshold, _rgb_to_sv, tissue_mask

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (97, 131, 3), dtype=np.uint8)
    img[: 40 + seed * 10] = np.clip(img[: 40 + seed * 10] // 6 + 215, 0, 255)  # glass-like rows
    s, v = _rgb_to_sv(img)
    thr = float(np.clip(_otsu_threshold(s), 0.07, 0.2))
    expected = ndimage.binary_fill_holes((s > thr) & (v <= 0.94) & ~(v < 0.2)) & ~(v < 0.2)
    got = tissue_mask(img, open_radius=0, close_radius=0, dark_margin=0, min_area_fraction=0.0)
    assert expected.any() and np.array_equal(got, expected)
