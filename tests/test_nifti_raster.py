"""NIfTI volumes and plain image files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medlens import errors
from medlens.io import open_input
from medlens.prep import prepare


def _nifti(path, data, affine):
    import nibabel as nib

    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def test_nifti_is_shown_like_a_dicom_axial_slice(tmp_path):
    # RAS+ voxel grid: +i points to the patient's right, +j anterior, +k superior
    data = np.zeros((20, 30, 6), np.int16) - 1000
    data[15:, :, :] = 500  # high i = patient's right side (RAS: +x is Right)
    data[:, 25:, :] = 100  # high j = anterior
    for k in range(6):
        data[0, 0, k] = -1000 + k  # marks slice order
    path = _nifti(tmp_path / "v.nii.gz", data, np.diag([0.8, 0.8, 2.0, 1.0]))
    stack = open_input(path, modality="CT")
    vol = stack.load(range(len(stack)))
    assert vol.shape == (6, 30, 20)  # (slices, rows = A->P, columns = R->L)
    assert vol[0, 10, 0] == 500  # first column = patient's right
    assert vol[0, 0, 10] == 100  # first row = anterior
    assert [vol[k, -1, -1] for k in range(6)] == [-1000 + k for k in range(6)]  # inferior -> superior
    assert stack.slice_spacing == pytest.approx(2.0)
    assert [s.z for s in stack.slices] == pytest.approx([2.0 * k for k in range(6)])


def test_nifti_reoriented_from_lps_storage(tmp_path):
    data = np.arange(20 * 24 * 6, dtype=np.int16).reshape(20, 24, 6) - 1000
    ras = _nifti(tmp_path / "ras.nii", data, np.diag([1.0, 1.0, 1.0, 1.0]))
    flipped = data[::-1, ::-1, ::-1].copy()  # same anatomy stored L->R, P->A, S->I
    affine = np.diag([-1.0, -1.0, -1.0, 1.0])
    affine[:3, 3] = [3, 4, 5]
    lps = _nifti(tmp_path / "lps.nii", flipped, affine)
    a = open_input(ras, modality="CT").load(range(6))
    b = open_input(lps, modality="CT").load(range(6))
    assert np.array_equal(a, b)


def test_nifti_modality_guess(tmp_path):
    ct = np.full((20, 20, 5), -1000, np.int16)
    ct[5:15, 5:15] = 40
    mr = np.random.default_rng(0).random((20, 20, 5)).astype(np.float32) * 800
    ct_stack = open_input(_nifti(tmp_path / "ct.nii", ct, np.eye(4)))
    mr_stack = open_input(_nifti(tmp_path / "mr.nii", mr, np.eye(4)))
    assert ct_stack.modality == "CT" and mr_stack.modality == "MR"
    assert any("guessed" in n for n in ct_stack.notes)
    assert prepare(ct_stack).family == "ct" and prepare(mr_stack).family == "mr"


def test_nifti_bad_shapes(tmp_path):
    with pytest.raises(errors.UnsupportedInputError, match="shape"):
        open_input(_nifti(tmp_path / "4d.nii", np.zeros((20, 20, 4, 3), np.float32), np.eye(4)))
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b not really")
    with pytest.raises(errors.CorruptFileError):
        open_input(tmp_path / "broken.nii.gz")


def test_png_grey_16_bit_is_min_max_scaled(tmp_path):
    arr = np.tile(np.linspace(1000, 5000, 40).astype(np.uint16), (20, 1))
    Image.fromarray(arr).save(tmp_path / "x.png")
    prepared = prepare(open_input(tmp_path / "x.png", modality="CR"))
    assert prepared.family == "radiograph" and prepared.modality == "CR"
    row = prepared.images[0][0, :, 0]
    assert row[0] == 0 and row[-1] == 255


def test_rgb_jpeg_passes_through(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (32, 48, 3)).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "x.png")
    prepared = prepare(open_input(tmp_path / "x.png"))
    assert prepared.family == "color" and np.array_equal(prepared.images[0], arr)


def test_bad_images(tmp_path):
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "one.png")
    with pytest.raises(errors.ImageTooSmallError, match="1x1"):
        open_input(tmp_path / "one.png")
    (tmp_path / "fake.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(errors.CorruptFileError):
        open_input(tmp_path / "fake.jpg")
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((20, 20), np.uint8)).save(two / name)
    with pytest.raises(errors.UnsupportedInputError, match="2 image files"):
        open_input(two)


def test_task_inputs_given_as_studies_point_to_the_task(tmp_path, cli):
    (tmp_path / "labs.pdf").write_bytes(b"%PDF-1.4\n")
    code, _, err = cli("ask", tmp_path / "labs.pdf", "Q?", "--quiet")
    assert code == 2 and "--task lab-extract" in err
