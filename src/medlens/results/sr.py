"""A task's result as a DICOM Comprehensive 3D SR (TID 1500 measurement report) in the source study.

The device observer is medlens with the model; each measurement group names the algorithm (model, weights'
fingerprint, medlens version, recipe). The question, the answer and the research-use disclaimer are TEXT items
of an image-level group (TID 1501) that references the images of the series; a yes/no answer adds a CODE item
(concept DCM 121077 "Conclusion", value SCT 373066001 "Yes" / 373067005 "No", CID 230). Each localize box is a
planar ROI (TID 1410): a closed 5-point POLYLINE on the source image, its label as the tracking identifier.
For a DICOM whole slide each patch sent is a planar ROI ("patch N"): a POLYGON in the slide coordinate system
(SCOORD3D, the level-0 instance's frame of reference), as TILED_FULL images call for; label, overview and
thumbnail instances are never referenced (a label may show the patient's name).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medlens import DISCLAIMER, __version__
from medlens.errors import InputError, OutputFolderError
from medlens.files import write_atomic
from medlens.privacy import short_hash

if TYPE_CHECKING:
    from pydicom import Dataset

#: SeriesDescription of every SR medlens writes
SERIES_DESCRIPTION = "medlens research result"
#: (value, scheme, meaning) of the codes used (see the module docstring)
QUESTION_CODE = ("121062", "DCM", "Request")
ANSWER_CODE = ("121071", "DCM", "Finding")
CONCLUSION_CODE = ("121077", "DCM", "Conclusion")
COMMENT_CODE = ("121106", "DCM", "Comment")
YES_NO_CODES = {"yes": ("373066001", "SCT", "Yes"), "no": ("373067005", "SCT", "No")}
PROCEDURE_CODE = ("363679005", "SCT", "Imaging")
ANSWER_TRACKING_ID = "medlens answer"


class DicomSourcesNeededError(InputError):
    """A DICOM SR (or FHIR ImagingStudy reference) needs the DICOM instances the result was computed from."""


class SRBuildError(InputError):
    """The source instances lack what an SR copies from them (patient/study module attributes ...)."""


def _code(code: tuple[str, str, str]) -> Any:
    from highdicom.sr import CodedConcept

    return CodedConcept(*code)


def load_sources(inputs: Sequence[Path | str | Dataset]) -> list[Dataset]:
    """The DICOM headers (no pixels) of the inputs: datasets as given, files, folders or zips searched, a
    ``dicomweb://`` study's from its server.
    Raises :class:`DicomSourcesNeededError` naming the input that holds no DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medlens.io.dicomweb import header_datasets, is_dicomweb
    from medlens.io.discover import discover

    datasets: list[Dataset] = []
    for item in inputs:
        if isinstance(item, pydicom.Dataset):
            datasets.append(item)
            continue
        if is_dicomweb(item):  # the study on its server: the headers from WADO-RS metadata
            datasets.extend(header_datasets(item))
            continue
        path = Path(item)
        found = discover(path)
        read = []
        for file in found.dicom:
            try:
                read.append(pydicom.dcmread(file.path, stop_before_pixels=True))
            except (InvalidDicomError, OSError, ValueError):
                continue
        if found.tempdir is not None:
            found.tempdir.cleanup()
        read = [ds for ds in read if "SOPInstanceUID" in ds and "StudyInstanceUID" in ds]
        if not read:
            raise DicomSourcesNeededError(
                "a DICOM SR joins the result to the source study, but this input holds no DICOM instance "
                "(NIfTI, PNG, PDF and other inputs have no study to join)",
                str(path),
            )
        datasets.extend(read)
    return datasets


def _series_sources(envelope: Mapping[str, Any], sources: Sequence[Dataset]) -> list[Dataset]:
    """The sources of the series the result was computed on (the envelope names it by its hashed UID)."""
    if not sources:
        raise DicomSourcesNeededError("no DICOM source instances were given; a DICOM SR needs them")
    tag = (envelope.get("details") or {}).get("series")
    chosen = [ds for ds in sources if tag and short_hash(str(ds.get("SeriesInstanceUID", ""))) == tag]
    if tag and not chosen:
        raise DicomSourcesNeededError(f"none of the given DICOM instances is of the result's series ({tag})")
    chosen = chosen or list(sources)
    studies = {ds.StudyInstanceUID for ds in chosen}
    if len(studies) > 1:
        raise DicomSourcesNeededError(f"the source instances belong to {len(studies)} studies; an SR joins one")
    return chosen


#: envelope ``details`` key: the images sent to the model, prompt order, ``{"sop": short hash, "frame": 0-based or
#: None}`` each (tasks/study.py's ``study_details``); without it, every instance of the series is a source
SENT_KEY = "instances_sent"


