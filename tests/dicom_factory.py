"""Test-only writers of synthetic DICOM files, ordinary and odd (no patient data).

Pixel arrays given to the writers are *stored* values: ``dcmread(path).pixel_array`` returns them
unchanged (all encodings here are lossless). Storage is signed when any value is negative.

Transfer syntaxes: ``WRITABLE`` need no pixel encoder, ``PYDICOM_ENCODED`` use ``Dataset.compress``,
``GDCM_ENCODED`` are produced by transcoding an uncompressed file with python-gdcm.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    PositronEmissionTomographyImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

SOP_CLASSES = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "PT": PositronEmissionTomographyImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "US": UltrasoundImageStorage,
    "OT": SecondaryCaptureImageStorage,
    "SR": BasicTextSRStorage,
    "PR": GrayscaleSoftcopyPresentationStateStorage,
}
ENHANCED_SOP_CLASSES = {"CT": EnhancedCTImageStorage, "MR": EnhancedMRImageStorage}
WRITABLE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
PYDICOM_ENCODED = (RLELossless,)
GDCM_ENCODED = (JPEG2000Lossless, JPEGLSLossless, JPEGLosslessSV1)
LOSSLESS_SYNTAXES = WRITABLE + PYDICOM_ENCODED + GDCM_ENCODED

Window = tuple[float, float]
VoiLut = tuple[int, int, Sequence[int] | np.ndarray]


# ---- common building blocks -------------------------------------------------------------------------


def _dataset(sop_class: str, modality: str, study_uid: str | None, series_uid: str | None) -> Dataset:
    """Patient, study, series and SOP common attributes plus file meta (explicit VR little endian)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medlens test factory"
    ds.ReferringPhysicianName = ""
    ds.PatientName = "TEST^SYNTHETIC"
    ds.PatientID = "SYNTHETIC"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    return ds


def _storage(arr: np.ndarray, bits_stored: int | None) -> tuple[np.dtype, int, int, int]:
    """(little-endian dtype, BitsAllocated, BitsStored, PixelRepresentation) that hold ``arr`` exactly."""
    if not np.issubdtype(arr.dtype, np.integer) and not np.array_equal(arr, np.round(arr)):
        raise ValueError("pixel arrays must hold integers (stored values)")
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    signed = int(lo < 0)
    candidates = (8, 16, 32) if arr.dtype.itemsize == 1 else (16, 32)
    allocated = next(
        b for b in candidates if (lo >= -(2 ** (b - 1)) and hi < 2 ** (b - 1)) or (not signed and hi < 2**b)
    )
    stored = bits_stored or allocated
    low, high = (-(2 ** (stored - 1)), 2 ** (stored - 1)) if signed else (0, 2**stored)
    if lo < low or hi >= high:
        raise ValueError(f"values {lo}..{hi} do not fit {stored} stored bits")
    return np.dtype(f"<{'iu'[1 - signed]}{allocated // 8}"), allocated, stored, signed


def _set_pixels(ds: Dataset, pixels: np.ndarray, photometric: str, bits_stored: int | None = None) -> None:
    """Image Pixel module for a (H, W), (H, W, 3), (N, H, W) or (N, H, W, 3) array."""
    pixels = np.asarray(pixels)
    color = photometric in ("RGB", "YBR_FULL")
    frame_ndim = 3 if color else 2
    if pixels.ndim not in (frame_ndim, frame_ndim + 1):
        raise ValueError(f"array shape {pixels.shape} does not suit {photometric}")
    if color:
        pixels = pixels.astype(np.uint8)
    dtype, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = _storage(pixels, bits_stored)
    ds.HighBit = ds.BitsStored - 1
    ds.SamplesPerPixel = 3 if color else 1
    ds.PhotometricInterpretation = photometric
    if color:
        ds.PlanarConfiguration = 0
    if pixels.ndim > frame_ndim:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-frame_ndim:][:2]
    ds.PixelData = pixels.astype(dtype).tobytes()
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"


def _lut_item(first_mapped: int, bits: int, table: Sequence[int] | np.ndarray) -> Dataset:
    """A LUT sequence item (descriptor + data) as found in VOI / modality LUT sequences."""
    table = np.asarray(table, dtype=np.uint16)
    item = Dataset()
    item.add_new("LUTDescriptor", "SS" if first_mapped < 0 else "US", [len(table) % 65536, first_mapped, bits])
    if len(table) <= 32767:
        item.add_new("LUTData", "US", [int(v) for v in table])
    else:
        item.add_new("LUTData", "OW", table.astype("<u2").tobytes())
    item.LUTExplanation = "TEST LUT"
    return item


