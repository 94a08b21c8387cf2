"""A synthetic abdominal CT phantom (no patient data) and a fast writer for it as a DICOM CT series.

The phantom is a stack of axial slices, index 0 inferior, in Hounsfield units. Array columns run to the
patient's left (DICOM LPS, orientation [1,0,0,0,1,0]), so the liver sits on the image left.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AIR, LUNG, FAT, KIDNEY, SOFT_TISSUE, SPLEEN, LIVER = -1000, -850, -100, 30, 40, 50, 60
LESION, AORTA, CANCELLOUS_BONE, CORTICAL_BONE, SPINOUS_PROCESS = 15, 180, 300, 900, 700
NOISE_SD = 10.0
INTERCEPT = -1024

# Lesion placement, in normalised in-plane units (-1..1 across the image) and fraction of the z range.
_LESION_CY, _LESION_CX, _LESION_T = -0.05, -0.40, 0.4


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Boolean mask of an axis-aligned ellipse in normalised coordinates."""
    if ry <= 0 or rx <= 0:
        return np.zeros(yy.shape, dtype=bool)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def _static_layers(yy: np.ndarray, xx: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """Structures that do not change along z, in painting order: (mask, HU)."""
    body = _ellipse(yy, xx, 0.0, 0.0, 0.62, 0.86)
    inner = _ellipse(yy, xx, 0.0, 0.0, 0.55, 0.79)
    vertebra = _ellipse(yy, xx, 0.40, 0.0, 0.11, 0.11)
    return [
        (body, FAT),
        (inner, SOFT_TISSUE),
        (_ellipse(yy, xx, 0.22, 0.08, 0.055, 0.055), AORTA),
        (vertebra, CORTICAL_BONE),
        (_ellipse(yy, xx, 0.40, 0.0, 0.085, 0.085), CANCELLOUS_BONE),
        (_ellipse(yy, xx, 0.55, 0.0, 0.05, 0.025), SPINOUS_PROCESS),
    ]


def _lesion_radius(z: int, zc: int, rz: int, r: float) -> float:
    """In-plane lesion radius (normalised units) on slice z of an ellipsoid lesion; 0 when outside."""
    dz = (z - zc) / (rz + 0.5)
    return r * float(np.sqrt(1.0 - dz * dz)) if abs(dz) < 1.0 else 0.0


def _slice(yy: np.ndarray, xx: np.ndarray, static: list, t: float, lesion_r: float) -> np.ndarray:
    """One noise-free slice at height fraction t (0 inferior, 1 superior)."""
    img = np.full(yy.shape, AIR, dtype=np.float32)
    for mask, hu in static:
        img[mask] = hu
    inner = static[1][0]
    s = 0.75 + 0.25 * t
    liver = inner & _ellipse(yy, xx, -0.05, -0.40, 0.40 * s, 0.38 * s)
    img[liver] = LIVER
    img[liver & _ellipse(yy, xx, _LESION_CY, _LESION_CX, lesion_r, lesion_r)] = LESION
    if t > 0.4:
        img[inner & _ellipse(yy, xx, 0.15, 0.55, 0.18, 0.12)] = SPLEEN
    if t < 0.5:
        for cx in (-0.35, 0.35):
            img[inner & _ellipse(yy, xx, 0.30, cx, 0.12, 0.08)] = KIDNEY
    if t > 0.65:
        grow = np.sqrt((t - 0.65) / 0.35)
        for cx in (-0.45, 0.45):
            img[inner & _ellipse(yy, xx, 0.15, cx, 0.30 * grow, 0.28 * grow)] = LUNG
    return img


def ct_phantom(n_slices: int = 40, size: int = 256, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """Deterministic abdomen/lung-base CT volume (z, y, x) in HU (int16) and a description of its lesion.

    Air is exactly -1000 HU; Gaussian noise (sd 10 HU) is added inside the body only. The lesion is a
    round hypodense liver lesion of radius 10% of ``size`` spanning a few slices around 40% of the height.
    """
    if n_slices < 1 or size < 16:
        raise ValueError("need n_slices >= 1 and size >= 16")
    rng = np.random.default_rng(seed)
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    static = _static_layers(yy, xx)
    body = static[0][0]
    zc, rz, r = round(_LESION_T * (n_slices - 1)), max(1, round(n_slices * 0.06)), 0.2
    volume = np.empty((n_slices, size, size), dtype=np.int16)
    for z in range(n_slices):
        t = z / (n_slices - 1) if n_slices > 1 else 0.5
        img = _slice(yy, xx, static, t, _lesion_radius(z, zc, rz, r))
        img[body] += rng.standard_normal(int(body.sum()), dtype=np.float32) * NOISE_SD
        volume[z] = np.clip(np.rint(img), INTERCEPT, 3071)
    lesion = {
        "center_zyx": [
            zc,
            round((_LESION_CY + 1.0) / 2.0 * size - 0.5),
            round((_LESION_CX + 1.0) / 2.0 * size - 0.5),
        ],
        "radius_px": r / 2.0 * size,
        "radius_slices": rz,
        "hu": LESION,
        "liver_hu": LIVER,
        "label": "hypodense liver lesion",
        "side": "patient right (image left)",
    }
    return volume, lesion


def _uid(seed: int, *parts: object) -> str:
    """A UID derived deterministically from the seed and the given parts."""
    return generate_uid(entropy_srcs=["medlens-phantom", str(seed), *map(str, parts)])


def _template(
    shape: tuple[int, int],
    spacing: Sequence[float],
    study_uid: str,
    series_uid: str,
    description: str,
    bits_stored: int,
) -> Dataset:
    """The dataset shared by every slice; per-slice fields are filled in by the writer."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "medlens synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC ABDOMEN CT"
    ds.SeriesDescription = description
    ds.PatientName = "MEDLENS^PHANTOM"
    ds.PatientID = "SYNTHETIC"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "ABDOMEN"
    ds.SliceThickness = spacing[2]
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["frame-of-reference", series_uid])
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [spacing[0], spacing[1]]
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = INTERCEPT, 1, "HU"
    return ds


def _orders(n: int, shuffle: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(instance-number order, file-name order) for n slices; both non-identity when shuffled and n > 1."""
    rng = np.random.default_rng(seed)
    orders = []
    for _ in range(2):
        perm = np.arange(n)
        while shuffle and n > 1 and np.array_equal(perm, np.arange(n)):
            perm = rng.permutation(n)
        orders.append(perm)
    return orders[0], orders[1]


def write_ct_series(
    hu: np.ndarray,
    out_dir: Path,
    *,
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    first_z: float = 0.0,
    shuffle: bool = False,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_description: str = "SYNTHETIC PHANTOM",
) -> list[Path]:
    """Write a (z, y, x) HU volume as one CT Image Storage file per slice; return paths in slice order.

    ``spacing`` is (row, column, slice) in mm; slice i sits at z = first_z + i * spacing[2]. Pixels are
    stored as uint16 with RescaleIntercept -1024. With ``shuffle`` the file names and InstanceNumbers are
    two independent random permutations, so neither follows the geometric order.
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
    stored = hu.astype(np.int32) - INTERCEPT
    if stored.size and (stored.min() < 0 or stored.max() > 0xFFFF):
        raise ValueError("HU values must lie in -1024..64511 to be stored with intercept -1024")
    stored = stored.astype("<u2")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or _uid(seed, "study")
    series_uid = series_uid or _uid(seed, "series", study_uid)
    bits = 12 if stored.size == 0 or stored.max() <= 0xFFF else 16
    ds = _template(hu.shape[1:], spacing, study_uid, series_uid, series_description, bits)
    x0, y0 = -(hu.shape[2] - 1) / 2 * spacing[1], -(hu.shape[1] - 1) / 2 * spacing[0]
    instance_order, name_order = _orders(len(hu), shuffle, seed)
    paths = []
    for i in range(len(hu)):
        z = round(first_z + i * spacing[2], 4)
        sop_uid = _uid(seed, series_uid, i)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = int(instance_order[i]) + 1
        ds.ImagePositionPatient = [round(x0, 4), round(y0, 4), z]
        ds.SliceLocation = z
        ds.PixelData = stored[i].tobytes()
        path = out_dir / f"IM{int(name_order[i]) + 1:05d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths
