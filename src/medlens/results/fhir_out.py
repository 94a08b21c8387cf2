"""A task's result as FHIR R4: a collection Bundle of one DiagnosticReport and its Observations.

Follows HL7's DICOM SR -> FHIR mapping (the Imaging Measurement Report, TID 1500) where it applies: the
report is a DiagnosticReport (code DCM 126000 "Imaging Measurement Report", status preliminary) whose
``result`` lists one Observation per measurement group; every resource is ``derivedFrom``/``imagingStudy``
the source ImagingStudy, referenced by its Study Instance UID (``urn:oid:``) and, when the SR was written
too, by the SR's SOP Instance UID. A box's label is its Observation's ``bodySite`` text and the box, on the
source image's pixel grid, its components. No patient identity is copied: ``subject`` is left to the
receiving system. The disclaimer is in the conclusion and in every Observation's note.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from medlens import DISCLAIMER

DCM_SYSTEM = "http://dicom.nema.org/resources/ontology/DCM"
SCT_SYSTEM = "http://snomed.info/sct"
REPORT_CODE = {"system": DCM_SYSTEM, "code": "126000", "display": "Imaging Measurement Report"}
ANSWER_CODE = {"system": DCM_SYSTEM, "code": "121071", "display": "Finding"}
REGION_CODE = {"system": DCM_SYSTEM, "code": "111030", "display": "Image Region"}
YES_NO = {
    "yes": {"system": SCT_SYSTEM, "code": "373066001", "display": "Yes"},
    "no": {"system": SCT_SYSTEM, "code": "373067005", "display": "No"},
}
#: component codes of a box (pixel edges on the source image, DICOM convention: 0,0 = outer corner)
BOX_PARTS = ("x0", "y0", "x1", "y1")


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def _study_ref(study_uid: str) -> dict[str, Any]:
    return {"type": "ImagingStudy", "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study_uid}"}}


def _observation(code: dict[str, Any], study: dict[str, Any], disclaimer: str, **fields: Any) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "preliminary",
        "category": [{"coding": [{"system": DCM_SYSTEM, "code": "126000", "display": "Imaging Measurement Report"}]}],
        "code": {"coding": [code]},
        "derivedFrom": [study],
        "note": [{"text": disclaimer}],
        **fields,
    }


def build_fhir(
    envelope: Mapping[str, Any] | Any,
    sources: Sequence[Any],
    *,
    question: str | None = None,
    sr_uid: str | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Bundle (JSON-ready dict) of the task result ``envelope``; ``sources`` as for
    :func:`medlens.results.sr.build_sr` (the study is referenced by its UID). Validated with fhir.resources."""
    from medlens.results.sr import _boxed_image, _series_sources, _yes_no, load_sources

    envelope = envelope.model_dump() if hasattr(envelope, "model_dump") else dict(envelope)
    series = _series_sources(envelope, load_sources(sources))
    study = _study_ref(str(series[0].StudyInstanceUID))
    disclaimer = str(envelope.get("disclaimer") or DISCLAIMER)
    question = question or envelope.get("question")
    answer = str(envelope.get("answer") or "").strip()
    entries: list[dict[str, Any]] = []

    value: dict[str, Any] = {"valueString": answer or "(no answer)"}
    if (yes_no := _yes_no(envelope)) is not None:
        value = {"valueCodeableConcept": {"coding": [YES_NO[yes_no]], "text": answer or yes_no}}
    entries.append(_observation(ANSWER_CODE, study, disclaimer, **value))
    if question:
        entries[0]["note"].insert(0, {"text": f"Question: {question}"})

    payload = envelope.get("payload") or {}
    boxes = [b for b in payload.get("boxes") or [] if b.get("box_px")]
    if boxes:
        from medlens.results.sr import _polyline

        image, frame = _boxed_image(envelope, series)
        for box in boxes:
            line = _polyline(box["box_px"], payload.get("image_size"), image)
            edges = [float(line[0][0]), float(line[0][1]), float(line[2][0]), float(line[2][1])]
            image_note = f"SOP Instance {image.SOPInstanceUID}" + (
                f", frame {int(frame) + 1}" if frame is not None else ""
            )
            components = [
                {
                    "code": {"text": part},
                    "valueQuantity": {"value": v, "unit": "pixel", "system": "http://unitsofmeasure.org", "code": "1"},
                }
                for part, v in zip(BOX_PARTS, edges, strict=True)
            ]
            entries.append(
                _observation(
                    REGION_CODE,
                    study,
                    disclaimer,
                    bodySite={"text": str(box.get("label") or "unlabelled box")},
                    valueString=str(box.get("label") or "unlabelled box"),
                    component=components,
                    note=[{"text": image_note}, {"text": disclaimer}],
                )
            )
    if sr_uid:
        for entry in entries:
            entry["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"}]
    urls = [_urn() for _ in entries]
    report = {
        "resourceType": "DiagnosticReport",
        "status": "preliminary",
        "code": {"coding": [REPORT_CODE], "text": f"medlens {envelope.get('task') or 'qa'} result"},
        "imagingStudy": [study],
        "result": [{"reference": u} for u in urls],
        "conclusion": f"{answer or '(no answer)'}\n\n{disclaimer}",
    }
    if sr_uid:
        report["identifier"] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{sr_uid}"}]
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"fullUrl": _urn(), "resource": report}]
        + [{"fullUrl": u, "resource": e} for u, e in zip(urls, entries, strict=True)],
    }
    validate_fhir(bundle)
    return bundle


def validate_fhir(bundle: Mapping[str, Any]) -> None:
    """Raise ``pydantic.ValidationError`` unless ``bundle`` and each resource in it are valid FHIR R4(B)."""
    from fhir.resources.R4B import get_fhir_model_class

    get_fhir_model_class("Bundle").model_validate(dict(bundle))
    for entry in bundle.get("entry") or []:
        resource = entry["resource"]
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
