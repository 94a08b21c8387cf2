"""Whole slides end to end: reading SVS / generic TIFF / DICOM WSI, the MedGemma 1.5 patch recipe against the
slides' known geometry, a corrupt tile, labels never passed on, and the CLI."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image
from slide_factory import (
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    corrupt_tile,
    write_dicom_wsi,
    write_generic_tiff,
    write_svs,
)

from medlens.errors import CorruptFileError, NoImagesFoundError, UnknownNameError
from medlens.io import discover_input
from medlens.io.slide import SlideSpec, find_slide, open_slide
from medlens.prep.slide_recipe import SlideOptions, prepare_slide
from medlens.prep.wsi import WSI_PATCH_SIZE

PATCH0 = 1792  # a 896 px patch at 20x on a 40x slide, in level-0 pixels


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_svs(root / "slide.svs"),
        "tiff": write_generic_tiff(root / "slide.tiff"),
        "dicom": write_dicom_wsi(root / "dicom"),
    }


def _expected_cells(slide, size0: int, min_tissue: float) -> dict[tuple[int, int], float]:
    """Tissue fraction of each whole grid cell, from the tissue rectangles (independent of medlens)."""
    out = {}
    for row in range(slide.height // size0):
        for col in range(slide.width // size0):
            x0, y0 = col * size0, row * size0
            area = sum(
                max(0, min(x1, x0 + size0) - max(a, x0)) * max(0, min(y1, y0 + size0) - max(b, y0))
                for a, b, x1, y1 in slide.tissue
            )
            out[(row, col)] = area / size0**2
    return out


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "backend"), [("svs", "openslide"), ("svs", "tiffslide"), ("tiff", "openslide"),
                                               ("tiff", "tiffslide"), ("dicom", "wsidicom")])  # fmt: skip
def test_slide_geometry_and_pixels(slides, kind, backend):
    synthetic = slides[kind]
    with open_slide(synthetic.path, backend) as slide:
        assert slide.backend == backend
        assert [(lv.width, lv.height) for lv in slide.levels] == list(synthetic.level_dimensions)
        assert [lv.downsample for lv in slide.levels] == pytest.approx([1.0, 4.0, 16.0], rel=1e-3)
        assert slide.mpp == pytest.approx(0.25)
        assert slide.base_magnification == pytest.approx(40.0)
        assert slide.magnification(1) == pytest.approx(10.0)
        for level in (0, 1):
            ds = synthetic.downsamples[level]
            x, y = 2048 // ds, 2496 // ds  # in tissue
            region = slide.read(x * ds, y * ds, level, 64, 48)
            assert region.shape == (48, 64, 3) and region.dtype == np.uint8
            assert np.abs(region.astype(int) - synthetic.pixels(x, y, 64, 48, level)).mean() < 6
        # past the right edge: white, not an error
        edge = slide.read(synthetic.width - 16, 0, 0, 32, 8)
        assert (edge[:, 16:] >= 250).all()


def test_unsupported_backend_and_unreadable_slide(tmp_path, slides):
    with pytest.raises(UnknownNameError, match="did you mean"):
        open_slide(slides["svs"].path, "openslid")
    bad = tmp_path / "broken.svs"
    bad.write_bytes(b"II*\x00not a tiff at all")
    with pytest.raises(CorruptFileError, match=r"broken\.svs"):
        open_slide(bad)


def test_dicom_wsi_is_found_in_a_folder_a_single_file_and_a_zip(slides, tmp_path):
    dicom = slides["dicom"]
    spec = find_slide(dicom.path, discover_input(dicom.path))
    assert spec is not None and spec.files and len(spec.files) == len(dicom.files)
    assert find_slide(dicom.files[0]).files == (str(dicom.files[0]),)
    archive = tmp_path / "slide.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in dicom.files:
            zf.write(f, f"study/{f.name}")
    from medlens.api import prepare_study

    prepared = prepare_study(archive, slide=SlideOptions(workers=0))
    assert prepared.family == "wsi" and prepared.meta["slide"]["backend"] == "wsidicom"
    assert prepared.meta["magnification"] == 20.0


def test_ordinary_studies_are_not_slides(tmp_path, pydicom_file):
    assert find_slide(pydicom_file("CT_small.dcm")) is None
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    assert find_slide(png) is None


# --------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["svs", "tiff", "dicom"])
def test_patches_match_the_known_tissue_geometry(slides, kind):
    synthetic = slides[kind]
    prepared = prepare_slide(SlideSpec(str(synthetic.path)), "medgemma-1.5", SlideOptions(workers=2))
    meta = prepared.meta
    assert (meta["magnification"], meta["level"], meta["read_size"]) == (20.0, 0, PATCH0)
    cells = _expected_cells(synthetic, PATCH0, 0.5)
    clear = {c for c, f in cells.items() if f >= 0.55}  # clearly kept; 0.45..0.55 may go either way (mask edges)
    unclear = {c for c, f in cells.items() if 0.45 <= f < 0.55}
    got = [tuple(m["grid"]) for m in prepared.image_meta]
    assert got == sorted(got)  # row-major, spatial order
    assert clear <= set(got) <= clear | unclear
    for m in prepared.image_meta:
        row, col = m["grid"]
        assert m["x0_y0"] == [col * PATCH0, row * PATCH0] and m["size_level0"] == PATCH0
        assert m["tissue_fraction"] == pytest.approx(cells[(row, col)], abs=0.05)
    assert all(img.shape == (WSI_PATCH_SIZE, WSI_PATCH_SIZE, 3) for img in prepared.images)
    # the mask, at the thumbnail's scale, agrees with the rectangles
    assert meta["mask_magnification"] == pytest.approx(5.0)
    assert prepared.overview is not None and prepared.overview.shape[:2] == (768, 1024)


def test_patch_pixels_are_the_region_shrunk_from_level0(slides):
    synthetic = slides["svs"]
    prepared = prepare_slide(SlideSpec(str(synthetic.path)), "medgemma-1.5", SlideOptions(workers=0))
    m = prepared.image_meta[0]
    x0, y0 = m["x0_y0"]
    expected = synthetic.pixels(x0, y0, PATCH0, PATCH0).reshape(896, 2, 896, 2, 3).mean(axis=(1, 3))
    assert np.abs(prepared.images[0].astype(float) - expected).mean() < 4


def test_magnification_choice_and_seeded_sampling(slides):
    spec = SlideSpec(str(slides["svs"].path))
    ten = prepare_slide(spec, "medgemma-1.5", SlideOptions(magnification=10, min_tissue=0.3, workers=0))
    assert (ten.meta["level"], ten.meta["read_size"]) == (1, 896)  # the 4x level is exactly 10x
    assert all(m["size_level0"] == 3584 for m in ten.image_meta)
    full = prepare_slide(spec, "medgemma-1.5", SlideOptions(min_tissue=0.2, workers=0))
    assert len(full.image_meta) > 3

    def grid(seed: int) -> list[tuple[int, int]]:
        options = SlideOptions(min_tissue=0.2, max_patches=3, seed=seed, workers=0)
        return [tuple(m["grid"]) for m in prepare_slide(spec, "medgemma-1.5", options).image_meta]

    picks = [grid(1), grid(1), grid(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 3 and picks[0] == sorted(picks[0])
    assert set(picks[0]) <= {tuple(m["grid"]) for m in full.image_meta}
    assert picks[2] != picks[0]
    sampled = prepare_slide(spec, "medgemma-1.5", SlideOptions(min_tissue=0.2, max_patches=3, seed=1, workers=0))
    assert any("sampled at random (seed 1)" in w for w in sampled.warnings)


def test_a_slide_lower_than_the_wanted_magnification_and_one_without_mpp(tmp_path):
    low = write_svs(tmp_path / "ten.svs", mpp=1.0, objective_power=10, width=4096, height=3072)
    prepared = prepare_slide(SlideSpec(str(low.path)), "medgemma-1.5", SlideOptions(workers=0, min_tissue=0.3))
    assert prepared.meta["magnification"] == 10.0
    assert any("20x is beyond the slide's 10x" in w for w in prepared.warnings)
    bare = write_generic_tiff(tmp_path / "bare.tiff", mpp=None)
    prepared = prepare_slide(SlideSpec(str(bare.path)), "medgemma-1.5", SlideOptions(workers=0))
    assert any("no mpp or objective power; level 0 taken as 40x" in w for w in prepared.warnings)
    fixed = prepare_slide(SlideSpec(str(bare.path)), "medgemma-1.5", SlideOptions(workers=0, mpp=0.5))
    assert fixed.meta["read_size"] == WSI_PATCH_SIZE and fixed.meta["level"] == 0  # 0.5 mpp is 20x already


def test_blank_glass_is_a_clear_error(tmp_path):
    glass = write_svs(tmp_path / "glass.svs", tissue=(), width=4096, height=3072)
    with pytest.raises(NoImagesFoundError, match=r"glass\.svs.*lower --min-tissue"):
        prepare_slide(SlideSpec(str(glass.path)), "medgemma-1.5", SlideOptions(workers=0))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_a_corrupt_tile_fails_only_its_patch(tmp_path, slides, backend):
    path = tmp_path / "corrupt.svs"
    shutil.copy(slides["svs"].path, path)
    good = prepare_slide(SlideSpec(str(path)), "medgemma-1.5", SlideOptions(workers=0))
    target = good.image_meta[1]
    x0, y0 = target["x0_y0"]
    corrupt_tile(path, level=0, tile_xy=((x0 + 300) // 256, (y0 + 300) // 256))
    prepared = prepare_slide(SlideSpec(str(path), backend), "medgemma-1.5", SlideOptions(workers=2))
    failed = prepared.meta["failed_patches"]
    assert [f["x0_y0"] for f in failed] == [[x0, y0]]
    assert failed[0]["error"]
    assert len(prepared.images) == len(good.images) - 1
    assert [m["x0_y0"] for m in prepared.image_meta] == [m["x0_y0"] for m in good.image_meta if m is not target]
    for a, b in zip(prepared.images, [img for img, m in zip(good.images, good.image_meta, strict=True)
                                      if m is not target], strict=True):  # fmt: skip
        assert np.abs(a.astype(int) - b).mean() < 1  # the other patches are read as before
    assert any("1 of" in w and "unreadable" in w for w in prepared.warnings)


# --------------------------------------------------------------------------------------------------------------
# CLI, prompt, privacy
# --------------------------------------------------------------------------------------------------------------


def test_cli_prepare_writes_patches_manifest_and_overview(slides, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = cli("prepare", slides["svs"].path, "--out", out, "--workers", "2", "-q")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["family"] == "wsi" and manifest["magnification"] == 20.0
    assert manifest["slide"]["mpp"] == pytest.approx(0.25) and manifest["slide"]["objective_power"] == 40.0
    assert len(manifest["images"]) == len(list(out.glob("0*.png"))) > 0
    first = manifest["images"][0]
    assert {"x0_y0", "level", "magnification", "tissue_fraction", "size_level0"} <= set(first)
    assert Image.open(out / first["file"]).size == (896, 896)
    overview = np.asarray(Image.open(out / "overview.png").convert("RGB"))
    assert ((overview == (0, 60, 255)).all(-1)).any()  # patch outlines drawn
    assert ((overview == (0, 200, 0)).all(-1)).any()  # tissue outline drawn


def test_labels_and_patient_data_never_come_out(slides, tmp_path, cli):
    for name in ("svs", "dicom"):
        out = tmp_path / name
        code, _, err = cli("prepare", slides[name].path, "--out", out, "-q")
        assert code == 0, err
        text = (out / "manifest.json").read_text()
        assert FAKE_PATIENT_NAME not in text and FAKE_PATIENT_ID not in text
        # the label (black text on white) is nowhere among the written images
        for png in out.glob("*.png"):
            rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
            assert (rgb.max(axis=-1) < 40).mean() < 0.001, png.name
    code, out, err = cli("inspect", slides["dicom"].path)
    assert code == 0 and "level 2: 512x384, downsample 16, 2.5x" in out
    assert FAKE_PATIENT_NAME not in out + err


def test_cli_errors_exit_2_naming_the_slide(tmp_path, slides, cli):
    code, _, err = cli("prepare", slides["svs"].path, "--out", tmp_path / "o", "--magnification", "7")
    assert code == 2 and "--magnification must be one of 5, 10, 20" in err and "slide.svs" in err
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"\x00" * 100)
    code, _, err = cli("prepare", broken, "--out", tmp_path / "o")
    assert code == 2 and "broken.svs" in err
    code, _, err = cli("prepare", slides["svs"].path, "--out", tmp_path / "o", "--slide-backend", "nope")
    assert code == 2 and "slide backend" in err


def test_ask_about_a_slide_uses_the_recipe_layout(slides, tiny_backend):
    from medlens.api import prepare_study
    from medlens.prompts import messages_for

    options = SlideOptions(tissue="breast", procedure="core needle biopsy", workers=0)
    prepared = prepare_study(slides["svs"].path, slide=options)
    content = messages_for(prepared, "What is the diagnosis?")[0]["content"]
    n = len(prepared.images)
    assert [part["type"] for part in content] == ["image"] * n + ["text"]
    text = content[-1]["text"]
    assert f"{n} non-overlapping patches at 20x" in text and "breast core needle biopsy" in text
    assert text.endswith("What is the diagnosis?")

    from medlens.api import ask

    result = ask(slides["svs"].path, "What is the diagnosis?", tiny_backend, slide=options)
    assert result["n_images"] == n and result["details"]["family"] == "wsi"
    assert result["details"]["magnification"] == 20.0 and len(result["details"]["patches"]) == n
    assert "Research use only" in result["disclaimer"]


def _scipy_morphology(monkeypatch) -> None:
    """Put the old, scipy-only morphology and labelling back into the recipe (the reference the OpenCV path
    must equal)."""
    from scipy import ndimage

    import medlens.prep.slide_recipe as recipe_mod
    import medlens.prep.wsi as wsi_mod

    def erode(mask, structure, iterations=1):
        return ndimage.binary_erosion(mask, structure=structure, iterations=iterations)

    def dilate(mask, structure):
        return ndimage.binary_dilation(mask, structure=structure)

    def drop_small(mask, min_pixels):
        labels, n = ndimage.label(mask)
        keep = np.bincount(labels.ravel(), minlength=n + 1) >= max(min_pixels, 1.0)
        keep[0] = False
        return keep[labels]

    def edge(mask, width):
        return mask & ~ndimage.binary_erosion(mask, ndimage.generate_binary_structure(2, 1), iterations=width)

    monkeypatch.setattr(wsi_mod, "binary_erode", erode)
    monkeypatch.setattr(wsi_mod, "binary_dilate", dilate)
    monkeypatch.setattr(wsi_mod, "fill_holes", ndimage.binary_fill_holes)
    monkeypatch.setattr(wsi_mod, "drop_small_components", drop_small)
    monkeypatch.setattr(recipe_mod, "inner_edge", edge)


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_chosen_patches_equal_the_scipy_reference(slides, kind, monkeypatch):
    """The fast morphology must not move a single patch: level, coordinates, fractions, pixels and overview
    equal those of the recipe run with scipy's own erosion/dilation."""
    spec = SlideSpec(str(slides[kind].path))
    fast = prepare_slide(spec, "medgemma-1.5", SlideOptions(workers=0, min_tissue=0.3))
    with monkeypatch.context() as m:
        _scipy_morphology(m)
        ref = prepare_slide(spec, "medgemma-1.5", SlideOptions(workers=0, min_tissue=0.3))
    assert len(ref.image_meta) > 1
    assert fast.image_meta == ref.image_meta
    assert fast.meta["level"] == ref.meta["level"] and fast.meta["n_tissue_patches"] == ref.meta["n_tissue_patches"]
    assert all(np.array_equal(a, b) for a, b in zip(fast.images, ref.images, strict=True))
    assert np.array_equal(fast.overview, ref.overview)