def _sent_images(envelope: Mapping[str, Any], series: Sequence[Dataset]) -> list[tuple[Dataset, list[int] | None]]:
    """The instances the model saw (with their 1-based frames when multi-frame), in series order; the whole
    series when the envelope does not say."""
    sent = (envelope.get("details") or {}).get(SENT_KEY)
    if not sent:
        return [(ds, None) for ds in series]
    frames: dict[str, set[int]] = {}
    for item in sent:
        frame = item.get("frame")
        frames.setdefault(str(item.get("sop")), set()).update({int(frame) + 1} if frame is not None else set())
    by_hash = {short_hash(str(ds.SOPInstanceUID)): ds for ds in series}
    missing = [tag for tag in frames if tag not in by_hash]
    if missing:
        raise DicomSourcesNeededError(
            f"{len(missing)} of the {len(frames)} instances sent to the model are not among the given DICOM instances"
        )
    chosen = [ds for tag, ds in by_hash.items() if tag in frames]
    return [(ds, sorted(frames[short_hash(str(ds.SOPInstanceUID))]) or None) for ds in chosen]


def _boxed_image(envelope: Mapping[str, Any], sources: Sequence[Dataset]) -> tuple[Dataset, int | None]:
    """The source instance (and 0-based frame) the localize boxes are on."""
    ref = (envelope.get("details") or {}).get("image_ref") or {}
    tag = ref.get("sop_instance")
    matches = [ds for ds in sources if tag and short_hash(str(ds.SOPInstanceUID)) == tag]
    if not matches and not tag and len(sources) == 1:
        matches = list(sources)
    if not matches:
        raise DicomSourcesNeededError("the image the boxes were drawn on is not among the given DICOM instances")
    return matches[0], ref.get("frame")


def _polyline(box_px: Sequence[float], image_size: Sequence[int] | None, source: Dataset) -> Any:
    """The box as a closed 5-point (column, row) polyline on the source's pixel grid (DICOM: the outer
    corner of the first pixel is 0,0), scaled when the prepared image was resized."""
    import numpy as np

    x0, y0, x1, y1 = (float(v) for v in box_px)
    sx = sy = 1.0
    if image_size:
        sx, sy = int(source.Columns) / image_size[0], int(source.Rows) / image_size[1]
    x0, x1, y0, y1 = x0 * sx, x1 * sx, y0 * sy, y1 * sy
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=float)


def _slide_volumes(sources: Sequence[Dataset]) -> list[Dataset]:
    """The pyramid levels of a DICOM slide (ImageType VOLUME), level 0 (the largest) first."""
    volumes = [ds for ds in sources if "VOLUME" in [str(v) for v in ds.get("ImageType", [])]]
    if not volumes:
        raise DicomSourcesNeededError("the DICOM sources hold no whole-slide pyramid level (ImageType VOLUME)")
    return sorted(volumes, key=lambda ds: -int(ds.get("TotalPixelMatrixColumns", ds.get("Columns", 0))))


def _patch_groups(envelope: Mapping[str, Any], level0: Dataset) -> list[Any]:
    """One TID 1410 planar ROI group per slide patch sent, in slide coordinates (mm)."""
    import numpy as np
    from highdicom import UID
    from highdicom.spatial import ImageToReferenceTransformer
    from highdicom.sr import (
        GraphicTypeValues3D,
        ImageRegion3D,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        TrackingIdentifier,
    )

    to_slide = ImageToReferenceTransformer.for_image(level0, for_total_pixel_matrix=True)
    groups = []
    for number, patch in enumerate((envelope.get("details") or {}).get("patches") or [], start=1):
        x0, y0 = (float(v) for v in patch["x0_y0"])
        size = float(patch["size_level0"])
        corners = np.array([[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]])
        region = ImageRegion3D(GraphicTypeValues3D.POLYGON, to_slide(corners), str(level0.FrameOfReferenceUID))
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=UID(), identifier=f"patch {number}"),
                referenced_region=region,
                algorithm_id=_algorithm(envelope),
            )
        )
    return groups


def _algorithm(envelope: Mapping[str, Any]) -> Any:
    from highdicom.sr import AlgorithmIdentification

    model = str(envelope.get("model") or "unknown model")
    revision = envelope.get("model_fingerprint") or f"{envelope.get('engine') or 'unknown'} engine"
    parameters = [f"medlens {envelope.get('medlens_version') or __version__}"]
    if envelope.get("recipe"):
        parameters.append(f"recipe {envelope['recipe']}")
    parameters.append(f"task {envelope.get('task') or 'qa'}")
    return AlgorithmIdentification(name=model[:64], version=str(revision)[:64], parameters=parameters)


def _text(code: tuple[str, str, str], value: str) -> Any:
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(name=_code(code), value=value, relationship_type=RelationshipTypeValues.CONTAINS)


def _yes_no(envelope: Mapping[str, Any]) -> str | None:
    final = envelope.get("final_answer") or (envelope.get("payload") or {}).get("final_answer")
    final = str(final).strip().casefold() if final else None
    return final if final in YES_NO_CODES else None


