"""NIfTI volumes (.nii, .nii.gz) through nibabel, reoriented so slices are axial-like and run upward."""

from __future__ import annotations

import numpy as np

from medlens.errors import CorruptFileError, UnsupportedInputError
from medlens.io.discover import FoundFile
from medlens.io.limits import check_decoded_size, check_image_size
from medlens.io.types import ImageStack, SliceRef


def read_nifti(found: FoundFile, modality: str | None = None) -> ImageStack:
    """Read a 3-D NIfTI; ``modality`` (CT or MR) is guessed from the values when not given."""
    import nibabel as nib

    try:
        img = nib.load(str(found.path))
        shape = tuple(int(s) for s in img.shape)
    except Exception as exc:
        raise CorruptFileError(f"cannot read NIfTI header ({exc})", found.display) from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) not in (2, 3):
        raise UnsupportedInputError(f"NIfTI image has shape {shape}; a 2-D or 3-D volume is needed", found.display)
    if min(shape) < 1:
        raise CorruptFileError(f"NIfTI image has shape {shape}: an axis without voxels", found.display)
    check_decoded_size(int(np.prod(shape)) * 4, found.display)
    try:
        img = nib.as_closest_canonical(img)  # RAS+: i -> patient left to right, j -> anterior, k -> superior
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3] if len(shape) == 3 else shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except Exception as exc:
        raise CorruptFileError(f"cannot read NIfTI data ({exc})", found.display) from None
    if data.ndim == 2:
        data = data[:, :, None]
    if not np.all(np.isfinite(data)):
        data = np.nan_to_num(data, nan=float(np.nanmin(data)) if np.isfinite(data).any() else 0.0)
    # Radiological display like a DICOM axial slice: rows anterior->posterior, columns patient right->left.
    volume = np.ascontiguousarray(np.transpose(data[::-1, ::-1, :], (2, 1, 0)))
    check_image_size(volume.shape[1], volume.shape[2], found.display)
    guessed = modality or _guess_modality(volume)
    notes = [] if modality else [f"modality not given; {guessed} guessed from the value range (set --modality)"]
    affine_z = img.affine[:3, 3] + img.affine[:3, 2] * np.arange(volume.shape[0])[:, None]
    slices = [SliceRef(file=found.display, frame=k, z=float(affine_z[k, 2])) for k in range(volume.shape[0])]
    return ImageStack(
        modality=guessed,
        source=found.display,
        slices=slices if volume.shape[0] > 1 else [SliceRef(file=found.display)],
        loader=lambda idx: volume[list(idx)],
        rows=volume.shape[1],
        columns=volume.shape[2],
        pixel_spacing=(zooms[1], zooms[0]) if len(zooms) > 1 else None,
        slice_spacing=zooms[2] if len(zooms) > 2 else None,
        orientation=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        notes=notes,
    )


def _guess_modality(volume: np.ndarray) -> str:
    """CT values are Hounsfield units: air near -1000 and integer-valued. Anything else is taken as MR."""
    sample = volume[:: max(1, volume.shape[0] // 8)]
    low = float(np.percentile(sample, 1))
    integral = bool(np.allclose(sample[:, ::8, ::8], np.round(sample[:, ::8, ::8])))
    return "CT" if low <= -500 and integral else "MR"