def _set_display(
    ds: Dataset,
    *,
    rescale: tuple[float, float] | None = None,
    window: Window | Sequence[Window] | None = None,
    voi_lut: VoiLut | None = None,
    voi_function: str | None = None,
    presentation_lut_shape: str | None = None,
) -> None:
    """Modality LUT (rescale), VOI LUT (windows, LUT table, function) and presentation LUT shape."""
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "HU" if ds.Modality == "CT" else "US"
    if window is not None:
        windows = list(window) if np.ndim(window) == 2 else [window]
        ds.WindowCenter = [float(c) for c, _ in windows] if len(windows) > 1 else float(windows[0][0])
        ds.WindowWidth = [float(w) for _, w in windows] if len(windows) > 1 else float(windows[0][1])
    if voi_lut is not None:
        ds.VOILUTSequence = DicomSequence([_lut_item(*voi_lut)])
    if voi_function is not None:
        ds.VOILUTFunction = voi_function
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape


def _gdcm_encode(ds: Dataset, transfer_syntax: UID, workdir: Path) -> None:
    """Encode the pixel data of ``ds`` in place with python-gdcm (via a temporary uncompressed file).

    Only the encapsulated Pixel Data is taken from gdcm's output, so every other attribute (e.g. the
    per-frame functional groups, which gdcm would rewrite) stays as written by pydicom.
    """
    import gdcm

    fd, name = tempfile.mkstemp(suffix=".dcm", dir=workdir)
    os.close(fd)
    src, dst = Path(name), Path(name + ".enc")
    try:
        dcmwrite(src, ds, enforce_file_format=True)
        reader = gdcm.ImageReader()
        reader.SetFileName(str(src))
        if not reader.Read():
            raise RuntimeError("gdcm cannot read the uncompressed file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.GetTSType(str(transfer_syntax))))
        change.SetInput(reader.GetImage())
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(dst))
        writer.SetFile(reader.GetFile())
        if not change.Change():
            raise RuntimeError(f"gdcm cannot encode {transfer_syntax.name}")
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise RuntimeError(f"gdcm cannot write {transfer_syntax.name}")
        encoded = dcmread(dst)
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    ds.PixelData = encoded.PixelData
    ds["PixelData"].VR = "OB"
    ds.PhotometricInterpretation = encoded.PhotometricInterpretation
    ds.file_meta.TransferSyntaxUID = transfer_syntax


