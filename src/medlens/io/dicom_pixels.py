"""Decode DICOM frames to modality values (float32, HU for CT) or RGB uint8, only the frames asked for."""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medlens.errors import CorruptFileError
from medlens.io.dicom_header import DicomInstance, FrameGeometry
from medlens.io.dicom_values import integer
from medlens.io.limits import check_decoded_size
from medlens.warnings_capture import native_stderr

_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit and Explicit VR Little Endian


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
    rows, cols = entries[0].instance.image_rows, entries[0].instance.image_columns
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
        if inst.mosaic is not None:  # one stored image, cut into its tiles
            whole = _raw_frames(inst, [0])[0]
            arrays = {f: inst.mosaic.tile(whole, f) for f in frames}
        else:
            arrays = dict(zip(frames, _raw_frames(inst, frames), strict=True))
        for pos, entry in items:
            raw = arrays[entry.frame or 0]
            out[pos] = _to_rgb8(raw, inst) if color else _to_modality(raw, inst, entry.geometry)
    return out


def _raw_frames(inst: DicomInstance, frames: list[int]) -> list[np.ndarray]:
    """Stored pixel values of the given frames (YBR already converted to RGB by pydicom)."""
    native = read_native_frame(inst)
    if native is not None:
        return [native]
    try:
        with warnings.catch_warnings(), native_stderr(_decoder_name(inst)):
            warnings.simplefilter("ignore")
            return _pydicom_frames(inst, frames)
    except MemoryError:
        raise
    except Exception as exc:
        tsyntax = inst.dataset.file_meta.get("TransferSyntaxUID")
        name = getattr(tsyntax, "name", str(tsyntax))
        detail = " ".join(str(exc).split())  # decoder messages span lines; errors are one line
        raise CorruptFileError(f"cannot decode pixel data ({name}): {detail}", inst.display) from None


def _decoder_name(inst: DicomInstance) -> str:
    """Who speaks on descriptor 2 while decoding: the JPEG 2000 decoder (openjpeg) or another pixel plugin."""
    syntax = str(inst.dataset.file_meta.get("TransferSyntaxUID", ""))
    return "openjpeg" if syntax.startswith(("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")) else "pydicom"


def _pydicom_frames(inst: DicomInstance, frames: list[int]) -> list[np.ndarray]:
    """Decode through pydicom's plugins, reading the file again (only the requested frames where it can)."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import iter_pixels, pixel_array

    # Reading from the path decodes only the needed frames; it cannot inflate deflated files (offset None)
    # and is stricter than a full read on some encapsulated files (e.g. an offset table ending in a zero tag).
    if inst.dataset.preamble is not None and "TransferSyntaxUID" in inst.dataset.file_meta and inst.pixels.offset:
        try:
            return (
                list(iter_pixels(str(inst.path), indices=frames))
                if inst.n_frames > 1
                else [pixel_array(str(inst.path))]
            )
        except (InvalidDicomError, ValueError, KeyError, AttributeError, NotImplementedError):
            pass  # fall back to the full read below, which pydicom's own pixel_array uses
    full = pydicom.dcmread(inst.path, force=True)  # files without preamble or meta information
    full.file_meta.TransferSyntaxUID = inst.dataset.file_meta.TransferSyntaxUID
    return [pixel_array(full, index=f if inst.n_frames > 1 else None) for f in frames]


def read_native_frame(inst: DicomInstance) -> np.ndarray | None:
    """A single grey frame stored uncompressed little endian, read straight from the file: the same values
    pydicom returns (unused high bits corrected as it does), several times faster. None when not applicable."""
    ds, pixels = inst.dataset, inst.pixels
    if inst.n_frames != 1 or inst.samples_per_pixel != 1 or ds.file_meta.TransferSyntaxUID not in _NATIVE_LE:
        return None
    bits = integer(ds, "BitsAllocated")
    stored = integer(ds, "BitsStored") or bits
    if bits not in (8, 16, 32) or stored is None or not 0 < stored <= bits or pixels.offset is None:
        return None
    dtype = np.dtype(f"<{'i' if integer(ds, 'PixelRepresentation') == 1 else 'u'}{bits // 8}")
    count = inst.rows * inst.columns
    values = np.fromfile(inst.path, dtype=dtype, count=count, offset=pixels.offset)
    if values.size != count:
        return None  # let pydicom report the problem
    values = values.reshape(inst.rows, inst.columns)
    if stored < bits:
        np.left_shift(values, bits - stored, out=values)
        np.right_shift(values, bits - stored, out=values)  # arithmetic shift: sign-extends signed values
    return values


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
