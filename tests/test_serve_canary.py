"""PHI canary: a DICOM study and a FHIR bundle whose every identifying field is a unique string go through
analyze, a job and a stream at DEBUG log level; no log record, job record or file left under the data dir
holds any of them (hashed UIDs are fine)."""

from __future__ import annotations

import io
import json
import logging
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
from dicom_factory import write_series
from fastapi.testclient import TestClient

from medlens.serve.app import create_app
from medlens.serve.observe import JsonLines
from medlens.serve.settings import ServeSettings

TAG = "QZXCANARY"
STUDY_UID = "1.2.826.0.1.3680043.8.498.77123456789012345678901"
SERIES_UID = "1.2.826.0.1.3680043.8.498.77123456789012345678902"
DICOM_PHI = {
    "PatientName": f"{TAG}FAMILY^{TAG}GIVEN",
    "PatientID": f"{TAG}PID",
    "PatientBirthDate": "19230417",
    "OtherPatientIDs": f"{TAG}OTHERID",
    "PatientAddress": f"{TAG} Street 1",
    "PatientTelephoneNumbers": f"{TAG}PHONE",
    "PatientComments": f"{TAG}COMMENT",
    "InstitutionName": f"{TAG}HOSPITAL",
    "InstitutionAddress": f"{TAG}HOSPITALADDR",
    "ReferringPhysicianName": f"{TAG}REFERRER",
    "PerformingPhysicianName": f"{TAG}PERFORMER",
    "OperatorsName": f"{TAG}OPERATOR",
    "AccessionNumber": f"{TAG}ACC",
    "StudyID": "QZX42",
    "StudyDescription": f"{TAG}STUDYDESC",
    "SeriesDescription": f"{TAG}SERIESDESC",
    "DeviceSerialNumber": f"{TAG}SERIAL",
    "ImageComments": f"{TAG}IMAGECOMMENT",
}
FHIR_PHI = [f"{TAG}FHIRFAMILY", f"{TAG}FHIRGIVEN", "1931-02-27", f"{TAG}MRN", f"{TAG}LINE", f"{TAG}CITY", f"{TAG}TEL"]
CANARIES = [
    *[v for v in DICOM_PHI.values() if v != DICOM_PHI["PatientName"]],
    f"{TAG}FAMILY",
    f"{TAG}GIVEN",
    "1923-04-17",
    STUDY_UID,
    SERIES_UID,
    *FHIR_PHI,
    "19310227",
]


def bundle() -> dict:
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:mrn", "value": f"{TAG}MRN"}],
        "name": [{"family": f"{TAG}FHIRFAMILY", "given": [f"{TAG}FHIRGIVEN"]}],
        "telecom": [{"system": "phone", "value": f"{TAG}TEL"}],
        "gender": "female",
        "birthDate": "1931-02-27",
        "address": [{"line": [f"{TAG}LINE"], "city": f"{TAG}CITY"}],
    }
    a1c = {
        "resourceType": "Observation",
        "id": "o1",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}]},
        "subject": {"reference": "Patient/p1"},
        "effectiveDateTime": "2020-05-01",
        "valueQuantity": {"value": 7.1, "unit": "%"},
    }
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in (patient, a1c)]}


@pytest.fixture
def study(tmp_path) -> list[tuple[str, tuple[str, bytes, str]]]:
    arrays = [np.full((40, 40), 30 * i, np.int16) for i in range(3)]
    paths = write_series(tmp_path / "ct", arrays, study_uid=STUDY_UID, series_uid=SERIES_UID, extra=DICOM_PHI)
    return [("files", (f"ct/{p.name}", p.read_bytes(), "application/dicom")) for p in paths]


def test_no_phi_in_logs_job_records_or_left_files(tiny_backend, tmp_path, study, caplog):
    import pydicom

    header = pydicom.dcmread(io.BytesIO(study[0][1][1]))
    assert all(str(header.get(k)) == v for k, v in DICOM_PHI.items() if k != "PatientName")  # the canaries are in
    caplog.set_level(logging.DEBUG)
    data_dir = tmp_path / "data"
    app = create_app(ServeSettings(data_dir=data_dir, max_new_tokens=8), backend=tiny_backend)
    fhir = [("files", ("record.json", json.dumps(bundle()).encode(), "application/json"))]
    ask = {"question": "Is there a nodule?", "return_images": "true"}
    with TestClient(app) as client:
        assert client.post("/v1/analyze", files=study, data=ask).status_code == 200
        ehr = client.post("/v1/analyze", files=fhir, data={"task": "ehr-qa", "question": "Latest HbA1c?"})
        assert ehr.status_code == 200, ehr.text
        with client.stream("POST", "/v1/analyze/stream", files=study, data=ask) as response:
            assert "event: result" in "".join(response.iter_text())
        ids = [client.post("/v1/jobs", files=study, data=ask).json()["id"]]
        ids.append(client.post("/v1/jobs", files=fhir, data={"task": "ehr-qa", "question": "HbA1c?"}).json()["id"])
        for job_id in ids:
            end = time.monotonic() + 30
            while client.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
                assert time.monotonic() < end
                time.sleep(0.05)
            assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        client.get("/v1/jobs")
        client.get("/metrics")
    formatter = JsonLines()
    texts = [f"{formatter.format(r)}\n{r.getMessage()}\n{r.__dict__!r}" for r in caplog.records]
    assert any('"route": "/v1/analyze"' in t for t in texts)  # the request lines were captured
    assert any('"series": ' in t for t in texts)  # with the hashed series tag
    files = [p for p in data_dir.rglob("*") if p.is_file()]
    assert any(p.name.startswith("jobs.sqlite3") for p in files)
    assert not [p for p in (data_dir / "tmp").rglob("*")]  # every upload folder is gone
    blobs = {str(p): p.read_bytes().decode("latin-1") for p in files}
    hits = [
        (canary, where)
        for canary in CANARIES
        for where, text in [*(("log", t) for t in texts), *blobs.items()]
        if canary.lower() in text.lower()
    ]
    assert hits == []
