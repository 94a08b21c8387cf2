"""FHIR R4 out (medlens.results.fhir_out): DiagnosticReport + Observations, validated with fhir.resources."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pydicom
import pytest
from dicom_factory import write_radiograph, write_series
from medlens_server import LOCALIZE_ANSWER
from scripted import ScriptedBackend

from medlens import DISCLAIMER
from medlens.results import build_fhir, validate_fhir
from medlens.tasks import get_task
from medlens.tasks.runner import run_task


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    write_series(folder, [np.full((32, 32), 1000 + i, np.uint16) for i in range(5)])
    return folder


@pytest.fixture(scope="module")
def cxr(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cxr") / "cxr.dcm"
    return write_radiograph(path, (np.arange(240 * 320).reshape(240, 320) % 4000).astype(np.uint16))


def _resources(bundle: dict) -> tuple[dict, list[dict]]:
    report, *observations = (e["resource"] for e in bundle["entry"])
    return report, observations


def _study_uid(source: Path) -> str:
    first = source if source.is_file() else sorted(source.glob("*.dcm"))[0]
    return pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID


def test_yes_no_answer_report(ct: Path):
    envelope = run_task(get_task("qa"), [ct], "Is there a nodule?", ScriptedBackend("Final Answer: no")).model_dump()
    bundle = build_fhir(envelope, [ct], question="Is there a nodule?")
    validate_fhir(bundle)
    report, (observation,) = _resources(bundle)
    assert report["resourceType"] == "DiagnosticReport" and report["status"] == "preliminary"
    assert report["conclusion"].startswith(envelope["answer"]) and DISCLAIMER in report["conclusion"]
    study = f"urn:oid:{_study_uid(ct)}"
    assert report["imagingStudy"][0]["identifier"]["value"] == study
    assert observation["derivedFrom"][0]["identifier"]["value"] == study
    assert observation["valueCodeableConcept"]["coding"][0]["code"] == "373067005"  # SCT No
    assert {"text": "Question: Is there a nodule?"} in observation["note"]
    assert report["result"] == [{"reference": bundle["entry"][1]["fullUrl"]}]


def test_free_answer_is_a_string_value(ct: Path):
    answer = "Normal appearance of the lungs."
    envelope = run_task(get_task("qa"), [ct], "Describe the lungs.", ScriptedBackend(answer)).model_dump()
    _, (observation,) = _resources(build_fhir(envelope, [ct]))
    assert observation["valueString"] == answer
    assert "valueCodeableConcept" not in observation


def test_boxes_are_observations_with_body_site_and_pixel_edges(cxr: Path):
    envelope = run_task(get_task("localize"), [cxr], None, ScriptedBackend(LOCALIZE_ANSWER)).model_dump()
    report, observations = _resources(build_fhir(envelope, [cxr], sr_uid="1.2.3.4"))
    boxes = envelope["payload"]["boxes"]
    assert len(observations) == 1 + len(boxes)
    sop = pydicom.dcmread(cxr, stop_before_pixels=True).SOPInstanceUID
    for observation, box in zip(observations[1:], boxes, strict=True):
        assert observation["bodySite"]["text"] == box["label"]
        assert [c["valueQuantity"]["value"] for c in observation["component"]] == [float(v) for v in box["box_px"]]
        assert any(sop in n["text"] for n in observation["note"])
        assert observation["identifier"][0]["value"] == "urn:oid:1.2.3.4"
    assert report["identifier"][0]["value"] == "urn:oid:1.2.3.4"


def test_validation_rejects_a_broken_bundle(cxr: Path):
    envelope = run_task(get_task("localize"), [cxr], None, ScriptedBackend(LOCALIZE_ANSWER)).model_dump()
    bundle = build_fhir(envelope, [cxr])
    del bundle["entry"][0]["resource"]["code"]  # DiagnosticReport.code is required (1..1)
    with pytest.raises(pydantic.ValidationError):
        validate_fhir(bundle)
    bundle = build_fhir(envelope, [cxr])
    bundle["entry"][1]["resource"]["valueString"] = {"not": "a string"}
    with pytest.raises(pydantic.ValidationError):
        validate_fhir(bundle)
