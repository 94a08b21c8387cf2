"""The synthetic DICOM writers (test factory and demo phantom) produce valid, lossless files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_factory import (
    LOSSLESS_SYNTAXES,
    truncate,
    write_enhanced,
    write_non_image,
    write_not_dicom,
    write_radiograph,
    write_series,
)
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_voi_lut
from pydicom.uid import (
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    GrayscaleSoftcopyPresentationStateStorage,
)

from medlens.demo.phantom import ct_phantom, write_ct_series

RNG = np.random.default_rng(7)
SIGNED = RNG.integers(-1024, 3000, size=(3, 24, 20))
UNSIGNED = RNG.integers(0, 4096, size=(3, 24, 20))


@pytest.mark.parametrize("transfer_syntax", LOSSLESS_SYNTAXES, ids=lambda uid: uid.keyword)
@pytest.mark.parametrize("arrays", [SIGNED, UNSIGNED], ids=["signed", "unsigned"])
def test_write_series_is_lossless(tmp_path: Path, arrays: np.ndarray, transfer_syntax: str) -> None:
    paths = write_series(tmp_path, list(arrays), slice_thickness=2.0, transfer_syntax=transfer_syntax)
    for i, (path, arr) in enumerate(zip(paths, arrays, strict=True)):
        ds = dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == transfer_syntax
        assert ds.PixelRepresentation == int(arrays.min() < 0)
        assert np.array_equal(ds.pixel_array, arr)
        assert [float(v) for v in ds.ImagePositionPatient] == [0.0, 0.0, 2.0 * i]
        assert ds.InstanceNumber == i + 1


def test_write_series_options(tmp_path: Path) -> None:
    paths = write_series(
        tmp_path,
        list(UNSIGNED[:2]),
        modality="MR",
        rescale=None,
        instance_numbers=[9, 4],
        filenames=["b", "a"],
        window=[(40, 400), (-600, 1500)],
        voi_function="SIGMOID",
        presentation_lut_shape="INVERSE",
        omit=["ImagePositionPatient"],
        extra=[{"EchoTime": 10}, {"EchoTime": 90}],
    )
    assert [p.name for p in paths] == ["b", "a"]
    first, second = (dcmread(p) for p in paths)
    assert (first.InstanceNumber, second.InstanceNumber) == (9, 4)
    assert "ImagePositionPatient" not in first and "RescaleSlope" not in first
    assert list(first.WindowCenter) == [40, -600] and list(first.WindowWidth) == [400, 1500]
    assert (first.VOILUTFunction, first.PresentationLUTShape) == ("SIGMOID", "INVERSE")
    assert (first.EchoTime, second.EchoTime) == (10, 90)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID


def test_write_series_rgb_and_voi_lut(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, size=(16, 18, 3)).astype(np.uint8)
    (path,) = write_series(tmp_path / "rgb", [rgb], modality="OT", photometric="RGB", rescale=None)
    assert np.array_equal(dcmread(path).pixel_array, rgb)
    table = np.arange(4096)[::-1] // 2  # 12-bit entries: pydicom 3.0.2 wraps indices of 8-bit LUTs at 256
    (path,) = write_series(tmp_path / "lut", [UNSIGNED[0]], rescale=None, voi_lut=(0, 12, table))
    ds = dcmread(path)
    assert np.array_equal(apply_voi_lut(ds.pixel_array, ds), table[UNSIGNED[0]])


def test_write_enhanced_ct_frames_and_positions(tmp_path: Path) -> None:
    frames = RNG.integers(0, 3000, size=(5, 16, 16))
    positions = [(-10.0, -20.0, 5.0 * i) for i in range(5)]
    order = [3, 1, 4, 0, 2]
    path = write_enhanced(tmp_path / "e.dcm", frames, positions=positions, frame_order=order)
    ds = dcmread(path)
    assert ds.SOPClassUID == EnhancedCTImageStorage and ds.NumberOfFrames == 5
    assert np.array_equal(ds.pixel_array, frames[order])
    stored_z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert stored_z == [positions[k][2] for k in order]
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert float(shared.PixelValueTransformationSequence[0].RescaleIntercept) == -1024
    assert [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient] == [
        1,
        0,
        0,
        0,
        1,
        0,
    ]


def test_write_enhanced_mr_per_frame_rescale(tmp_path: Path) -> None:
    frames = RNG.integers(0, 1000, size=(3, 16, 16))
    rescale = [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]
    path = write_enhanced(tmp_path / "m.dcm", frames, modality="MR", rescale=rescale, frame_order=[2, 0, 1])
    ds = dcmread(path)
    assert ds.SOPClassUID == EnhancedMRImageStorage
    slopes = [float(f.PixelValueTransformationSequence[0].RescaleSlope) for f in ds.PerFrameFunctionalGroupsSequence]
    assert slopes == [3.0, 1.0, 2.0]
    assert "PixelValueTransformationSequence" not in ds.SharedFunctionalGroupsSequence[0]


@pytest.mark.parametrize(
    ("modality", "sop_class"),
    [("CR", ComputedRadiographyImageStorage), ("DX", DigitalXRayImageStorageForPresentation)],
)
def test_write_radiograph(tmp_path: Path, modality: str, sop_class: str) -> None:
    image = RNG.integers(0, 4096, size=(40, 32))
    path = write_radiograph(
        tmp_path / "cxr.dcm", image, modality=modality, photometric="MONOCHROME1", window=(2048, 4096)
    )
    ds = dcmread(path)
    assert ds.SOPClassUID == sop_class and ds.BitsStored == 12
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert np.array_equal(ds.pixel_array, image)


@pytest.mark.parametrize(
    ("kind", "sop_class"), [("SR", BasicTextSRStorage), ("PR", GrayscaleSoftcopyPresentationStateStorage)]
)
def test_write_non_image(tmp_path: Path, kind: str, sop_class: str) -> None:
    ds = dcmread(write_non_image(tmp_path / f"{kind}.dcm", kind=kind))
    assert ds.SOPClassUID == sop_class and ds.Modality == kind
    assert "PixelData" not in ds


def test_broken_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidDicomError):
        dcmread(write_not_dicom(tmp_path / "x.dcm"))
    (good,) = write_series(tmp_path, [UNSIGNED[0]])
    cut = truncate(good, 0.6, tmp_path / "cut.dcm")
    assert cut.stat().st_size == int(good.stat().st_size * 0.6) and good.stat().st_size > cut.stat().st_size
    with pytest.raises(ValueError, match="less than expected"):
        _ = dcmread(cut).pixel_array


def test_phantom_is_plausible_and_deterministic() -> None:
    hu, lesion = ct_phantom(n_slices=20, size=96, seed=3)
    assert hu.shape == (20, 96, 96) and hu.dtype == np.int16
    assert np.array_equal(hu, ct_phantom(n_slices=20, size=96, seed=3)[0])
    assert not np.array_equal(hu, ct_phantom(n_slices=20, size=96, seed=4)[0])
    assert hu[0, 0, 0] == -1000 and hu.max() > 300
    z, y, x = lesion["center_zyx"]
    r = int(lesion["radius_px"])
    lesion_mean = hu[z, y - r // 2 : y + r // 2, x - r // 2 : x + r // 2].mean()
    liver_mean = hu[z, y - r - 8 : y - r - 2, x - 3 : x + 3].mean()
    assert abs(lesion_mean - lesion["hu"]) < 5 and abs(liver_mean - 60) < 8
    assert (hu[-1] < -700).sum() > (hu[0] < -700).sum()  # lung bases appear in the upper slices


def test_write_ct_series_shuffled(tmp_path: Path) -> None:
    hu, _ = ct_phantom(n_slices=8, size=32)
    paths = write_ct_series(hu, tmp_path, spacing=(0.7, 0.7, 3.0), first_z=-50.0, shuffle=True)
    datasets = [dcmread(p) for p in paths]
    assert [float(ds.ImagePositionPatient[2]) for ds in datasets] == [-50.0 + 3.0 * i for i in range(8)]
    numbers = [ds.InstanceNumber for ds in datasets]
    assert sorted(numbers) == list(range(1, 9)) and numbers != sorted(numbers)
    names = [p.name for p in paths]
    assert names != sorted(names) and len(set(names)) == 8
    for ds, expected in zip(datasets, hu, strict=True):
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and ds.PixelRepresentation == 0
        assert np.array_equal(ds.pixel_array.astype(np.int32) * ds.RescaleSlope + ds.RescaleIntercept, expected)
    assert len({ds.SOPInstanceUID for ds in datasets}) == 8
    again = write_ct_series(hu, tmp_path / "again", shuffle=True)
    assert [dcmread(p).SOPInstanceUID for p in again] == [ds.SOPInstanceUID for ds in datasets]