def _answer_group(
    envelope: Mapping[str, Any], question: str | None, images: Sequence[tuple[Dataset, list[int] | None]]
) -> Any:
    """TID 1501 image-level group: question, answer, disclaimer (TEXT), a yes/no conclusion (CODE)."""
    from highdicom import UID
    from highdicom.sr import (
        MeasurementsAndQualitativeEvaluations,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )

    yes_no = _yes_no(envelope)
    evaluations = [QualitativeEvaluation(_code(CONCLUSION_CODE), _code(YES_NO_CODES[yes_no]))] if yes_no else None
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=UID(), identifier=ANSWER_TRACKING_ID),
        algorithm_id=_algorithm(envelope),
        qualitative_evaluations=evaluations,
        source_images=[
            SourceImageForMeasurementGroup.from_source_image(ds, referenced_frame_numbers=frames)
            for ds, frames in images
        ],
    )
    answer = str(envelope.get("final_answer") if envelope.get("task") == "localize" else "") or str(
        envelope.get("answer") or ""
    )
    items = group[0].ContentSequence
    if question:
        items.append(_text(QUESTION_CODE, question))
    items.append(_text(ANSWER_CODE, answer.strip() or "(no answer)"))
    items.append(_text(COMMENT_CODE, str(envelope.get("disclaimer") or DISCLAIMER)))
    return group


def _box_groups(envelope: Mapping[str, Any], sources: Sequence[Dataset]) -> list[Any]:
    """One TID 1410 planar ROI group per localize box."""
    from highdicom import UID
    from highdicom.sr import (
        GraphicTypeValues,
        ImageRegion,
        PlanarROIMeasurementsAndQualitativeEvaluations,
        SourceImageForRegion,
        TrackingIdentifier,
    )

    payload = envelope.get("payload") or {}
    boxes = [b for b in payload.get("boxes") or [] if b.get("box_px")]
    if not boxes:
        return []
    image, frame = _boxed_image(envelope, sources)
    frames = [int(frame) + 1] if frame is not None and int(image.get("NumberOfFrames", 1) or 1) > 1 else None
    groups = []
    for number, box in enumerate(boxes, start=1):
        region = ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=_polyline(box["box_px"], payload.get("image_size"), image),
            source_image=SourceImageForRegion(image.SOPClassUID, image.SOPInstanceUID, frames),
        )
        label = str(box.get("label") or f"box {number}")[:64]
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(uid=UID(), identifier=label),
                referenced_region=region,
                algorithm_id=_algorithm(envelope),
            )
        )
    return groups


def build_sr(
    envelope: Mapping[str, Any] | Any,
    sources: Sequence[Dataset] | Sequence[Path | str],
    *,
    question: str | None = None,
    series_number: int = 9901,
    instance_number: int = 1,
) -> Dataset:
    """A Comprehensive 3D SR (new series in the sources' study) holding the task result ``envelope``
    (an :class:`~medlens.tasks.envelope.Envelope` or its dict). ``sources``: the DICOM instances (datasets,
    or the input files/folders) the result was computed on."""
    from highdicom import UID
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        MeasurementReport,
        ObservationContext,
        ObserverContext,
    )
    from pydicom.sr.codedict import codes

    envelope = envelope.model_dump() if hasattr(envelope, "model_dump") else dict(envelope)
    series = _series_sources(envelope, load_sources(sources))
    slide = (envelope.get("details") or {}).get("family") == "wsi"
    if slide:
        series = _slide_volumes(series)[:1]  # the patches are on level 0
    question = question or envelope.get("question")
    model = str(envelope.get("model") or "unknown model")
    device = DeviceObserverIdentifyingAttributes(
        uid=UID(), name="medlens", manufacturer_name="medlens", model_name=model[:64]
    )
    context = ObservationContext(observer_device_context=ObserverContext(codes.DCM.Device, device))
    sent = [(ds, None) for ds in series] if slide else _sent_images(envelope, series)
    groups = [_answer_group(envelope, question, sent)]
    groups += _patch_groups(envelope, series[0]) if slide else _box_groups(envelope, series)
    report = MeasurementReport(
        observation_context=context, procedure_reported=_code(PROCEDURE_CODE), imaging_measurements=groups
    )
    try:
        sr = Comprehensive3DSR(
            evidence=[ds for ds, _ in sent],
            content=report[0],
            series_instance_uid=UID(),
            series_number=series_number,
            sop_instance_uid=UID(),
            instance_number=instance_number,
            manufacturer="medlens",
            is_complete=True,
        )
    except (ValueError, AttributeError, TypeError) as exc:
        raise SRBuildError(f"cannot build a DICOM SR from these source instances: {exc}") from None
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: a model's answer may hold any character
    return sr


def write_sr(path: Path | str, envelope: Mapping[str, Any] | Any, sources: Sequence[Any], **options: Any) -> Path:
    """:func:`build_sr` written to ``path``; returns the path."""
    sr = build_sr(envelope, sources, **options)
    return save_output(path, lambda f: sr.save_as(f, enforce_file_format=True), "the SR")


def save_output(path: Path | str, write: Any, what: str) -> Path:
    """``write(file)`` into ``path`` atomically (its folder made when missing); an OS failure is a typed error
    naming the path."""
    path = Path(path)
    try:
        return write_atomic(path, write)
    except OSError as exc:
        raise OutputFolderError(f"cannot write {what}: {exc.strerror or exc}", str(path)) from exc