def _save(
    ds: Dataset,
    path: Path,
    transfer_syntax: str = ExplicitVRLittleEndian,
    omit: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Apply ``extra`` then ``omit`` (keywords), encode in ``transfer_syntax`` and write ``path``."""
    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)
    for keyword in omit:
        if keyword in ds:
            delattr(ds, keyword)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    transfer_syntax = UID(transfer_syntax)
    if transfer_syntax in GDCM_ENCODED:
        _gdcm_encode(ds, transfer_syntax, path.parent)
    elif transfer_syntax in PYDICOM_ENCODED:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    elif transfer_syntax in WRITABLE:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    else:
        raise ValueError(f"cannot encode {transfer_syntax!r} here; use one of LOSSLESS_SYNTAXES")
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _per_item(value: Any, n: int, is_single: bool) -> list[Any]:
    """Broadcast a single value to n items, or check a per-item list has n entries."""
    if is_single:
        return [value] * n
    if len(value) != n:
        raise ValueError(f"expected {n} per-item values, got {len(value)}")
    return list(value)


# ---- public writers ----------------------------------------------------------------------------------


def write_series(
    out_dir: Path,
    arrays: Sequence[np.ndarray],
    *,
    modality: str = "CT",
    positions: Sequence[Sequence[float]] | None = None,
    orientation: Sequence[float] | Sequence[Sequence[float]] = (1, 0, 0, 0, 1, 0),
    instance_numbers: Sequence[int] | None = None,
    filenames: Sequence[str] | None = None,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_thickness: float | None = None,
    rescale: tuple[float, float] | None = (1.0, -1024.0),
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    window: Window | Sequence[Window] | None = None,
    voi_lut: VoiLut | None = None,
    voi_function: str | None = None,
    presentation_lut_shape: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    omit: Sequence[str] = (),
    extra: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
) -> list[Path]:
    """One single-frame file per array, in array order; returns their paths.

    Defaults: positions (0, 0, i * (slice_thickness or 1)), instance numbers 1..n, names ``0001.dcm``...
    ``orientation`` and ``extra`` may be per slice (a list of 6-tuples / a list of dicts). SliceThickness
    is written only when given. ``omit`` deletes keywords after ``extra`` is applied.
    """
    n = len(arrays)
    study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
    step = slice_thickness or 1.0
    positions = positions if positions is not None else [(0.0, 0.0, i * step) for i in range(n)]
    orientations = _per_item(orientation, n, np.ndim(orientation) == 1)
    extras = _per_item(extra or {}, n, extra is None or isinstance(extra, Mapping))
    numbers = instance_numbers if instance_numbers is not None else range(1, n + 1)
    names = filenames if filenames is not None else [f"{i + 1:04d}.dcm" for i in range(n)]
    frame_of_reference = generate_uid()
    paths = []
    for i, arr in enumerate(arrays):
        ds = _dataset(SOP_CLASSES.get(modality, SecondaryCaptureImageStorage), modality, study_uid, series_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(numbers[i])
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImagePositionPatient = [float(v) for v in positions[i]]
        ds.ImageOrientationPatient = [float(v) for v in orientations[i]]
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
        if slice_thickness is not None:
            ds.SliceThickness = slice_thickness
        _set_pixels(ds, arr, photometric, bits_stored)
        _set_display(
            ds,
            rescale=rescale,
            window=window,
            voi_lut=voi_lut,
            voi_function=voi_function,
            presentation_lut_shape=presentation_lut_shape,
        )
        paths.append(_save(ds, Path(out_dir) / names[i], transfer_syntax, omit, extras[i]))
    return paths


def _functional_group(**items: Dataset) -> Dataset:
    """A functional-group item holding one-item sequences, e.g. ``PlanePositionSequence=item``."""
    group = Dataset()
    for keyword, item in items.items():
        setattr(group, keyword, DicomSequence([item]))
    return group


def _item(**values: Any) -> Dataset:
    """A dataset from keyword arguments."""
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _rescale_item(rescale: tuple[float, float], modality: str) -> Dataset:
    """A PixelValueTransformationSequence item."""
    return _item(RescaleSlope=rescale[0], RescaleIntercept=rescale[1], RescaleType="HU" if modality == "CT" else "US")


def write_enhanced(
    path: Path,
    frames: np.ndarray,
    *,
    modality: str = "CT",
    positions: Sequence[Sequence[float]] | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    slice_thickness: float = 1.0,
    rescale: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
    frame_order: Sequence[int] | None = None,
    window: Window | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    study_uid: str | None = None,
    series_uid: str | None = None,
    omit: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """An Enhanced CT / MR multi-frame file from (n, H, W) frames given in geometric order.

    ``positions[i]`` belongs to ``frames[i]`` (default (0, 0, i * slice_thickness)). ``frame_order`` is
    the permutation stored: stored frame k is ``frames[frame_order[k]]``. ``rescale`` is shared (one
    pair) or per geometric frame (a list); None means (1, -1024) for CT and no rescale for MR.
    """
    frames = np.asarray(frames)
    n = len(frames)
    order = list(frame_order) if frame_order is not None else list(range(n))
    if sorted(order) != list(range(n)):
        raise ValueError("frame_order must be a permutation of range(len(frames))")
    positions = positions if positions is not None else [(0.0, 0.0, i * slice_thickness) for i in range(n)]
    if rescale is None and modality == "CT":
        rescale = (1.0, -1024.0)
    per_frame_rescale = rescale is not None and np.ndim(rescale) == 2
    ds = _dataset(ENHANCED_SOP_CLASSES[modality], modality, study_uid, series_uid)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = generate_uid()
    ds.ContentQualification = "RESEARCH"
    ds.BurnedInAnnotation = "NO"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.AcquisitionDateTime = "20240101120000"
    dimension_uid = generate_uid()
    ds.DimensionOrganizationSequence = DicomSequence([_item(DimensionOrganizationUID=dimension_uid)])
    ds.DimensionIndexSequence = DicomSequence(
        [
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209056,
                FunctionalGroupPointer=0x00209111,
            ),
            _item(
                DimensionOrganizationUID=dimension_uid,
                DimensionIndexPointer=0x00209057,
                FunctionalGroupPointer=0x00209111,
            ),
        ]
    )
    frame_type = _item(FrameType=["ORIGINAL", "PRIMARY", "AXIAL", "NONE"])
    shared = {
        "PlaneOrientationSequence": _item(ImageOrientationPatient=[float(v) for v in orientation]),
        "PixelMeasuresSequence": _item(PixelSpacing=[float(v) for v in pixel_spacing], SliceThickness=slice_thickness),
        f"{'CT' if modality == 'CT' else 'MR'}ImageFrameTypeSequence": frame_type,
    }
    if rescale is not None and not per_frame_rescale:
        shared["PixelValueTransformationSequence"] = _rescale_item(rescale, modality)
    if window is not None:
        shared["FrameVOILUTSequence"] = _item(WindowCenter=window[0], WindowWidth=window[1])
    ds.SharedFunctionalGroupsSequence = DicomSequence([_functional_group(**shared)])
    per_frame = []
    for geometric in order:
        groups = {
            "PlanePositionSequence": _item(ImagePositionPatient=[float(v) for v in positions[geometric]]),
            "FrameContentSequence": _item(
                StackID="1", InStackPositionNumber=geometric + 1, DimensionIndexValues=[1, geometric + 1]
            ),
        }
        if per_frame_rescale:
            groups["PixelValueTransformationSequence"] = _rescale_item(rescale[geometric], modality)
        per_frame.append(_functional_group(**groups))
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    _set_pixels(ds, frames[order], "MONOCHROME2")
    ds.NumberOfFrames = n
    return _save(ds, path, transfer_syntax, omit, extra)


def write_radiograph(
    path: Path,
    array: np.ndarray,
    *,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    window: Window | Sequence[Window] | None = None,
    voi_lut: VoiLut | None = None,
    voi_function: str | None = None,
    presentation_lut_shape: str | None = None,
    rescale: tuple[float, float] | None = None,
    bits_stored: int | None = 12,
    pixel_spacing: Sequence[float] = (0.15, 0.15),
    transfer_syntax: str = ExplicitVRLittleEndian,
    omit: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A PA chest CR / DX (for presentation) projection radiograph."""
    ds = _dataset(SOP_CLASSES[modality], modality, None, None)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.ImagerPixelSpacing = [float(v) for v in pixel_spacing]
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    _set_pixels(ds, array, photometric, bits_stored)
    _set_display(
        ds,
        rescale=rescale,
        window=window,
        voi_lut=voi_lut,
        voi_function=voi_function,
        presentation_lut_shape=presentation_lut_shape,
    )
    return _save(ds, path, transfer_syntax, omit, extra)


def write_non_image(path: Path, kind: str = "SR") -> Path:
    """A valid DICOM file without pixel data: Basic Text SR ("SR") or grayscale presentation state ("PR")."""
    ds = _dataset(SOP_CLASSES[kind], kind, None, None)
    if kind == "SR":
        ds.ValueType = "CONTAINER"
        ds.ConceptNameCodeSequence = DicomSequence(
            [_item(CodeValue="18748-4", CodingSchemeDesignator="LN", CodeMeaning="Diagnostic Imaging Report")]
        )
        ds.ContinuityOfContent = "SEPARATE"
        ds.CompletionFlag = "COMPLETE"
        ds.VerificationFlag = "UNVERIFIED"
        text = _item(RelationshipType="CONTAINS", ValueType="TEXT", TextValue="Synthetic test report.")
        text.ConceptNameCodeSequence = DicomSequence(
            [_item(CodeValue="121071", CodingSchemeDesignator="DCM", CodeMeaning="Finding")]
        )
        ds.ContentSequence = DicomSequence([text])
    elif kind == "PR":
        ds.ContentLabel = "TEST"
        ds.ContentDescription = "Synthetic presentation state"
        ds.ContentCreatorName = ""
        ds.PresentationCreationDate, ds.PresentationCreationTime = "20240101", "120000"
        ds.PresentationLUTShape = "IDENTITY"
        ds.ReferencedSeriesSequence = DicomSequence(
            [
                _item(
                    SeriesInstanceUID=generate_uid(),
                    ReferencedImageSequence=DicomSequence(
                        [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=generate_uid())]
                    ),
                )
            ]
        )
    else:
        raise ValueError(f"kind must be 'SR' or 'PR', not {kind!r}")
    return _save(ds, path)


