"""Decode DICOM frames to modality values (float32, HU for CT) or RGB uint8, only the frames asked for."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlens.errors import CorruptFileError
from medlens.io.dicom_header import DicomInstance, FrameGeometry
from medlens.io.limits import check_decoded_size


@dataclass(frozen=True)
class FrameEntry:
    """One 2-D image of a series: an instance and, for multi-frame objects, the frame index."""

    instance: DicomInstance
    frame: int | None
    geometry: FrameGeometry


def decode(entries: Sequence[FrameEntry], color: bool) -> np.ndarray:
    """Decode ``entries`` in order: float32 (k, H, W) after rescale, or uint8 (k, H, W, 3) for colour."""
    if not entries:
        raise ValueError("nothing to decode")
    rows, cols = entries[0].instance.rows, entries[0].instance.columns
    check_decoded_size(len(entries) * rows * cols * (3 if color else 4), entries[0].instance.display, "the slices")
    out = np.empty(
        (len(entries), rows, cols, 3) if color else (len(entries), rows, cols), np.uint8 if color else np.float32
    )
    by_instance: dict[int, list[tuple[int, FrameEntry]]] = defaultdict(list)
    for pos, entry in enumerate(entries):
        by_instance[id(entry.instance)].append((pos, entry))
    for items in by_instance.values():
        inst = items[0][1].instance
        frames = sorted({e.frame or 0 for _, e in items})
        arrays = dict(zip(frames, _raw_frames(inst, frames), strict=True))
        for pos, entry in items:
            raw = arrays[entry.frame or 0]
            out[pos] = _to_rgb8(raw, inst) if color else _to_modality(raw, inst, entry.geometry)
    return out


def _raw_frames(inst: DicomInstance, frames: list[int]) -> list[np.ndarray]:
    """Stored pixel values of the given frames (YBR already converted to RGB by pydicom)."""
    from pydicom.pixels import pixel_array

    ds = inst.dataset
    deferred = ds.get_item(0x7FE00010, keep_deferred=True) if 0x7FE00010 in ds else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if inst.n_frames == 1:
                return [pixel_array(ds)]
            return [pixel_array(ds, index=f) for f in frames]
    except MemoryError:
        raise
    except Exception as exc:
        tsyntax = inst.dataset.file_meta.get("TransferSyntaxUID")
        name = getattr(tsyntax, "name", str(tsyntax))
        detail = " ".join(str(exc).split())  # decoder messages span lines; errors are one line
        raise CorruptFileError(f"cannot decode pixel data ({name}): {detail}", inst.display) from None
    finally:
        if deferred is not None and getattr(deferred, "value", None) is None:
            ds[0x7FE00010] = deferred  # drop the raw bytes again: the header stays small


def _to_modality(raw: np.ndarray, inst: DicomInstance, geometry: FrameGeometry) -> np.ndarray:
    """Stored values -> modality values (rescale slope/intercept or a Modality LUT)."""
    if raw.ndim != 2:
        raise CorruptFileError(f"expected a grey-level frame, got an array of shape {raw.shape}", inst.display)
    if inst.has_modality_lut:
        from pydicom.pixels import apply_modality_lut

        return apply_modality_lut(raw, inst.dataset).astype(np.float32)
    values = raw.astype(np.float32)
    if geometry.slope != 1.0:
        values *= np.float32(geometry.slope)
    if geometry.intercept != 0.0:
        values += np.float32(geometry.intercept)
    return values


def _to_rgb8(raw: np.ndarray, inst: DicomInstance) -> np.ndarray:
    """Colour frames (RGB, YBR, palette) -> RGB uint8."""
    if inst.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        raw = apply_color_lut(raw, inst.dataset)
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise CorruptFileError(f"expected an RGB frame, got an array of shape {raw.shape}", inst.display)
    if raw.dtype == np.uint8:
        return raw
    top = float(raw.max())
    bits = int(inst.dataset.get("BitsStored", 8 * raw.dtype.itemsize) or 8)
    scale = 255.0 / max(top if inst.photometric == "PALETTE COLOR" else 2**bits - 1, 1.0)
    return np.clip(np.rint(raw.astype(np.float32) * scale), 0, 255).astype(np.uint8)
