"""Read one DICOM file's header (pixels deferred) into the facts the series builder needs.

Every problem is raised as a typed error so callers can skip the file with its reason.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import CorruptFileError, MedlensError, NoImageDataError, UnsupportedInputError
from medlens.io.dicom_layouts import Mosaic, is_mosaic, mosaic_layout, not_a_volume
from medlens.io.dicom_values import first, floats, integer, text
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
#: explicit-VR value representations whose element header has a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN")


@dataclass(frozen=True)
class PixelElement:
    """Where the pixel data element lies in the file; ``length`` is None when undefined (encapsulated)."""

    tag: int
    offset: int | None  # file offset of the value (None for deflated files)
    length: int | None


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
    dataset: Any  # pydicom Dataset of the header (everything before the pixel data)
    pixels: PixelElement
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
    pixel_spacing: tuple[float, float] | None
    acquisition: str
    frames: list[FrameGeometry] = field(default_factory=list)
    has_modality_lut: bool = False
    invert: bool = False
    #: a Siemens MOSAIC's tiling: ``frames`` then holds one entry per tile (dicom_layouts)
    mosaic: Mosaic | None = None
    #: why the frames are not slices of a volume (a cine clip, an unreadable MOSAIC ...), else None
    layout_problem: str | None = None

    @property
    def image_rows(self) -> int:
        """Rows of one 2-D image: a MOSAIC tile's, else the stored image's."""
        return self.mosaic.tile_rows if self.mosaic else self.rows

    @property
    def image_columns(self) -> int:
        return self.mosaic.tile_columns if self.mosaic else self.columns

    @property
    def description(self) -> str:
        """SeriesDescription (converted by pydicom: it may use a non-ASCII character set)."""
        return str(self.dataset.get("SeriesDescription", "") or "")

    @property
    def is_color(self) -> bool:
        return self.samples_per_pixel == 3 or self.photometric == "PALETTE COLOR"


def read_instance(path: Path, display: str) -> DicomInstance:
    """Parse ``path``'s header; raise a typed error if it is not a usable DICOM image."""
    ds, pixels = _read_header(path, display)
    try:
        return _instance(path, display, ds, pixels)
    except MedlensError:
        raise
    except Exception as exc:  # pydicom converts values lazily: a damaged element raises on first access
        detail = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"damaged DICOM header ({type(exc).__name__}: {detail})", display) from None


