"""Read one DICOM file's header (pixels deferred) into the facts the series builder needs.

Every problem is raised as a typed error so callers can skip the file with its reason.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import CorruptFileError, NoImageDataError, UnsupportedInputError
from medlens.io.limits import check_decoded_size, check_image_size
from medlens.io.types import VOI, TableVOI, WindowVOI

PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # PixelData, FloatPixelData, DoubleFloatPixelData
#: modalities whose objects carry pixels that are not pictures of the patient
NON_IMAGE_MODALITIES = {
    "SEG": "segmentation masks",
    "RTDOSE": "a radiotherapy dose grid",
    "RTSTRUCT": "radiotherapy structures",
    "RTPLAN": "a radiotherapy plan",
    "PR": "a presentation state",
    "SR": "a structured report",
    "KO": "a key object selection",
    "REG": "a registration",
    "ECG": "a waveform",
}
DEFER_BYTES = 16 * 1024


@dataclass(frozen=True)
class FrameGeometry:
    """Per-frame facts: position, orientation, rescale and display window."""

    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    slope: float = 1.0
    intercept: float = 0.0
    voi: VOI | None = None


@dataclass
class DicomInstance:
    """One DICOM object with pixels, header only."""

    path: Path
    display: str
    dataset: Any  # pydicom Dataset, pixel data deferred
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    rows: int
    columns: int
    n_frames: int
    samples_per_pixel: int
    photometric: str
    instance_number: int | None
    series_number: int | None
    description: str
    pixel_spacing: tuple[float, float] | None
    acquisition: str
    frames: list[FrameGeometry] = field(default_factory=list)
    has_modality_lut: bool = False
    invert: bool = False

    @property
    def is_color(self) -> bool:
        return self.samples_per_pixel == 3 or self.photometric == "PALETTE COLOR"


def read_instance(path: Path, display: str) -> DicomInstance:
    """Parse ``path``'s header; raise a typed error if it is not a usable DICOM image."""
    ds = _read_dataset(path, display)
    sop_class = getattr(ds.get("SOPClassUID"), "name", None) or str(ds.get("SOPClassUID", "unknown SOP class"))
    modality = str(ds.get("Modality", "") or "OT").upper()
    if not any(tag in ds for tag in PIXEL_TAGS):
        if "Rows" in ds and "SOPClassUID" in ds and modality not in NON_IMAGE_MODALITIES and "Columns" in ds:
            raise CorruptFileError(f"{sop_class} header but no pixel data (truncated or stripped)", display)
        raise NoImageDataError(f"{sop_class} has no pixel data (not an image)", display)
    if modality in NON_IMAGE_MODALITIES:
        raise NoImageDataError(f"{sop_class} holds {NON_IMAGE_MODALITIES[modality]}, not an image", display)
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 16) or 16)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptFileError(f"image header incomplete ({exc})", display) from None
    check_image_size(rows, columns, display)
    check_decoded_size(rows * columns * n_frames * spp * max(bits, 8) // 8, display)
    _check_not_truncated(ds, path, display)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    return DicomInstance(
        path=path,
        display=display,
        dataset=ds,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")) or display,
        series_uid=str(ds.get("SeriesInstanceUID", "")) or f"no-series:{display}",
        study_uid=str(ds.get("StudyInstanceUID", "")) or "no-study",
        modality=modality,
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        samples_per_pixel=spp,
        photometric=photometric,
        instance_number=_int(ds.get("InstanceNumber")),
        series_number=_int(ds.get("SeriesNumber")),
        description=str(ds.get("SeriesDescription", "") or ""),
        pixel_spacing=_pair(_first_present(ds, "PixelSpacing", "ImagerPixelSpacing")),
        acquisition=str(ds.get("AcquisitionDateTime", "") or ds.get("AcquisitionDate", "") or ""),
        frames=_frames(ds, n_frames),
        has_modality_lut="ModalityLUTSequence" in ds,
        invert=photometric == "MONOCHROME1" or str(ds.get("PresentationLUTShape", "")).upper() == "INVERSE",
    )


def _read_dataset(path: Path, display: str) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise CorruptFileError(f"cannot read file ({exc.strerror})", display) from None
    has_marker = len(head) == 132 and head[128:132] == b"DICM"
    # Files without the preamble (old ACR-NEMA style) start directly with a group 0002 or 0008 tag.
    if not has_marker and (len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08")):
        raise UnsupportedInputError("not a DICOM file (no DICM marker and no DICOM tags at the start)", display)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, defer_size=DEFER_BYTES, force=not has_marker)
    except InvalidDicomError:
        raise UnsupportedInputError("not a DICOM file", display) from None
    except Exception as exc:  # pydicom raises many kinds on damaged headers
        raise CorruptFileError(f"damaged DICOM header ({type(exc).__name__}: {exc})", display) from None
    if len(ds) == 0:
        raise CorruptFileError("DICOM header could not be read (file truncated or damaged)", display)
    if not has_marker and "SOPClassUID" not in ds and not any(tag in ds for tag in PIXEL_TAGS):
        raise UnsupportedInputError("not a DICOM file", display)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _guess_transfer_syntax(ds)
    return ds


def _guess_transfer_syntax(ds: Any) -> str:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if ds.original_encoding[0]:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if ds.original_encoding[1] else ExplicitVRBigEndian


def _check_not_truncated(ds: Any, path: Path, display: str) -> None:
    """Native (uncompressed) pixel data must be as long as the header says; checked without reading it."""
    from pydicom.pixels.utils import get_expected_length
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    tsyntax = ds.file_meta.TransferSyntaxUID
    if tsyntax.is_encapsulated or tsyntax == DeflatedExplicitVRLittleEndian or 0x7FE00010 not in ds:
        return
    elem = ds.get_item(0x7FE00010, keep_deferred=True)
    if getattr(elem, "is_undefined_length", False):
        return
    deferred = getattr(elem, "value", None) is None and getattr(elem, "value_tell", None) is not None
    available = os.path.getsize(path) - elem.value_tell if deferred else len(elem.value or b"")
    try:
        needed = get_expected_length(ds, unit="bytes")
    except Exception:  # incomplete pixel module: decoding will report it
        return
    if available < needed:
        raise CorruptFileError(
            f"truncated file: pixel data needs {needed:,} bytes, only {max(available, 0):,} present", display
        )


def _frames(ds: Any, n_frames: int) -> list[FrameGeometry]:
    """Per-frame geometry from functional groups (enhanced objects) or the top-level header."""
    top = FrameGeometry(
        position=_floats(ds.get("ImagePositionPatient"), 3),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        slope=_float(ds.get("RescaleSlope"), 1.0),
        intercept=_float(ds.get("RescaleIntercept"), 0.0),
        voi=_voi(ds),
    )
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None and shared is None:
        # classic objects: a multi-frame one has no per-frame positions (cine, legacy multi-frame)
        return [top] if n_frames == 1 else [replace(top, position=None)] * n_frames
    return [
        _enhanced_geometry(per_frame[i] if per_frame is not None and i < len(per_frame) else None, shared, top)
        for i in range(n_frames)
    ]


def _enhanced_geometry(own: Any, shared: Any, top: FrameGeometry) -> FrameGeometry:
    """One frame of an enhanced object: its own functional groups first, then the shared ones."""

    def find(sequence: str, attr: str) -> Any:
        for groups in (own, shared):
            item = _item(groups, sequence)
            if item is not None and attr in item:
                return item.get(attr)
        return None

    voi_item = next((i for g in (own, shared) if (i := _item(g, "FrameVOILUTSequence")) is not None), None)
    slope = find("PixelValueTransformationSequence", "RescaleSlope")
    intercept = find("PixelValueTransformationSequence", "RescaleIntercept")
    return FrameGeometry(
        position=_floats(find("PlanePositionSequence", "ImagePositionPatient"), 3),
        orientation=_floats(find("PlaneOrientationSequence", "ImageOrientationPatient"), 6) or top.orientation,
        slope=_float(slope, top.slope),
        intercept=_float(intercept, top.intercept),
        voi=_voi(voi_item) if voi_item is not None else top.voi,
    )


def _voi(ds: Any) -> VOI | None:
    """The first VOI LUT or window of ``ds`` (the default one a viewer shows)."""
    if ds is None:
        return None
    lut_item = _item(ds, "VOILUTSequence")
    if lut_item is not None and "LUTDescriptor" in lut_item and "LUTData" in lut_item:
        table = _lut_table(lut_item, little_endian=ds.original_encoding[1] is not False)
        if table is not None:
            first = int(lut_item.LUTDescriptor[1])
            if first >= 32768 and ds.get("PixelRepresentation", 0) == 1:
                first -= 65536  # descriptor value is the two's complement of a signed first input
            return TableVOI(first_mapped=first, table=table)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and float(width) > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return WindowVOI(float(center), float(width), function)
    return None


def _lut_table(item: Any, little_endian: bool) -> np.ndarray | None:
    """The entries of a LUT item (US list or OW bytes), as many as its descriptor says."""
    n_entries = int(item.LUTDescriptor[0]) or 65536
    data = item.LUTData
    if isinstance(data, bytes):
        table = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little_endian else ">u2")
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.float64)
    return table[:n_entries].astype(np.float64) if len(table) else None


def _item(ds: Any, keyword: str) -> Any:
    seq = ds.get(keyword) if ds is not None else None
    return seq[0] if seq else None


def _first(value: Any) -> Any:
    if value is None or value == "":
        return None
    try:
        return value[0] if not isinstance(value, str | bytes) and len(value) else value
    except TypeError:
        return value


def _first_present(ds: Any, *keywords: str) -> Any:
    return next((ds.get(k) for k in keywords if ds.get(k) not in (None, "")), None)


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(np.isfinite(out)) else None


def _pair(value: Any) -> tuple[float, float] | None:
    out = _floats(value, 2)
    return (out[0], out[1]) if out and out[0] > 0 and out[1] > 0 else None


def _float(value: Any, default: float) -> float:
    try:
        out = float(_first(value))
    except (TypeError, ValueError):
        return default
    return out if np.isfinite(out) else default


def _int(value: Any) -> int | None:
    try:
        return int(_first(value))
    except (TypeError, ValueError):
        return None
