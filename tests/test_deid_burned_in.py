"""Images that may carry burned-in text (PDF pages; DICOM with BurnedInAnnotation YES, or without it for US, SC,
XA, ES) are refused for a remote engine or a remote ``ask --server`` unless ``--allow-burned-in``: a recording
loopback server made remote (MEDLENS_TREAT_AS_REMOTE=1) receives nothing when refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_series
from test_deid_remote import recorder  # noqa: F401  (the fixture)
from test_task_clinical import _lab_pdf

from medlens.backends import load_backend
from medlens.tasks import TaskOptions, get_task
from medlens.tasks.runner import ALLOW_BURNED_IN, BurnedInTextError, run_task


def _series(folder: Path, modality: str = "CT", burned_in: str | None = None) -> Path:
    extra = {"BurnedInAnnotation": burned_in} if burned_in else None
    write_series(
        folder, [np.full((16, 16), v, np.uint16) for v in (10, 20, 30, 40, 50)], modality=modality, extra=extra
    )
    return folder


@pytest.mark.parametrize(
    ("modality", "flag", "reason"),
    [("CT", "YES", "BurnedInAnnotation is YES"), ("US", None, "modality US without BurnedInAnnotation")],
)
def test_remote_engine_refuses_burned_in_dicom_and_sends_nothing(
    recorder, tmp_path, cli, monkeypatch, modality, flag, reason
):
    study = _series(tmp_path / "study", modality, flag)
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    model = f"openai:medgemma@{recorder.url}"
    code, out, err = cli("ask", study, "Is it normal?", "--model", model, "-q")
    assert code == 2 and out == ""
    assert reason in err and "--allow-burned-in" in err and str(study) in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert recorder.bodies == []  # nothing was sent
    code, out, err = cli("ask", study, "Is it normal?", "--model", model, "-q", "--allow-burned-in")
    assert code == 0, err
    assert len(recorder.bodies) == 1 and b"image_url" in recorder.bodies[0]
    warnings = json.loads(out)["warnings"]
    assert any("burned-in text" in w and reason in w for w in warnings)


def test_lab_pdf_to_a_remote_engine_is_refused(recorder, tmp_path, monkeypatch):
    pdf = _lab_pdf(tmp_path / "labs.pdf")
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    backend = load_backend(f"openai:medgemma@{recorder.url}")
    with pytest.raises(BurnedInTextError, match="a PDF page") as info:
        run_task(get_task("lab-extract"), [pdf], None, backend)
    assert info.value.path == str(pdf)
    assert recorder.bodies == []
    envelope = run_task(get_task("lab-extract"), [pdf], None, backend, TaskOptions(extra={ALLOW_BURNED_IN: True}))
    assert len(recorder.bodies) == 1 and any("a PDF page" in w for w in envelope.warnings)


def test_local_engine_and_clean_images_go_without_a_word(recorder, tmp_path, monkeypatch):
    """A loopback server is local: burned-in images go to it; a CT that says NO goes to a remote one."""
    burned = _series(tmp_path / "us", "US")
    clean = _series(tmp_path / "ct", "CT", "NO")
    envelope = run_task(get_task("qa"), [burned], "Is it normal?", load_backend(f"openai:medgemma@{recorder.url}"))
    assert not any("burned-in" in w for w in envelope.warnings)
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    envelope = run_task(get_task("qa"), [clean], "Is it normal?", load_backend(f"openai:medgemma@{recorder.url}"))
    assert len(recorder.bodies) == 2 and not any("burned-in" in w for w in envelope.warnings)


def test_only_the_series_sent_counts(tmp_path, monkeypatch):
    """A study with a clean CT series and a burned-in secondary capture: the CT asked about is not refused."""
    from medlens.io.burned_in import burned_in_inputs
    from medlens.privacy import short_hash

    _series(tmp_path / "study" / "ct", "CT", "NO")
    sc = _series(tmp_path / "study" / "sc", "OT", "YES")
    ct_uid = pydicom.dcmread(next((tmp_path / "study" / "ct").glob("*.dcm"))).SeriesInstanceUID
    sc_uid = pydicom.dcmread(next(sc.glob("*.dcm"))).SeriesInstanceUID
    study = tmp_path / "study"
    assert burned_in_inputs([study], short_hash(str(ct_uid))) == []
    assert burned_in_inputs([study], short_hash(str(sc_uid))) == [(str(study), "BurnedInAnnotation is YES")]
    assert burned_in_inputs([study]) == [(str(study), "BurnedInAnnotation is YES")]


def test_ask_server_to_a_remote_medlens_refuses_before_connecting(recorder, tmp_path, cli, monkeypatch):
    """``ask --server``: the check runs before any upload (the recorder stands in for the server)."""
    study = _series(tmp_path / "us", "US")
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    url = recorder.url.removesuffix("/v1")
    code, _, err = cli("ask", study, "Is it normal?", "--server", url, "-q")
    assert code == 2 and "the server is not on this machine" in err and "--allow-burned-in" in err
    assert recorder.bodies == []