def write_not_dicom(path: Path, content: bytes = b"this is not a DICOM file\n") -> Path:
    """A file with arbitrary bytes (no preamble, no DICM marker)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def truncate(path: Path, keep_fraction: float, dest: Path | None = None) -> Path:
    """Keep the first ``keep_fraction`` of the bytes of ``path``, in place or in a copy at ``dest``."""
    path = Path(path)
    target = Path(dest) if dest is not None else path
    if target != path:
        shutil.copyfile(path, target)
    size = path.stat().st_size
    with open(target, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))
    return target


# ---- layouts that are not slices (issue 11, item 4) ---------------------------------------------------


def csa2_header(tags: Mapping[str, Sequence[str]]) -> bytes:
    """A minimal Siemens CSA2 header: "SV10", 4 unused bytes, n_tags, 77; per tag a 64-byte name, vm, 4-byte
    VR, syngodt, n_items, 77; per item four int32 (the first is the length), then the value padded to 4."""
    import struct

    out = bytearray(b"SV10" + b"\x04\x03\x02\x01" + struct.pack("<II", len(tags), 77))
    for name, items in tags.items():
        out += name.encode().ljust(64, b"\x00")
        out += struct.pack("<i4siii", len(items), b"IS\x00\x00", 6, len(items), 77)
        for value in items:
            data = value.encode() + b"\x00"
            out += struct.pack("<4i", len(data), len(data), 77, len(data))
            out += data.ljust(-(-len(data) // 4) * 4, b"\x00")
    return bytes(out)


def write_mosaic(
    path: Path,
    slices: np.ndarray,
    *,
    count_in_csa: int | None = -1,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A Siemens MR MOSAIC of ``slices`` (N, h, w) tiled row-major in a ceil(sqrt(N)) grid (unused tiles 0).
    ``count_in_csa`` is the NumberOfImagesInMosaic written in the CSA header: -1 writes N, None no CSA header."""
    slices = np.asarray(slices)
    n, h, w = slices.shape
    grid = int(np.ceil(np.sqrt(n)))
    mosaic = np.zeros((grid * h, grid * w), slices.dtype)
    for i in range(n):
        r, c = divmod(i, grid)
        mosaic[r * h : (r + 1) * h, c * w : (c + 1) * w] = slices[i]
    ds = _dataset(MRImageStorage, "MR", None, None)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"]
    ds.Manufacturer = "SIEMENS"
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [2.0, 2.0]
    if count_in_csa is not None:
        block = ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True)
        count = n if count_in_csa == -1 else count_in_csa
        block.add_new(0x10, "OB", csa2_header({"NumberOfImagesInMosaic": [str(count)], "SliceThickness": ["2"]}))
    _set_pixels(ds, mosaic, "MONOCHROME2")
    return _save(ds, path, extra=extra)


