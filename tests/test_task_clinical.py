"""compare, report and differential tasks; the task runner, envelope and CLI plumbing."""

from __future__ import annotations

import hashlib
import io
import json
import re

import numpy as np
import pytest
from dicom_factory import write_radiograph
from scripted import ScriptedBackend

from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.files import sha256_of
from medlens.tasks import TASKS, TaskOption, TaskOptions, get_task, task_class
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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _declared_options() -> dict[str, tuple[TaskOption, list[str]]]:
    """Every option the tasks declare, with the tasks that declare it."""
    found: dict[str, tuple[TaskOption, list[str]]] = {}
    for name in TASKS:
        for decl in task_class(name).options:
            found.setdefault(decl.name, (decl, []))[1].append(name)
    return found


def test_task_options_are_the_cli_options(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # wide enough that rich shows every flag whole
    assert {"recipe", "series", "overlay", "dpi", "token_budget", "reasoner"} <= set(TaskOptions.__dataclass_fields__)
    declared = _declared_options()
    assert {"overlay", "dpi", "token_budget", "reasoner"} <= set(declared)
    import typer

    from medlens.cli import app

    ask = typer.main.get_command(app).commands["ask"]
    params = {p.name: p for p in ask.params}
    code, help_text, err = cli("ask", "--help")
    assert code == 0, err
    for name, (decl, users) in declared.items():
        param = params[name]
        assert param.opts == [_flag(name)] and param.default is None, name  # unset unless given
        assert param.help.startswith(f"{', '.join(users)}: {decl.help}"), name
        if decl.default is not None:
            assert param.help.endswith(f"(default {decl.default})"), name
        assert re.search(rf"(?<![\w-]){re.escape(_flag(name))}(?![\w-])", help_text), name


def _lab_pdf(path):
    from fpdf import FPDF

    pdf = FPDF(format=(60, 40))
    pdf.add_page()
    pdf.set_font("helvetica", size=8)
    pdf.cell(text="Haemoglobin 13.5 g/dL (12.0-16.0)")
    pdf.output(str(path))
    return path


def _note(path):
    path.write_text("2024-03-05 Patient seen for cough. Chest radiograph: small left pleural effusion.\n")
    return path


#: a value other than the default for each declared option
#: a value for each declared option (None: a flag that takes no value)
OTHER_VALUES = {
    "dpi": "200",
    "token_budget": "300",
    "overlay": "{tmp}/boxes.png",
    "reasoner": "test-tiny",
    "allow_different_patients": None,
}


def test_other_values_cover_every_declared_option():
    assert set(OTHER_VALUES) == set(_declared_options())


@pytest.mark.parametrize(
    ("name", "task", "make_input", "question", "expected"),
    [
        pytest.param("dpi", "lab-extract", lambda tmp: _lab_pdf(tmp / "report.pdf"), [], 200, id="dpi"),
        pytest.param(
            "token_budget", "ehr-qa", lambda tmp: _note(tmp / "notes.txt"), ["What was found?"], 300, id="token_budget"
        ),
    ],
)
def test_a_task_option_reaches_its_task(tmp_path, cli, name, task, make_input, question, expected):
    """The flag's value is what the task ran with (the envelope's details say it), the default without it."""
    path = make_input(tmp_path)
    args = ["ask", path, *question, "--task", task, "--model", "test-tiny", "--max-new-tokens", "2", "-q"]
    code, out, err = cli(*args)
    assert code == 0, err
    assert json.loads(out)["details"][name] == _declared_options()[name][0].default != expected
    code, out, err = cli(*args, _flag(name), OTHER_VALUES[name])
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == task and result["details"][name] == expected


@pytest.mark.parametrize("name", list(OTHER_VALUES))
def test_another_tasks_option_exits_2_naming_the_flag(tmp_path, cli, name):
    users = _declared_options()[name][1]
    other = next(task for task in ("qa", "report", "compare") if task not in users)
    path = _cxr(tmp_path / "a.dcm", "20240101")
    value = OTHER_VALUES[name]
    given = [_flag(name)] if value is None else [_flag(name), value.format(tmp=tmp_path)]
    code, out, err = cli("ask", path, "Is it normal?", "--task", other, *given, "-q")
    assert code == 2 and out == ""
    assert err == f"medlens: error: {_flag(name)} is an option of {', '.join(users)}, not of task {other}\n"
    assert not (tmp_path / "boxes.png").exists()


def test_declared_option_bounds_are_enforced(tmp_path, cli):
    path = _lab_pdf(tmp_path / "report.pdf")
    for value in ("49", "601"):
        code, _, err = cli("ask", path, "--task", "lab-extract", "--dpi", value, "-q")
        assert code == 2 and "--dpi" in err
    code, _, err = cli("ask", _note(tmp_path / "n.txt"), "Q?", "--task", "ehr-qa", "--token-budget", "199", "-q")
    assert code == 2 and "--token-budget" in err
