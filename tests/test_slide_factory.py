"""The synthetic whole-slide builders write what they claim, as seen by OpenSlide, tiffslide and wsidicom."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import pytest
import tiffslide
import wsidicom
from PIL import Image
from pydicom import dcmread
from pydicom.uid import JPEGBaseline8Bit, VLWholeSlideMicroscopyImageStorage
from slide_factory import (
    DEFAULT_TISSUE,
    FAKE_PATIENT_ID,
    FAKE_PATIENT_NAME,
    SyntheticSlide,
    corrupt_tile,
    label_image,
    scaled_tissue,
    slide_pixels,
    write_dicom_wsi,
    write_generic_tiff,
    write_svs,
)

from medlens.prep.wsi import tissue_mask

W, H = 8192, 6144
#: Level-0 points (multiples of 16) whose 32-pixel regions lie wholly in tissue / glass on every level.
TISSUE_POINTS = ((2048, 2496), (6000, 1600), (6736, 4544))
GLASS_POINTS = ((48, 48), (3712, 4304))
REGION = 32


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SyntheticSlide]:
    root = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_svs(root / "slide.svs"),
        "tiff": write_generic_tiff(root / "slide.tif"),
        "dicom": write_dicom_wsi(root / "dicom"),
    }


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue (degrees), saturation and value (0..1) of every pixel."""
    hsv = np.asarray(Image.fromarray(rgb).convert("HSV")).reshape(-1, 3).astype(float)
    return hsv[:, 0] * 360 / 255, hsv[:, 1] / 255, hsv[:, 2] / 255


# ---- readers: region at a level-0 location, `REGION` pixels of that level a side, as RGB uint8 ----------------


def _openslide(slide: SyntheticSlide, level: int, x: int, y: int) -> np.ndarray:
    target = slide.files[0] if slide.format == "dicom" else slide.path
    with openslide.OpenSlide(target) as osr:
        return np.asarray(osr.read_region((x, y), level, (REGION, REGION)).convert("RGB"))


def _tiffslide(slide: SyntheticSlide, level: int, x: int, y: int) -> np.ndarray:
    with tiffslide.TiffSlide(slide.path) as ts:
        return np.asarray(ts.read_region((x, y), level, (REGION, REGION)).convert("RGB"))