def write_cine(
    path: Path,
    frames: np.ndarray,
    *,
    modality: str = "US",
    frame_time: float | None = 33.3,
    secondary_capture: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """A multi-frame clip without per-frame positions: an ultrasound (``modality`` "US") or "XA" cine (FrameTime and a
    FrameIncrementPointer to it) of (N, H, W, 3) RGB or (N, H, W) grey frames, or, with
    ``secondary_capture``, a multi-frame secondary capture (no timing)."""
    from pydicom.uid import (
        MultiFrameTrueColorSecondaryCaptureImageStorage,
        UltrasoundMultiFrameImageStorage,
        XRayAngiographicImageStorage,
    )

    cine_classes = {"US": UltrasoundMultiFrameImageStorage, "XA": XRayAngiographicImageStorage}

    frames = np.asarray(frames)
    cine_classes = {"US": UltrasoundMultiFrameImageStorage, "XA": XRayAngiographicImageStorage}
    sop = MultiFrameTrueColorSecondaryCaptureImageStorage if secondary_capture else cine_classes[modality]
    ds = _dataset(sop, modality, None, None)
    ds.ImageType = ["DERIVED", "SECONDARY"] if secondary_capture else ["ORIGINAL", "PRIMARY"]
    if frame_time is not None and not secondary_capture:
        ds.FrameTime = frame_time
        ds.FrameIncrementPointer = 0x00181063
    _set_pixels(ds, frames, "RGB" if frames.ndim == 4 else "MONOCHROME2")
    return _save(ds, path, extra=extra)
