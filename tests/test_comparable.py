"""compare refuses inputs that are not comparable (patient, view, body part) and says what it could not check."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from dicom_factory import write_radiograph
from PIL import Image

from medlens.api import ask
from medlens.errors import InputError
from medlens.privacy import short_hash


def _cxr(path, date, patient="P-0001", **header):
    arr = np.tile(np.linspace(0, 1000, 64).astype(np.uint16), (48, 1))
    extra = {"StudyDate": date, "ContentDate": date, "AcquisitionDate": date, "AcquisitionTime": "093000"}
    write_radiograph(path, arr, modality="CR", extra=extra)
    ds = pydicom.dcmread(path)
    ds.PatientID = patient
    for key, value in header.items():
        setattr(ds, key, value)
    ds.save_as(path)
    return path


def test_same_patient_compares(tmp_path, cli):
    a, b = _cxr(tmp_path / "a.dcm", "20230101"), _cxr(tmp_path / "b.dcm", "20240101")
    code, out, err = cli("ask", a, b, "--task", "compare", "-q")
    assert code == 0, err
    warnings = " ".join(json.loads(out)["warnings"])
    assert "PatientID" not in warnings and "not checked" not in warnings


def test_different_patient_is_refused_without_raw_ids(tmp_path, cli):
    a = _cxr(tmp_path / "a.dcm", "20230101", patient="ALICE-123")
    b = _cxr(tmp_path / "b.dcm", "20240101", patient="BOB-456")
    code, _, err = cli("ask", a, b, "--task", "compare")
    assert code == 2 and "Traceback" not in err
    assert str(a) in err and str(b) in err and "PatientID differs" in err
    assert short_hash("ALICE-123") in err and "ALICE" not in err and "BOB" not in err
    with pytest.raises(InputError, match="PatientID differs"):
        ask([a, b], None, task="compare")


def test_allow_different_patients_warns(tmp_path, cli):
    a = _cxr(tmp_path / "a.dcm", "20230101", patient="ALICE-123")
    b = _cxr(tmp_path / "b.dcm", "20240101", patient="BOB-456")
    code, out, err = cli("ask", a, b, "--task", "compare", "--allow-different-patients", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert "ALICE" not in out and "BOB" not in out
    assert any("PatientID differs" in w for w in result["warnings"])


def test_issuer_difference_is_named(tmp_path):
    a = _cxr(tmp_path / "a.dcm", "20230101", IssuerOfPatientID="HOSP-A")
    b = _cxr(tmp_path / "b.dcm", "20240101", IssuerOfPatientID="HOSP-B")
    with pytest.raises(InputError, match="IssuerOfPatientID differs"):
        ask([a, b], None, task="compare")


@pytest.mark.parametrize(
    ("header", "field"),
    [({"ViewPosition": "LL"}, "ViewPosition"), ({"BodyPartExamined": "ABDOMEN"}, "BodyPartExamined")],
)
def test_different_view_or_body_part_is_refused(tmp_path, cli, header, field):
    a, b = _cxr(tmp_path / "a.dcm", "20230101"), _cxr(tmp_path / "b.dcm", "20240101", **header)
    code, _, err = cli("ask", a, b, "--task", "compare")
    assert code == 2 and f"{field} differs" in err and str(a) in err and str(b) in err


def test_ap_vs_pa_is_a_warning(tmp_path):
    a, b = _cxr(tmp_path / "a.dcm", "20230101"), _cxr(tmp_path / "b.dcm", "20240101", ViewPosition="AP")
    result = ask([a, b], None, task="compare")
    assert any("ViewPosition (PA vs AP)" in w for w in result["warnings"])


def test_png_inputs_warn_what_was_not_checked(tmp_path, cli):
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((64, 64), 100, np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    code, out, err = cli("ask", *paths, "--task", "compare", "-q")
    assert code == 0, err
    assert any("could not be checked" in w for w in json.loads(out)["warnings"])
