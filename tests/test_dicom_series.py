"""DICOM series: geometric ordering, checks that a series is one volume, series choice, multi-frame,
compression, radiograph display, and the typed errors for bad input."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    GDCM_ENCODED,
    PYDICOM_ENCODED,
    truncate,
    write_enhanced,
    write_non_image,
    write_not_dicom,
    write_radiograph,
    write_series,
)

from medlens import errors
from medlens.io import open_input
from medlens.prep import prepare
from medlens.privacy import short_hash

SIZE = 24


def slices(n: int, size: int = SIZE) -> list[np.ndarray]:
    """Stored values 1000 + 10 i everywhere in slice i (HU -24 + 10 i with the default rescale)."""
    return [np.full((size, size), 1000 + 10 * i, np.uint16) for i in range(n)]


def hu_of(stack) -> list[float]:
    return [float(a[0, 0]) for a in stack.load(range(len(stack)))]


def test_geometric_order_ignores_instance_numbers_and_file_names(tmp_path):
    n = 12
    rng = np.random.default_rng(3)
    perm = rng.permutation(n)
    write_series(
        tmp_path,
        slices(n),
        positions=[(0, 0, 2.5 * i) for i in range(n)],
        instance_numbers=[int(p) + 1 for p in perm],
        filenames=[f"x{int(q):03d}.dcm" for q in rng.permutation(n)],
    )
    stack = open_input(tmp_path)
    assert hu_of(stack) == [-24 + 10 * i for i in range(n)]
    assert [s.z for s in stack.slices] == pytest.approx([2.5 * i for i in range(n)])
    assert stack.slice_spacing == pytest.approx(2.5)


def test_flipped_row_direction_still_runs_inferior_to_superior(tmp_path):
    n = 6
    write_series(
        tmp_path, slices(n)[::-1], positions=[(0, 0, -5.0 * i) for i in range(n)], orientation=(-1, 0, 0, 0, 1, 0)
    )
    stack = open_input(tmp_path)
    # normal of (-1,0,0)x(0,1,0) points down; medlens flips it so z increases upwards
    assert [s.z for s in stack.slices] == pytest.approx(sorted(s.z for s in stack.slices))
    assert hu_of(stack) == [-24 + 10 * i for i in range(n)]


def test_oblique_stack_is_ordered_along_its_normal(tmp_path):
    n = 5
    c, s = np.cos(0.3), np.sin(0.3)
    orientation = (1, 0, 0, 0, c, -s)  # tilted axial (gantry tilt)
    normal = np.cross([1, 0, 0], [0, c, -s])
    positions = [tuple(normal * 3.0 * i + np.array([0, c, -s]) * 4.0 * i) for i in range(n)]  # + in-plane shift
    order = [3, 0, 4, 1, 2]
    write_series(
        tmp_path, [slices(n)[i] for i in order], positions=[positions[i] for i in order], orientation=orientation
    )
    stack = open_input(tmp_path)
    assert hu_of(stack) == [-24 + 10 * i for i in range(n)]
    assert stack.slice_spacing == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("positions", "message"),
    [
        ([(0, 0, z) for z in (0, 2, 4, 8, 10)], "inconsistent slice spacing"),
        ([(0, 0, z) for z in (0, 2, 2, 4, 6)], "repeated"),
    ],
)
def test_uneven_or_repeated_positions_are_rejected(tmp_path, cli, positions, message):
    write_series(tmp_path / "s", slices(5), positions=positions)
    with pytest.raises(errors.InconsistentSeriesError, match=message):
        open_input(tmp_path / "s")
    code, _out, err = cli("prepare", tmp_path / "s", "--out", tmp_path / "out", "-q")
    assert code == 2 and message in err and str(tmp_path / "s") in err and err.count("\n") == 1


def test_mixed_orientations_are_rejected(tmp_path):
    orientations = [(1, 0, 0, 0, 1, 0)] * 4 + [(1, 0, 0, 0, 0, -1)]
    write_series(tmp_path, slices(5), positions=[(0, 0, i) for i in range(5)], orientation=orientations)
    with pytest.raises(errors.InconsistentSeriesError, match="mixed slice orientations"):
        open_input(tmp_path)


def test_missing_positions_fall_back_to_instance_number(tmp_path):
    write_series(tmp_path, slices(4)[::-1], instance_numbers=[4, 3, 2, 1], omit=("ImagePositionPatient",))
    stack = open_input(tmp_path)
    assert hu_of(stack) == [-24 + 10 * i for i in range(4)]
    assert all(s.z is None for s in stack.slices)
    assert any("InstanceNumber" in note for note in stack.notes)


def test_different_slice_sizes_are_rejected(tmp_path):
    arrays = [*slices(3), np.full((SIZE + 8, SIZE), 1000, np.uint16)]
    write_series(tmp_path, arrays)
    with pytest.raises(errors.InconsistentSeriesError, match="different sizes"):
        open_input(tmp_path)


def _two_series(tmp_path: Path) -> tuple[str, str]:
    study = "1.2.826.0.1.3680043.8.498.1"
    axial, coronal = "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"
    write_series(tmp_path / "a", slices(6), series_uid=axial, study_uid=study, positions=[(0, 0, i) for i in range(6)])
    write_series(
        tmp_path / "c",
        slices(9),
        series_uid=coronal,
        study_uid=study,
        orientation=(1, 0, 0, 0, 0, -1),
        positions=[(0, i, 0) for i in range(9)],
    )
    return axial, coronal


def test_axial_series_preferred_over_a_longer_coronal_one(tmp_path):
    axial, coronal = _two_series(tmp_path)
    stack = open_input(tmp_path)
    assert stack.series_uid == axial
    assert any("picked series" in n and short_hash(axial) in n for n in stack.notes)
    assert not any(axial in n or coronal in n for n in stack.notes)  # notes carry hashes, not UIDs


@pytest.mark.parametrize("by_hash", [False, True])
def test_series_chosen_by_uid_or_short_hash(tmp_path, by_hash):
    _, coronal = _two_series(tmp_path)
    wanted = short_hash(coronal) if by_hash else coronal
    stack = open_input(tmp_path, series=wanted)
    assert stack.series_uid == coronal and len(stack) == 9


def test_unknown_series_and_several_studies(tmp_path):
    _two_series(tmp_path)
    with pytest.raises(errors.SeriesSelectionError, match="not in the input"):
        open_input(tmp_path, series="1.2.3.4")
    write_series(tmp_path / "other", slices(3), study_uid="1.2.826.0.1.3680043.8.498.99")
    with pytest.raises(errors.SeriesSelectionError, match=r"[23] different studies"):
        open_input(tmp_path)


def test_series_over_512_pixels_is_not_preferred(tmp_path):
    study = "1.2.826.0.1.3680043.8.498.10"
    write_series(
        tmp_path / "big",
        [np.full((520, 520), 1000, np.uint16)] * 8,
        study_uid=study,
        positions=[(0, 0, i) for i in range(8)],
    )
    write_series(tmp_path / "small", slices(5), study_uid=study, positions=[(0, 0, i) for i in range(5)])
    stack = open_input(tmp_path)
    assert (stack.rows, len(stack)) == (SIZE, 5)


def test_85_slice_sampling_through_prepare(tmp_path):
    n = 200
    write_series(
        tmp_path,
        [np.full((SIZE, SIZE), i, np.uint16) for i in range(n)],
        positions=[(0, 0, 1.25 * i) for i in range(n)],
        rescale=(1.0, 0.0),
        instance_numbers=list(np.random.default_rng(0).permutation(n) + 1),
    )
    prepared = prepare(open_input(tmp_path))
    assert len(prepared.images) == 85
    expected = np.rint(np.linspace(0, n - 1, 85)).astype(int)
    # HU == slice index here; the red channel is the -1024..1024 window of it
    red = [int(img[0, 0, 0]) for img in prepared.images]
    assert red == [int(np.rint((i + 1024) / 2048 * 255)) for i in expected]
    zs = [s.z for s in prepared.slices]
    assert zs[0] == 0 and zs[-1] == pytest.approx(1.25 * (n - 1)) and zs == sorted(zs)
    assert any("85 sampled" in w for w in prepared.warnings)


def test_ct_prepare_applies_rescale_and_windows(tmp_path):
    arrays = [np.array([[0, 1024, 1064, 2048]] * 16, np.uint16).repeat(4, axis=1)] * 5  # HU -1024, 0, 40, 1024
    write_series(tmp_path, arrays, positions=[(0, 0, i) for i in range(5)], rescale=(1.0, -1024.0))
    prepared = prepare(open_input(tmp_path))
    assert prepared.family == "ct" and prepared.is_volume
    row = prepared.images[0][0, ::4]
    assert row.tolist() == [[0, 0, 0], [128, 98, 0], [132, 128, 128], [255, 255, 255]]


def test_mri_uses_one_min_max_for_the_whole_volume(tmp_path):
    arrays = [np.full((SIZE, SIZE), v, np.uint16) for v in (100, 200, 300, 500)]
    arrays[1][0, 0] = 900  # volume maximum sits in slice 2
    write_series(tmp_path, arrays, modality="MR", rescale=None, positions=[(0, 0, i) for i in range(4)])
    prepared = prepare(open_input(tmp_path))
    assert prepared.family == "mr"
    centres = [int(img[5, 5, 0]) for img in prepared.images]
    assert centres == [0, round(100 / 800 * 255), round(200 / 800 * 255), round(400 / 800 * 255)]
    assert all((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all() for img in prepared.images)


def test_enhanced_multiframe_ct_frames_are_sorted_and_rescaled_per_frame(tmp_path):
    n = 7
    frames = np.stack([np.full((SIZE, SIZE), 100 * i, np.uint16) for i in range(n)])
    path = write_enhanced(
        tmp_path / "enh.dcm",
        frames,
        positions=[(0, 0, 3.0 * i) for i in range(n)],
        frame_order=[6, 2, 0, 5, 1, 4, 3],
        rescale=[(1.0, -1000.0 + i) for i in range(n)],
    )
    stack = open_input(path)
    assert len(stack) == n and stack.slice_spacing == pytest.approx(3.0)
    assert hu_of(stack) == [100 * i - 1000 + i for i in range(n)]
    assert sorted(s.frame for s in stack.slices) == list(range(n))
    assert [s.frame for s in stack.slices] != list(range(n))  # stored order differed from geometry


def test_enhanced_mr(tmp_path):
    frames = np.stack([np.full((SIZE, SIZE), 10 * (i + 1), np.uint16) for i in range(5)])
    path = write_enhanced(tmp_path / "mr.dcm", frames, modality="MR", positions=[(0, 0, i) for i in range(5)])
    prepared = prepare(open_input(path))
    assert prepared.modality == "MR" and len(prepared.images) == 5
    assert [int(i[0, 0, 0]) for i in prepared.images] == [0, 64, 128, 191, 255]


@pytest.mark.parametrize("syntax", [*PYDICOM_ENCODED, *GDCM_ENCODED])
def test_compressed_series_decode_to_the_same_values(tmp_path, syntax):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 3000, (32, 32)).astype(np.uint16) for _ in range(3)]
    positions = [(0, 0, i) for i in range(3)]
    write_series(tmp_path / "raw", arrays, positions=positions)
    write_series(tmp_path / "enc", arrays, positions=positions, transfer_syntax=syntax)
    raw, enc = open_input(tmp_path / "raw"), open_input(tmp_path / "enc")
    assert np.array_equal(raw.load(range(3)), enc.load(range(3)))


def test_radiograph_window_and_monochrome1(tmp_path):
    ramp = np.tile(np.linspace(0, 4095, 64).astype(np.uint16), (32, 1))
    plain = prepare(open_input(write_radiograph(tmp_path / "m2.dcm", ramp, modality="CR", window=(2048, 4096))))
    inverted = prepare(
        open_input(
            write_radiograph(tmp_path / "m1.dcm", ramp, modality="CR", window=(2048, 4096), photometric="MONOCHROME1")
        )
    )
    a, b = plain.images[0][..., 0].astype(int), inverted.images[0][..., 0].astype(int)
    assert plain.family == "radiograph" and a[0, 0] == 0 and a[0, -1] == 255
    assert np.array_equal(a, 255 - b)
    narrow = prepare(open_input(write_radiograph(tmp_path / "w.dcm", ramp, window=(1000, 200))))
    row = narrow.images[0][0, :, 0]
    assert row[ramp[0] < 899].max() == 0 and row[ramp[0] > 1100].min() == 255


def test_radiograph_without_window_is_min_max(tmp_path):
    arr = np.tile(np.arange(100, 164, dtype=np.uint16), (32, 1))
    prepared = prepare(open_input(write_radiograph(tmp_path / "r.dcm", arr, bits_stored=12)))
    row = prepared.images[0][0, :, 1]
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row.astype(int)) >= 0)


def test_radiograph_voi_lut_table(tmp_path):
    arr = np.tile(np.arange(0, 64, dtype=np.uint16) * 64, (32, 1))  # 0..4032
    table = np.linspace(0, 1000, 4096).astype(np.uint16)[::-1]  # a decreasing LUT
    path = write_radiograph(tmp_path / "lut.dcm", arr, voi_lut=(0, 12, table))
    row = prepare(open_input(path)).images[0][0, :, 0].astype(int)
    assert row[0] == 255 and row[-1] <= 10 and np.all(np.diff(row) <= 0)


# --- bad input: each a typed error, a clear message naming the file, exit code 2 ---


def test_not_dicom_named_dcm(tmp_path, cli):
    path = write_not_dicom(tmp_path / "scan.dcm")
    with pytest.raises(errors.UnsupportedInputError, match="not a DICOM file"):
        open_input(path)
    code, _, err = cli("prepare", path, "--out", tmp_path / "o")
    assert code == 2 and "scan.dcm" in err and "not a DICOM file" in err


def test_truncated_file(tmp_path, cli):
    (path,) = write_series(tmp_path, [np.full((64, 64), 1000, np.uint16)])
    truncate(path, 0.6)
    with pytest.raises(errors.CorruptFileError, match="truncated"):
        open_input(path)
    assert cli("prepare", path, "--out", tmp_path / "o")[0] == 2


def test_one_by_one_image(tmp_path):
    path = write_radiograph(tmp_path / "tiny.dcm", np.array([[7]], np.uint16))
    with pytest.raises(errors.ImageTooSmallError, match="1x1"):
        open_input(path)


def test_header_over_memory_budget_is_refused_before_decoding(tmp_path, monkeypatch):
    (path,) = write_series(tmp_path, [np.full((64, 64), 1000, np.uint16)])
    import pydicom

    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 60000  # header claims 60000 x 60000 x 2 bytes = 7.2 GB
    ds.NumberOfFrames = 1
    pydicom.dcmwrite(path, ds)
    with pytest.raises(errors.TooLargeError, match="budget"):
        open_input(path)
    monkeypatch.setenv("MEDLENS_MAX_DECODED_MB", "0.001")
    (small,) = write_series(tmp_path / "b", [np.full((64, 64), 1000, np.uint16)])
    with pytest.raises(errors.TooLargeError):
        open_input(small)


@pytest.mark.parametrize("kind", ["SR", "PR"])
def test_objects_without_images(tmp_path, kind):
    path = write_non_image(tmp_path / f"{kind}.dcm", kind)
    with pytest.raises(errors.NoImageDataError):
        open_input(path)


def test_folder_without_readable_images(tmp_path, cli):
    write_not_dicom(tmp_path / "a.dcm")
    write_non_image(tmp_path / "b.dcm", "SR")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(errors.NoImagesFoundError, match="no readable images"):
        open_input(tmp_path)
    code, _, err = cli("prepare", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "no readable images" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(errors.NoImagesFoundError, match="no files"):
        open_input(empty)


def test_junk_beside_a_series_is_skipped_with_a_note(tmp_path):
    write_series(tmp_path, slices(5), positions=[(0, 0, i) for i in range(5)])
    write_not_dicom(tmp_path / "junk.dcm")
    write_non_image(tmp_path / "report.dcm", "SR")
    stack = open_input(tmp_path)
    assert len(stack) == 5
    assert any("skipped 2 file(s)" in n for n in stack.notes)


def test_zip_input(tmp_path):
    paths = write_series(tmp_path / "s", slices(5), positions=[(0, 0, i) for i in range(5)])
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i, p in enumerate(paths):
            zf.write(p, f"deep/dir/{i}.dcm")
        zf.writestr("../../evil.dcm", b"not dicom")
    stack = open_input(archive)
    assert hu_of(stack) == [-24 + 10 * i for i in range(5)]
    assert stack.slices[0].file.startswith(f"{archive}!deep/dir/")
    assert not (tmp_path.parent / "evil.dcm").exists()
    (archive.parent / "bad.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(errors.CorruptFileError, match="zip"):
        open_input(archive.parent / "bad.zip")


def test_folder_of_broken_dicom_beside_an_image_reads_the_image(tmp_path):
    from PIL import Image

    write_not_dicom(tmp_path / "a.dcm")
    Image.fromarray(np.full((20, 20), 9, np.uint8)).save(tmp_path / "b.png")
    stack = open_input(tmp_path)
    assert stack.modality == "OT" and len(stack) == 1
    assert any("ignored the dicom files" in n for n in stack.notes)
