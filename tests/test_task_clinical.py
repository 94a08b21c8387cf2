"""compare, report and differential tasks; the task runner, envelope and CLI plumbing."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
from dicom_factory import write_radiograph
from scripted import ScriptedBackend

from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.files import sha256_of
from medlens.tasks import TASKS, TaskOptions, get_task
from medlens.tasks.compare import parse_progression
from medlens.tasks.report import split_sections
from medlens.tasks.runner import run_task


def _cxr(path, date, value=1000):
    arr = np.tile(np.linspace(0, value, 64).astype(np.uint16), (48, 1))
    extra = {"StudyDate": date, "ContentDate": date, "AcquisitionDate": date, "AcquisitionTime": "093000"}
    return write_radiograph(path, arr, modality="CR", extra=extra)


# --- compare ---


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("Final Answer: improved", "improved"),
        ("The effusion is smaller.\nFinal Answer: Worsened", "worsened"),
        ("**Final answer:** stable", "stable"),
        ("<unused94>thought\nmaybe worse<unused95>Final Answer: unchanged", "stable"),
        ("The opacity has resolved.", "improved"),
        ("Improved on the left but worsened on the right.", None),
        ("I cannot tell.", None),
    ],
)
def test_progression_parser(text, label):
    from medlens.prompts import split_thinking

    assert parse_progression(split_thinking(text).answer) == label


def test_compare_orders_by_date_and_says_so(tmp_path):
    prior, current = _cxr(tmp_path / "a.dcm", "20230101"), _cxr(tmp_path / "b.dcm", "20240606", 2000)
    backend = ScriptedBackend("Final Answer: worsened")
    envelope = run_task(get_task("compare"), [current, prior], None, backend)
    assert envelope.payload["progression"] == "worsened" and envelope.final_answer == "worsened"
    assert envelope.payload["reordered"] is True
    assert envelope.payload["prior"]["file"] == str(prior) and envelope.payload["prior"]["acquired"].startswith("2023")
    assert any("reordered by acquisition date: prior 2023-01-01, current 2024-06-06" in w for w in envelope.warnings)
    (request,) = backend.requests
    parts = request.messages[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert "Final Answer: improved" in parts[2]["text"]


def test_compare_on_the_real_radiograph_end_to_end(pydicom_file, cli):
    path = pydicom_file("RG1_UNCR.dcm")
    code, out, err = cli("ask", path, path, "--task", "compare", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "compare" and result["n_images"] == 2 and result["untrained_test_model"]
    assert (result["payload"] is not None) or ("could not parse" in " ".join(result["warnings"]))


def test_compare_refuses_volumes_and_wrong_counts(tmp_path, cli):
    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(png)
    code, _, err = cli("ask", tmp_path / "ct", png, "--task", "compare")
    assert code == 2 and "one image per input" in err
    code, _, err = cli("ask", png, "--task", "compare")
    assert code == 2 and "takes 2 input(s), got 1" in err


# --- report ---


@pytest.mark.parametrize(
    ("text", "findings", "impression"),
    [
        ("FINDINGS: Clear lungs.\nIMPRESSION: Normal.", "Clear lungs.", "Normal."),
        ("**Findings:**\nSmall left effusion.\n\n**Impression:**\nEffusion.", "Small left effusion.", "Effusion."),
        ("## Findings\nA nodule.\n## Conclusion\nNodule, follow up.", "A nodule.", "Nodule, follow up."),
        ("Technique: PA.\nFindings: none\nImpression: normal chest", "none", "normal chest"),
    ],
)
def test_report_sections(text, findings, impression):
    sections = split_sections(text)
    assert sections["findings"] == findings and sections["impression"] == impression


def test_report_without_headers_and_empty():
    task = get_task("report")
    parsed = task.parse("The heart is normal in size.", {})
    assert parsed.payload["findings"] == "The heart is normal in size." and parsed.payload["impression"] is None
    assert parsed.warnings
    from medlens.tasks.runner import parse_output

    assert parse_output(task, "<unused94>thought only", {}).error == "the model wrote no report"


def test_report_on_a_ct_volume_end_to_end(tmp_path, cli):
    hu, _ = ct_phantom(n_slices=12, size=48)
    write_ct_series(hu, tmp_path / "ct")
    code, out, err = cli("ask", tmp_path / "ct", "--task", "report", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "report" and result["n_images"] == 12 and result["details"]["modality"] == "CT"


# --- differential (two stages) ---

FINDINGS = json.dumps(
    [
        {"finding": "hypodense liver lesion", "location": "right lobe", "severity": "Moderate", "confidence": 0.8},
        {"finding": "", "location": None},
        {"finding": "small left pleural effusion", "severity": "unknown"},
    ]
)
DIFFERENTIAL = (
    "```json\n"
    + json.dumps(
        [
            {"rank": 2, "diagnosis": "hepatic cyst", "likelihood": "medium", "supporting_findings": [1]},
            {"rank": 1, "diagnosis": "metastasis", "likelihood": "High", "supporting_findings": [1, 2, 7]},
        ]
    )
    + "\n```"
)


def test_differential_two_stages_with_scripted_models(tmp_path):
    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    backend = ScriptedBackend(f"Here are the findings:\n{FINDINGS}", DIFFERENTIAL)
    envelope = run_task(get_task("differential"), [tmp_path / "ct"], "Weight loss.", backend)
    assert envelope.parse_error is None
    findings = envelope.payload["findings"]
    assert [f["finding"] for f in findings] == ["hypodense liver lesion", "small left pleural effusion"]
    assert findings[0]["severity"] == "moderate" and findings[1]["severity"] is None
    ranked = envelope.payload["differential"]
    assert [d["diagnosis"] for d in ranked] == ["metastasis", "hepatic cyst"]
    assert ranked[0]["supporting_findings"] == [1, 2] and envelope.final_answer == "metastasis"
    assert any("do not exist" in w for w in envelope.warnings) and any(
        "dropped an invalid" in w for w in envelope.warnings
    )
    assert len(envelope.raw_output) == 2 and envelope.details["stages"][1]["stage"] == 2
    stage2 = backend.requests[1].messages[0]["content"]
    assert [p["type"] for p in stage2] == ["text"]
    assert "1. hypodense liver lesion; location: right lobe; severity: moderate" in stage2[0]["text"]
    assert "Weight loss." in stage2[0]["text"]
    assert envelope.prompt_tokens == 20 and envelope.completion_tokens == 10


def test_differential_stage_two_failure_is_reported(tmp_path):
    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    envelope = run_task(get_task("differential"), [tmp_path / "ct"], None, ScriptedBackend(FINDINGS, "no idea"))
    assert envelope.parse_error == "stage 2: no JSON found in the model output"
    assert len(envelope.payload["findings"]) == 2 and envelope.payload["differential"] == []


def test_differential_with_test_tiny_reports_the_failed_first_stage(tmp_path, cli):
    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    code, out, err = cli("ask", tmp_path / "ct", "--task", "differential", "--reasoner", "test-tiny", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "differential" and result["raw_output"]
    assert result["parse_error"] or result["payload"]


# --- runner, envelope, CLI ---


def test_envelope_hashes_inputs(tmp_path):
    path = _cxr(tmp_path / "a.dcm", "20240101")
    envelope = run_task(
        get_task("qa"), [path], "Is it normal? Final Answer: yes or no.", ScriptedBackend("Final Answer: no")
    )
    assert envelope.inputs[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert envelope.final_answer == "no" and envelope.payload == {"answer": "Final Answer: no", "final_answer": "no"}
    assert envelope.disclaimer.startswith("Research use only")
    assert sha256_of(tmp_path) == sha256_of(tmp_path) and len(sha256_of(tmp_path)) == 64


def test_cli_task_errors_and_listing(tmp_path, cli):
    path = _cxr(tmp_path / "a.dcm", "20240101")
    code, _, err = cli("ask", path, "--task", "reprot")
    assert code == 2 and "did you mean 'report'" in err
    code, _, err = cli("ask", path)
    assert code == 2 and "task qa needs a question" in err
    code, out, _ = cli("tasks")
    assert code == 0 and all(name in out for name in TASKS)


def test_parse_command_reads_stdin(monkeypatch, cli):
    monkeypatch.setattr("sys.stdin", io.StringIO("Compared with before...\nFinal Answer: stable\n"))
    code, out, _ = cli("parse", "compare")
    result = json.loads(out)
    assert code == 0 and result["final_answer"] == "stable" and result["payload"]["progression"] == "stable"
    monkeypatch.setattr("sys.stdin", io.StringIO("FINDINGS: ok\nIMPRESSION: fine"))
    code, out, _ = cli("parse", "report")
    assert json.loads(out)["payload"]["impression"] == "fine"


def test_task_options_are_the_cli_options():
    assert {"recipe", "series", "overlay", "dpi", "token_budget", "reasoner"} <= set(TaskOptions.__dataclass_fields__)