def _wsidicom(slide: SyntheticSlide, level: int, x: int, y: int) -> np.ndarray:
    d = slide.downsamples[level]
    with wsidicom.WsiDicom.open(slide.path) as wsi:
        # wsidicom names levels by log2(downsample) and takes the location in that level's pixels.
        wsi_level = wsi.levels[level].level
        return np.asarray(wsi.read_region((x // d, y // d), wsi_level, (REGION, REGION)).convert("RGB"))


READERS: dict[str, tuple[str, Callable[[SyntheticSlide, int, int, int], np.ndarray]]] = {
    "openslide-svs": ("svs", _openslide),
    "tiffslide-svs": ("svs", _tiffslide),
    "openslide-tiff": ("tiff", _openslide),
    "tiffslide-tiff": ("tiff", _tiffslide),
    "wsidicom": ("dicom", _wsidicom),
    "openslide-dicom": ("dicom", _openslide),
}


# ---- content model --------------------------------------------------------------------------------------------


def test_slide_pixels_are_tilewise_and_deterministic() -> None:
    whole = slide_pixels(W, H, DEFAULT_TISSUE, 480, 800, 300, 200)
    rows = [np.hstack([slide_pixels(W, H, DEFAULT_TISSUE, x, y, 150, 100) for x in (480, 630)]) for y in (800, 900)]
    assert np.array_equal(np.vstack(rows), whole)
    assert np.array_equal(whole, slide_pixels(W, H, DEFAULT_TISSUE, 480, 800, 300, 200))
    assert not np.array_equal(whole, slide_pixels(W, H, DEFAULT_TISSUE, 480, 800, 300, 200, seed=1))
    assert slide_pixels(1000, 700, (), downsample=4).shape == (175, 250, 3)


def test_glass_is_near_white_and_tissue_is_he_coloured() -> None:
    glass = slide_pixels(W, H, DEFAULT_TISSUE, 0, 0, 512, 512)
    assert glass.min() >= 235 and glass.max() <= 250
    assert _hsv(glass)[1].max() < 0.03
    hue, sat, val = _hsv(slide_pixels(W, H, DEFAULT_TISSUE, 1000, 1000, 1024, 1024))
    assert hue.min() >= 300 and hue.max() <= 340
    assert sat.min() >= 0.3 and sat.max() <= 0.65
    assert val.min() >= 0.55 and val.max() <= 0.9
    assert np.percentile(val, 95) - np.percentile(val, 5) > 0.08  # textured, not flat


@pytest.mark.parametrize("d", [4, 16])
def test_lower_levels_are_area_averages_of_level_0(d: int) -> None:
    n = 64
    level = slide_pixels(W, H, DEFAULT_TISSUE, 30, 40, n, n, downsample=d).astype(float)
    full = slide_pixels(W, H, DEFAULT_TISSUE, 30 * d, 40 * d, n * d, n * d).astype(float)
    averaged = full.reshape(n, d, n, d, 3).mean(axis=(1, 3))
    diff = np.abs(level - averaged)
    assert diff.mean() < 1.0 and diff.max() < 8  # only the (independent) noise differs


def test_tissue_mask_recovers_the_tissue_rectangles() -> None:
    d = 8  # 40x slide -> 5x thumbnail
    mask = tissue_mask(slide_pixels(W, H, DEFAULT_TISSUE, downsample=d))
    truth = np.zeros_like(mask)
    for x0, y0, x1, y1 in DEFAULT_TISSUE:
        truth[y0 // d : -(-y1 // d), x0 // d : -(-x1 // d)] = True
    assert (mask & truth).sum() / (mask | truth).sum() > 0.98


def test_geometry_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="overlap"):
        write_svs(tmp_path / "a.svs", tissue=((0, 0, 100, 100), (50, 50, 200, 200)))
    with pytest.raises(ValueError, match="outside"):
        write_generic_tiff(tmp_path / "a.tif", width=1000, height=800, tissue=((900, 0, 1100, 100),))
    with pytest.raises(ValueError, match="downsamples"):
        write_dicom_wsi(tmp_path / "dicom", downsamples=(1, 16, 4))
    assert list(tmp_path.iterdir()) == []  # nothing written before the checks
    assert scaled_tissue(W, H) == DEFAULT_TISSUE
    assert scaled_tissue(W // 2, H // 2)[2] == (2650, 1650, 4096, 2900)  # still touches the right edge


# ---- SVS ------------------------------------------------------------------------------------------------------


def test_svs_as_seen_by_openslide(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["svs"]
    assert openslide.OpenSlide.detect_format(slide.path) == "aperio"
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.level_count == 3
        assert osr.level_dimensions == ((8192, 6144), (2048, 1536), (512, 384)) == slide.level_dimensions
        assert osr.level_downsamples == (1.0, 4.0, 16.0)
        props = osr.properties
        assert props["openslide.vendor"] == "aperio"
        assert float(props["openslide.mpp-x"]) == float(props["openslide.mpp-y"]) == 0.25
        assert float(props["openslide.objective-power"]) == 40
        assert props["tiff.ImageDescription"].startswith("Aperio Image Library")
        assert set(osr.associated_images) == {"thumbnail", "label", "macro"} == set(slide.associated)
        label = np.asarray(osr.associated_images["label"].convert("RGB"))
        assert np.array_equal(label, label_image())  # LZW: lossless
        assert osr.associated_images["thumbnail"].size == (1024, 768)


def test_svs_as_seen_by_tiffslide(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["svs"]
    with tiffslide.TiffSlide(slide.path) as ts:
        assert ts.properties["tiffslide.vendor"] == "aperio"
        assert ts.level_dimensions == slide.level_dimensions
        assert ts.level_downsamples == (1.0, 4.0, 16.0)
        assert ts.properties["tiffslide.mpp-x"] == ts.properties["tiffslide.mpp-y"] == 0.25
        assert ts.properties["tiffslide.objective-power"] == 40
        assert set(ts.associated_images) == {"thumbnail", "label", "macro"}
        assert np.array_equal(np.asarray(ts.associated_images["label"].convert("RGB")), label_image())


def test_svs_label_and_macro_show_the_fake_patient(slides: dict[str, SyntheticSlide]) -> None:
    label = label_image()
    ink = label[: label.shape[0] // 2] < 100  # the name and ID lines (barcode is below)
    assert ink.any(axis=-1).sum() > 500
    with openslide.OpenSlide(slides["svs"].path) as osr:
        macro = np.asarray(osr.associated_images["macro"].convert("RGB")).astype(float)
    h = macro.shape[0] - 32
    shrunk = np.asarray(Image.fromarray(label).resize((h * 6 // 5, h))).astype(float)
    assert np.abs(macro[16 : 16 + h, 16 : 16 + shrunk.shape[1]] - shrunk).mean() < 6  # label pasted in the macro


def test_svs_without_mpp_power_label_or_macro(tmp_path: Path) -> None:
    slide = write_svs(
        tmp_path / "bare.svs", width=1000, height=700, mpp=None, objective_power=None, label=False, macro=False
    )
    assert slide.level_dimensions == ((1000, 700), (250, 175), (63, 44))
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.properties["openslide.vendor"] == "aperio"
        assert "openslide.mpp-x" not in osr.properties
        assert "openslide.objective-power" not in osr.properties
        assert set(osr.associated_images) == {"thumbnail"}
        assert osr.level_dimensions == slide.level_dimensions


def test_odd_sized_slide_pads_edge_tiles(tmp_path: Path) -> None:
    slide = write_svs(tmp_path / "odd.svs", width=3000, height=2000, tile=512, tissue=((2500, 1500, 3000, 2000),))
    assert slide.level_dimensions == ((3000, 2000), (750, 500), (188, 125))
    with openslide.OpenSlide(slide.path) as osr, tiffslide.TiffSlide(slide.path) as ts:
        assert osr.level_dimensions == ts.level_dimensions == slide.level_dimensions
        corner = slide.pixels(2936, 1936, 64, 64).astype(float)  # bottom-right corner: tissue up to the edge
        for reader in (osr, ts):
            got = np.asarray(reader.read_region((2936, 1936), 0, (64, 64)).convert("RGB")).astype(float)
            assert np.abs(got - corner).mean() < 4


# ---- generic TIFF ---------------------------------------------------------------------------------------------


def test_generic_tiff_as_seen_by_openslide_and_tiffslide(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["tiff"]
    assert slide.objective_power is None and slide.mpp_source == "tiff-resolution"
    assert openslide.OpenSlide.detect_format(slide.path) == "generic-tiff"
    with openslide.OpenSlide(slide.path) as osr:
        assert osr.level_dimensions == slide.level_dimensions and osr.level_downsamples == (1.0, 4.0, 16.0)
        assert osr.properties["openslide.vendor"] == "generic-tiff"
        assert float(osr.properties["openslide.mpp-x"]) == 0.25  # from XResolution, unit centimetre
        assert osr.properties["tiff.ResolutionUnit"] == "centimeter"
        assert "openslide.objective-power" not in osr.properties
        assert dict(osr.associated_images) == {}
    with tiffslide.TiffSlide(slide.path) as ts:
        assert ts.properties["tiffslide.vendor"] is None  # tiffslide has no name for plain TIFF
        assert ts.level_dimensions == slide.level_dimensions
        assert ts.properties["tiffslide.mpp-x"] == 0.25
        assert ts.properties["tiffslide.objective-power"] is None
        assert dict(ts.associated_images) == {}


def test_generic_tiff_without_resolution_has_no_mpp(tmp_path: Path) -> None:
    slide = write_generic_tiff(tmp_path / "nompp.tif", width=1024, height=768, mpp=None)
    assert slide.mpp is None and slide.mpp_source == "none"
    with openslide.OpenSlide(slide.path) as osr:
        assert "openslide.mpp-x" not in osr.properties
        assert osr.level_count == 3
    with tiffslide.TiffSlide(slide.path) as ts:
        assert ts.properties["tiffslide.mpp-x"] is None


def test_tiffslide_sees_generic_tiff_levels_only_with_a_uniform_factor(tmp_path: Path) -> None:
    slide = write_generic_tiff(tmp_path / "x8.tif", width=1024, height=512, downsamples=(1, 8))
    with openslide.OpenSlide(slide.path) as osr, tiffslide.TiffSlide(slide.path) as ts:
        assert osr.level_dimensions == slide.level_dimensions == ((1024, 512), (128, 64))
        assert ts.level_dimensions == ((1024, 512),)  # tifffile pyramidizes factors 2, 3 and 4 only


def test_threaded_writing_gives_the_same_file(tmp_path: Path) -> None:
    one = write_generic_tiff(tmp_path / "one.tif", width=1024, height=768, workers=1)
    two = write_generic_tiff(tmp_path / "two.tif", width=1024, height=768, workers=2)
    assert one.path.read_bytes() == two.path.read_bytes()


# ---- DICOM WSI ------------------------------------------------------------------------------------------------


def test_dicom_files(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["dicom"]
    assert [p.name for p in slide.files] == ["level-0.dcm", "level-1.dcm", "level-2.dcm", "label.dcm"]
    datasets = [dcmread(p, stop_before_pixels=True) for p in slide.files]
    for ds in datasets:
        assert ds.SOPClassUID == VLWholeSlideMicroscopyImageStorage and ds.Modality == "SM"
        assert ds.PatientName == FAKE_PATIENT_NAME and ds.PatientID == FAKE_PATIENT_ID
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "ContainerIdentifier"):
            assert ds[key].value == datasets[0][key].value
    for ds, d, (w, h) in zip(datasets, slide.downsamples, slide.level_dimensions, strict=False):
        assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
        assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.DimensionOrganizationType == "TILED_FULL"
        assert (ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows) == (w, h)
        assert ds.NumberOfFrames == -(-w // 256) * -(-h // 256)
        spacing = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
        assert [float(v) for v in spacing] == [0.25e-3 * d] * 2  # millimetres
        assert ds.ImageType[2] == "VOLUME"
    assert datasets[-1].ImageType[2] == "LABEL" and datasets[-1].SpecimenLabelInImage == "YES"


def test_dicom_as_seen_by_wsidicom(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["dicom"]
    with wsidicom.WsiDicom.open(slide.path) as wsi:
        assert [(lv.size.width, lv.size.height) for lv in wsi.levels] == list(slide.level_dimensions)
        assert [lv.level for lv in wsi.levels] == [0, 2, 4]  # log2 of the downsample
        assert (wsi.mpp.width, wsi.mpp.height) == (0.25, 0.25)
        assert wsi.levels[1].mpp.width == pytest.approx(1.0)
        assert wsi.labels is not None
        assert np.array_equal(np.asarray(wsi.read_label().convert("RGB")), label_image())


def test_dicom_as_seen_by_openslide(slides: dict[str, SyntheticSlide]) -> None:
    slide = slides["dicom"]
    assert openslide.OpenSlide.detect_format(slide.files[0]) == "dicom"
    with openslide.OpenSlide(slide.files[0]) as osr:
        assert osr.properties["openslide.vendor"] == "dicom"
        assert osr.level_dimensions == slide.level_dimensions and osr.level_downsamples == (1.0, 4.0, 16.0)
        assert float(osr.properties["openslide.mpp-x"]) == 0.25
        assert float(osr.properties["openslide.objective-power"]) == 40
        assert set(osr.associated_images) == {"label"}
        # OpenSlide passes the patient attributes on as properties: a leak to guard against downstream.
        assert osr.properties["dicom.PatientName"] == FAKE_PATIENT_NAME


# ---- pixels on every level and reader -------------------------------------------------------------------------


@pytest.mark.parametrize("reader", list(READERS))
def test_pixels_match_on_every_level(slides: dict[str, SyntheticSlide], reader: str) -> None:
    fmt, read = READERS[reader]
    slide = slides[fmt]
    for level, d in enumerate(slide.downsamples):
        for (x, y), tissue in [(p, True) for p in TISSUE_POINTS] + [(p, False) for p in GLASS_POINTS]:
            assert slide.is_tissue(x, y) == tissue
            got = read(slide, level, x, y)
            want = slide.pixels(x // d, y // d, REGION, REGION, level)
            assert np.abs(got.astype(float) - want).mean() < 4, (level, x, y)  # JPEG error only
            _, sat, val = _hsv(got)
            if tissue:
                assert np.median(sat) > 0.3, (level, x, y)
            else:
                assert np.median(sat) < 0.05 and np.median(val) > 0.93, (level, x, y)


# ---- corrupt tiles --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["svs", "tiff"])
@pytest.mark.parametrize("level", [0, 1])
def test_corrupt_tile_breaks_only_that_tile(
    slides: dict[str, SyntheticSlide], tmp_path: Path, fmt: str, level: int
) -> None:
    path = tmp_path / slides[fmt].path.name
    shutil.copy(slides[fmt].path, path)
    col, row = 3, 2
    corrupt_tile(path, level=level, tile_xy=(col, row))
    d = slides[fmt].downsamples[level]
    bad = ((col * 256 + 100) * d, (row * 256 + 100) * d)  # level-0 location inside the tile
    good = ((col + 1) * 256 * d, row * 256 * d)  # the next tile to the right
    with openslide.OpenSlide(path) as osr:
        assert osr.read_region(good, level, (64, 64)).size == (64, 64)
        with pytest.raises(openslide.OpenSlideError):
            osr.read_region(bad, level, (16, 16))
        # OpenSlide's error state is sticky: after one failed decode the handle refuses everything.
        with pytest.raises(openslide.OpenSlideError):
            osr.read_region(good, level, (64, 64))
    with openslide.OpenSlide(path) as osr:  # a fresh handle reads the rest again
        got = np.asarray(osr.read_region(good, level, (64, 64)).convert("RGB")).astype(float)
        want = slides[fmt].pixels(good[0] // d, good[1] // d, 64, 64, level)
        assert np.abs(got - want).mean() < 4
    with tiffslide.TiffSlide(path) as ts:
        with pytest.raises(imagecodecs.Jpeg8Error):
            ts.read_region(bad, level, (16, 16))
        got = np.asarray(ts.read_region(good, level, (64, 64)).convert("RGB")).astype(float)  # no sticky state
        assert np.abs(got - want).mean() < 4


def test_corrupt_tile_rejects_tiles_outside_the_level(slides: dict[str, SyntheticSlide], tmp_path: Path) -> None:
    path = tmp_path / "slide.tif"
    shutil.copy(slides["tiff"].path, path)
    with pytest.raises(IndexError):
        corrupt_tile(path, level=2, tile_xy=(2, 0))  # level 2 is 512 px wide: 2 tiles
