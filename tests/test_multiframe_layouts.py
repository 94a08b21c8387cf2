"""Multi-frame layouts that are not slices of a volume (issue 11, item 4): Siemens MOSAICs are untiled into
their slices from the CSA header's count, cine clips and multi-frame secondary captures are refused as volumes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from dicom_factory import csa2_header, write_cine, write_mosaic, write_series

from medlens import errors
from medlens.io import open_input
from medlens.prep import prepare


def tiles(n: int, h: int = 24, w: int = 32) -> np.ndarray:
    """n distinct slices: slice i holds 1000 * i plus a ramp, so a misplaced tile is seen."""
    ramp = np.arange(h * w, dtype=np.int32).reshape(h, w) % 97
    return np.stack([1000 * i + ramp for i in range(n)]).astype(np.uint16)


def test_factory_csa_header_parses_with_nibabel():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nibabel: "DICOM readers are highly experimental"
        from nibabel.nicom import csareader

        parsed = csareader.read(csa2_header({"NumberOfImagesInMosaic": ["13"], "B_value": ["0", "1"]}))
    assert csareader.get_n_mosaic(parsed) == 13
    assert parsed["tags"]["B_value"]["items"] == [0, 1]


@pytest.mark.parametrize("n", [1, 4, 10, 16])
def test_mosaic_is_untiled_into_its_slices_in_tile_order(tmp_path, n):
    expected = tiles(n)
    stack = open_input(write_mosaic(tmp_path / "mosaic.dcm", expected))
    assert len(stack) == n and (stack.rows, stack.columns) == expected.shape[1:]
    assert np.array_equal(stack.load(list(range(n))), expected.astype(np.float32))
    assert np.array_equal(stack.load([n - 1]), expected[-1:].astype(np.float32)), "one tile alone"
    assert any("MOSAIC untiled into" in note and "tile order" in note for note in stack.notes)


def test_mosaic_prepares_as_an_mr_volume(tmp_path):
    prepared = prepare(open_input(write_mosaic(tmp_path / "mosaic.dcm", tiles(9))))
    assert prepared.family == "mr" and len(prepared.images) == 9
    assert prepared.images[0].shape == (24, 32, 3)
    assert not np.array_equal(prepared.images[0], prepared.images[8])


@pytest.mark.parametrize(
    ("count", "reason"),
    [(None, "without NumberOfImagesInMosaic"), (5, "does not tile"), (0, "without NumberOfImagesInMosaic")],
)
def test_mosaic_without_a_usable_count_is_refused_with_the_reason(tmp_path, count, reason):
    path = write_mosaic(tmp_path / "mosaic.dcm", tiles(10, 32, 32), count_in_csa=count)
    with pytest.raises(errors.InconsistentSeriesError) as info:
        open_input(path)
    assert reason in info.value.reason and "MOSAIC" in info.value.reason and info.value.path == str(path)


def test_ultrasound_cine_clip_is_not_a_volume(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (42, 32, 32, 3), dtype=np.uint8)
    path = write_cine(tmp_path / "echo.dcm", frames)
    with pytest.raises(errors.InconsistentSeriesError) as info:
        open_input(path)
    assert "a 42-frame ultrasound cine clip, not slices of a volume" in info.value.reason
    assert "export one frame" in info.value.reason


@pytest.mark.parametrize("timing", ["FrameTime", "CineRate"])
def test_timed_grey_clip_is_not_a_volume(tmp_path, timing):
    frames = np.stack([np.full((32, 32), 10 * i, np.uint16) for i in range(6)])
    path = write_cine(tmp_path / "xa.dcm", frames, modality="XA")
    if timing == "CineRate":
        import pydicom

        ds = pydicom.dcmread(path)
        del ds.FrameTime, ds.FrameIncrementPointer
        ds.CineRate = 15
        ds.save_as(path)
    with pytest.raises(errors.InconsistentSeriesError) as info:
        open_input(path)
    assert "6-frame XA cine clip" in info.value.reason


def test_untimed_grey_multiframe_of_another_modality_still_reads(tmp_path):
    frames = np.stack([np.full((32, 32), 10 * i, np.uint16) for i in range(6)])
    stack = open_input(write_cine(tmp_path / "xa.dcm", frames, modality="XA", frame_time=None))
    assert len(stack) == 6


def test_multiframe_secondary_capture_is_not_a_volume(tmp_path):
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    path = write_cine(tmp_path / "sc.dcm", frames, modality="OT", secondary_capture=True)
    with pytest.raises(errors.InconsistentSeriesError) as info:
        open_input(path)
    assert "a 3-frame secondary capture without slice positions" in info.value.reason


def test_cine_beside_a_volume_is_skipped_with_its_reason(tmp_path):
    cine = np.zeros((20, 32, 32, 3), np.uint8)
    ct = [np.full((32, 32), 1024 + i, np.int16) for i in range(4)]
    write_series(tmp_path / "ct", ct)
    write_cine(tmp_path / "us" / "clip.dcm", cine, extra={"StudyInstanceUID": "1.2.3.4"})
    for p in (tmp_path / "ct").iterdir():
        import pydicom

        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID = "1.2.3.4"
        ds.save_as(p)
    stack = open_input(tmp_path)
    assert stack.modality == "CT" and len(stack) == 4
    assert any("20-frame ultrasound cine clip" in note for note in stack.notes)


def test_corpus_echo_clip_is_refused_as_a_cine(pydicom_file):
    with pytest.raises(errors.InconsistentSeriesError) as info:
        open_input(pydicom_file("examples_ybr_color.dcm"))
    assert "30-frame ultrasound cine clip" in info.value.reason