def instance_from_metadata(ds: Any, display: str, has_pixels: bool = True) -> DicomInstance:
    """A :class:`DicomInstance` from a header without a file (DICOMweb WADO-RS metadata, pixels not yet
    fetched): the same checks as :func:`read_instance`, except the truncation check (nothing to measure).
    ``has_pixels``: whether the metadata lists pixel data (as bulk data)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    if not hasattr(ds, "file_meta") or "TransferSyntaxUID" not in ds.file_meta:
        meta = FileMetaDataset()
        meta.TransferSyntaxUID = text(ds, "TransferSyntaxUID") or ExplicitVRLittleEndian
        ds.file_meta = meta
    try:
        pixels = PixelElement(PIXEL_TAGS[0], None, None) if has_pixels else None
        return _instance(Path(display), display, ds, pixels)  # type: ignore[arg-type]
    except MedlensError:
        raise
    except Exception as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CorruptFileError(f"damaged DICOM metadata ({type(exc).__name__}: {detail})", display) from None


def _instance(path: Path, display: str, ds: Any, pixels: PixelElement) -> DicomInstance:
    modality = text(ds, "Modality").upper() or "OT"
    if pixels is None:
        if "Rows" in ds and "Columns" in ds and "SOPClassUID" in ds and modality not in NON_IMAGE_MODALITIES:
            raise CorruptFileError(f"{_sop_class(ds)} header but no pixel data (truncated or stripped)", display)
        raise NoImageDataError(f"{_sop_class(ds)} has no pixel data (not an image)", display)
    if modality in NON_IMAGE_MODALITIES:
        raise NoImageDataError(f"{_sop_class(ds)} holds {NON_IMAGE_MODALITIES[modality]}, not an image", display)
    rows, columns = integer(ds, "Rows"), integer(ds, "Columns")
    if rows is None or columns is None:
        raise CorruptFileError("image header incomplete (no Rows/Columns)", display)
    n_frames = integer(ds, "NumberOfFrames") or 1
    spp = integer(ds, "SamplesPerPixel") or 1
    bits = integer(ds, "BitsAllocated") or 16
    photometric = text(ds, "PhotometricInterpretation", "MONOCHROME2").upper()
    check_image_size(rows, columns, display)
    check_decoded_size(rows * columns * n_frames * spp * max(bits, 8) // 8, display)
    _check_not_truncated(ds, pixels, path, display, _stored_bytes(rows * columns * n_frames, spp, bits, photometric))
    frames = _frames(ds, n_frames)
    mosaic, layout_problem = mosaic_layout(ds, rows, columns) if n_frames == 1 and is_mosaic(ds) else (None, None)
    if mosaic is not None:  # tiles have no positions of their own here: slices in tile order
        check_image_size(mosaic.tile_rows, mosaic.tile_columns, display)
        frames = [replace(frames[0], position=None)] * mosaic.count
    positioned = all(f.position is not None for f in frames)
    layout_problem = layout_problem or not_a_volume(ds, modality, n_frames, positioned)
    return DicomInstance(
        path=path,
        display=display,
        dataset=ds,
        pixels=pixels,
        sop_instance_uid=text(ds, "SOPInstanceUID") or display,
        series_uid=text(ds, "SeriesInstanceUID") or f"no-series:{display}",
        study_uid=text(ds, "StudyInstanceUID") or "no-study",
        modality=modality,
        rows=rows,
        columns=columns,
        n_frames=n_frames,
        samples_per_pixel=spp,
        photometric=photometric,
        instance_number=integer(ds, "InstanceNumber"),
        series_number=integer(ds, "SeriesNumber"),
        pixel_spacing=_pair(floats(ds, "PixelSpacing", 2) or floats(ds, "ImagerPixelSpacing", 2)),
        acquisition=acquisition_time(ds),
        frames=frames,
        has_modality_lut="ModalityLUTSequence" in ds,
        invert=photometric == "MONOCHROME1" or text(ds, "PresentationLUTShape").upper() == "INVERSE",
        mosaic=mosaic,
        layout_problem=layout_problem,
    )


def acquisition_time(ds: Any) -> str:
    """When the image was made, as sortable digits YYYYMMDDHHMMSS ('' when the header has no date):
    AcquisitionDateTime, else AcquisitionDate/Time, ContentDate/Time, StudyDate/Time, SeriesDate/Time."""
    pairs = (("Acquisition", "Acquisition"), ("Content", "Content"), ("Study", "Study"), ("Series", "Series"))
    stamp = text(ds, "AcquisitionDateTime")
    for date_kw, time_kw in pairs:
        if stamp:
            break
        date = text(ds, f"{date_kw}Date")
        stamp = date + text(ds, f"{time_kw}Time") if date else ""
    digits = "".join(ch for ch in stamp.split("+")[0].split(".")[0] if ch.isdigit())
    return digits[:14] if len(digits) >= 8 else ""


def _sop_class(ds: Any) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown SOP class")


def _stored_bytes(pixels: int, spp: int, bits: int, photometric: str) -> int:
    """Bytes of native pixel data the header promises (PS3.5 8.1.1; YBR_FULL_422 stores 2 samples/pixel)."""
    if bits == 1:
        return -(-pixels * spp // 8)
    samples = 2 if photometric == "YBR_FULL_422" else spp
    return pixels * samples * (bits // 8)


def _read_header(path: Path, display: str) -> tuple[Any, PixelElement | None]:
    """The header (pydicom stops before the pixel data) and where the pixel data element is."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
            has_marker = len(head) == 132 and head[128:132] == b"DICM"
            # Files without the preamble (old ACR-NEMA style) start directly with a group 0002 or 0008 tag.
            if not has_marker and (len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00", b"\x00\x08")):
                raise UnsupportedInputError("not a DICOM file (no DICM marker and no DICOM tags at the start)", display)
            fh.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(fh, stop_before_pixels=True, force=not has_marker)
            pixels = _pixel_element(fh, ds)
    except InvalidDicomError:
        raise UnsupportedInputError("not a DICOM file", display) from None
    except OSError as exc:
        raise CorruptFileError(f"cannot read file ({exc.strerror or exc})", display) from None
    except MedlensError:
        raise
    except Exception as exc:  # pydicom raises many kinds on damaged headers
        detail = " ".join(str(exc).split())
        raise CorruptFileError(f"damaged DICOM header ({type(exc).__name__}: {detail})", display) from None
    if len(ds) == 0:
        raise CorruptFileError("DICOM header could not be read (file truncated or damaged)", display)
    if not has_marker and "SOPClassUID" not in ds and pixels is None:
        raise UnsupportedInputError("not a DICOM file", display)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = _guess_transfer_syntax(ds)
    if ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99":  # deflated: positions are in the inflated stream
        pixels = _deflated_pixel_element(path)
    return ds, pixels


def _pixel_element(fh: Any, ds: Any) -> PixelElement | None:
    """Parse the element header at the file position where pydicom stopped (the pixel data, if any)."""
    start = fh.tell()
    raw = fh.read(12)
    if len(raw) < 8:
        return None
    implicit, little = ds.original_encoding
    order = "<" if little is not False else ">"
    group, element = struct.unpack(f"{order}HH", raw[:4])
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    if implicit or raw[4:6] not in _LONG_VRS:
        length, offset = struct.unpack(f"{order}{'I' if implicit else 'xxH'}", raw[4:8])[0], start + 8
    else:
        length, offset = struct.unpack(f"{order}I", raw[8:12])[0], start + 12
    return PixelElement(tag, offset, None if length == 0xFFFFFFFF else length)


def _deflated_pixel_element(path: Path) -> PixelElement | None:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = pydicom.dcmread(path)
    tag = next((t for t in PIXEL_TAGS if t in full), None)
    return PixelElement(tag, None, len(full[tag].value or b"")) if tag is not None else None


def _guess_transfer_syntax(ds: Any) -> str:
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if ds.original_encoding[0]:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if ds.original_encoding[1] else ExplicitVRBigEndian


def _check_not_truncated(ds: Any, pixels: PixelElement, path: Path, display: str, needed: int) -> None:
    """Native (uncompressed) pixel data must be as long as the header says; checked without reading it."""
    if ds.file_meta.TransferSyntaxUID.is_encapsulated or pixels.length is None or pixels.tag != PIXEL_TAGS[0]:
        return
    available = pixels.length
    if pixels.offset is not None:
        available = min(available, os.path.getsize(path) - pixels.offset)
    if available < needed:
        raise CorruptFileError(
            f"truncated file: pixel data needs {needed:,} bytes, only {max(available, 0):,} present", display
        )


def _frames(ds: Any, n_frames: int) -> list[FrameGeometry]:
    """Per-frame geometry from functional groups (enhanced objects) or the top-level header."""
    top = FrameGeometry(
        position=floats(ds, "ImagePositionPatient", 3),
        orientation=floats(ds, "ImageOrientationPatient", 6),
        slope=_number(ds, "RescaleSlope", 1.0),
        intercept=_number(ds, "RescaleIntercept", 0.0),
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

    def find(sequence: str) -> Any:
        return next((i for g in (own, shared) if (i := _item(g, sequence)) is not None), None)

    transform = find("PixelValueTransformationSequence")
    voi_item = find("FrameVOILUTSequence")
    return FrameGeometry(
        position=floats(find("PlanePositionSequence"), "ImagePositionPatient", 3),
        orientation=floats(find("PlaneOrientationSequence"), "ImageOrientationPatient", 6) or top.orientation,
        slope=_number(transform, "RescaleSlope", top.slope),
        intercept=_number(transform, "RescaleIntercept", top.intercept),
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
            first_mapped = int(lut_item.LUTDescriptor[1])
            if first_mapped >= 32768 and integer(ds, "PixelRepresentation") == 1:
                first_mapped -= 65536  # the descriptor holds the two's complement of a signed first input
            return TableVOI(first_mapped=first_mapped, table=table)
    center, width = _number(ds, "WindowCenter", None), _number(ds, "WindowWidth", None)
    if center is not None and width is not None and width > 0:
        return WindowVOI(center, width, text(ds, "VOILUTFunction", "LINEAR").upper() or "LINEAR")
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


def _pair(value: tuple[float, ...] | None) -> tuple[float, float] | None:
    return (value[0], value[1]) if value and value[0] > 0 and value[1] > 0 else None


def _number(ds: Any, keyword: str, default: float | None) -> Any:
    try:
        value = float(first(ds, keyword))
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default
