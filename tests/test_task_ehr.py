"""ehr-qa: FHIR R4 bundles and plain-text notes -> a dated, budgeted summary; errors; the CLI end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from medlens.errors import CorruptFileError, NotFoundError, UnsupportedInputError
from medlens.io.fhir import read_clinical
from medlens.prompts import THINKING_INSTRUCTION
from medlens.tasks import TaskOptions, get_task
from medlens.tasks.ehr import EhrQuestionTask, estimate_tokens

QUESTION = 'Is the diabetes controlled? Answer with "Final Answer: yes" or "Final Answer: no".'
PHI = ["Zebulon", "Quixote", "742 Evergreen", "Springfield", "MRN-55501", "555-0199", "zq@example.org", "1948-07-14"]

LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
V3_INTERP = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
COND_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"


def concept(text: str, code: str = "0", system: str = SNOMED) -> dict:
    return {"coding": [{"system": system, "code": code, "display": text}]}


def status(code: str, system: str) -> dict:
    return {"coding": [{"system": system, "code": code}]}


def qty(value: float, unit: str) -> dict:
    return {"value": value, "unit": unit, "system": "http://unitsofmeasure.org", "code": unit}


def patient() -> dict:
    return {
        "resourceType": "Patient",
        "id": "pat1",
        "identifier": [{"system": "urn:mrn", "value": "MRN-55501"}],
        "name": [{"family": "Quixote", "given": ["Zebulon"]}],
        "telecom": [{"system": "phone", "value": "555-0199"}, {"system": "email", "value": "zq@example.org"}],
        "gender": "male",
        "birthDate": "1948-07-14",
        "address": [{"line": ["742 Evergreen Terrace"], "city": "Springfield"}],
    }


def encounter(i: int, day: str) -> dict:
    return {
        "resourceType": "Encounter",
        "id": f"enc{i}",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [concept("Diabetes follow-up")],
        "subject": {"reference": "Patient/pat1"},
        "period": {"start": f"{day}T09:00:00+01:00", "end": f"{day}T09:30:00+01:00"},
    }


def hba1c(i: int, day: str, value: float, flag: str | None) -> dict:
    obs = {
        "resourceType": "Observation",
        "id": f"a1c{i}",
        "status": "final",
        "code": concept("Hemoglobin A1c", "4548-4", LOINC),
        "subject": {"reference": "Patient/pat1"},
        "effectiveDateTime": day,
        "valueQuantity": qty(value, "%"),
        "referenceRange": [{"high": qty(5.7, "%")}],
    }
    if flag:
        obs["interpretation"] = [status(flag, V3_INTERP)]
    return obs


def bundle_dict() -> dict:
    """A male patient born 1948: diabetes since 2012, yearly visits 2014-2019, BP, meds, allergy, ..."""
    bp = {
        "resourceType": "Observation",
        "id": "bp1",
        "status": "final",
        "code": concept("Blood pressure panel", "85354-9", LOINC),
        "subject": {"reference": "Patient/pat1"},
        "effectiveDateTime": "2019-06-03",
        "component": [
            {
                "code": concept("Systolic blood pressure", "8480-6", LOINC),
                "valueQuantity": qty(148, "mm[Hg]"),
                "interpretation": [status("H", V3_INTERP)],
            },
            {"code": concept("Diastolic blood pressure", "8462-4", LOINC), "valueQuantity": qty(88, "mm[Hg]")},
        ],
    }
    resources = [
        patient(),
        {"resourceType": "Basic", "id": "b1", "code": {"text": "custom thing"}},
        {
            "resourceType": "Condition",
            "id": "dm",
            "clinicalStatus": status("active", COND_CLINICAL),
            "code": concept("Type 2 diabetes mellitus", "44054006"),
            "subject": {"reference": "Patient/pat1"},
            "onsetDateTime": "2012-03-01",
        },
        {
            "resourceType": "Condition",
            "id": "flu",
            "clinicalStatus": status("resolved", COND_CLINICAL),
            "code": concept("Influenza", "6142004"),
            "subject": {"reference": "Patient/pat1"},
            "onsetDateTime": "2013-01-10",
            "abatementDateTime": "2013-01-20",
        },
        {
            "resourceType": "AllergyIntolerance",
            "id": "al1",
            "clinicalStatus": status("active", ALLERGY_CLINICAL),
            "category": ["medication"],
            "criticality": "high",
            "code": concept("Penicillin", "764146007"),
            "patient": {"reference": "Patient/pat1"},
            "recordedDate": "2011-05-05",
            "reaction": [{"manifestation": [concept("Anaphylaxis", "39579001")], "severity": "severe"}],
        },
        {"resourceType": "Medication", "id": "met", "code": concept("Metformin 500 mg oral tablet", "860975")},
        {
            "resourceType": "MedicationRequest",
            "id": "mr1",
            "status": "active",
            "intent": "order",
            "medicationReference": {"reference": "Medication/met"},
            "subject": {"reference": "Patient/pat1"},
            "authoredOn": "2012-03-02",
            "dosageInstruction": [
                {
                    "timing": {"repeat": {"frequency": 2, "period": 1, "periodUnit": "d"}},
                    "route": concept("Oral", "26643006"),
                    "doseAndRate": [{"doseQuantity": qty(1, "tablet")}],
                }
            ],
        },
        {
            "resourceType": "MedicationStatement",
            "id": "ms1",
            "status": "completed",
            "medicationCodeableConcept": concept("Oseltamivir 75 mg", "1"),
            "subject": {"reference": "Patient/pat1"},
            "effectivePeriod": {"start": "2013-01-10", "end": "2013-01-15"},
        },
        {
            "resourceType": "Procedure",
            "id": "pr1",
            "status": "completed",
            "code": concept("Retinal examination", "1"),
            "subject": {"reference": "Patient/pat1"},
            "performedDateTime": "2016-04-04",
        },
        {
            "resourceType": "Immunization",
            "id": "im1",
            "status": "completed",
            "vaccineCode": concept("Influenza vaccine", "1"),
            "patient": {"reference": "Patient/pat1"},
            "occurrenceDateTime": "2018-10-01",
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "dr1",
            "status": "final",
            "code": concept("Renal ultrasound", "1"),
            "effectiveDateTime": "2017-02-02",
            "conclusion": "Normal kidneys.",
        },
        {
            "resourceType": "DocumentReference",
            "id": "doc1",
            "status": "current",
            "type": concept("Progress note", "1"),
            "date": "2019-06-03T10:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "data": "U3RhYmxlLiBDb250aW51ZSBtZXRmb3JtaW4u"}}],
        },
        bp,
        {"resourceType": "Flag", "id": "f1", "status": "active", "code": {"text": "x"}, "subject": {"reference": "x"}},
        {"resourceType": "Flag", "id": "f2", "status": "active", "code": {"text": "y"}, "subject": {"reference": "x"}},
    ]
    for i, year in enumerate(range(2014, 2020)):
        resources.append(encounter(i, f"{year}-06-03"))
        resources.append(hba1c(i, f"{year}-06-03", 7.0 + i / 10, "H"))
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def write(tmp_path: Path, data: object, name: str = "bundle.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def prompt_of(path: Path, budget: int = 6000, **options) -> tuple[str, object]:
    build = get_task("ehr-qa").build([path], QUESTION, TaskOptions(token_budget=budget, **options))
    assert len(build.requests) == 1 and build.n_images == 0
    [message] = build.requests[0].messages
    [part] = message["content"]
    assert message["role"] == "user" and part["type"] == "text"
    return part["text"], build


def dates_in(text: str) -> list[str]:
    return re.findall(r"^(\d{4}-\d{2}-\d{2}):$", text, flags=re.MULTILINE)


def test_summary_is_chronological_without_phi(tmp_path):
    text, build = prompt_of(write(tmp_path, bundle_dict()))
    for phi in PHI:
        assert phi not in text
    assert "Patient: male, born 1948, aged 70 at the latest entry (2019-06-03)" in text
    days = dates_in(text)
    assert days == sorted(days) and days[0] == "2011-05-05" and days[-1] == "2019-06-03"
    assert "Undated:" not in text
    assert text.index("Question: " + QUESTION) > text.index("2019-06-03:")
    assert text.rstrip().endswith(QUESTION)
    assert not text.startswith(THINKING_INSTRUCTION)
    assert build.details["entries_total"] == build.details["entries_kept"] == 23
    assert build.details["cut"]["entries"] == 0 and build.details["ignored_resources"] == {"Basic": 1, "Flag": 2}
    assert any("Basic 1, Flag 2" in w for w in build.warnings)


def test_entry_lines_carry_values_units_ranges_and_statuses(tmp_path):
    text, _ = prompt_of(write(tmp_path, bundle_dict()))
    expected = [
        "- Condition: Type 2 diabetes mellitus (active)",
        "- Condition: Influenza (resolved, abated 2013-01-20)",
        "- Allergy: Penicillin (medication, active, high criticality, reaction Anaphylaxis (severe))",
        "- Medication: Metformin 500 mg oral tablet; 1 tablet, 2 times a day, Oral (prescribed, active)",
        "- Medication: Oseltamivir 75 mg (reported, completed, until 2013-01-15)",
        "- Observation: Hemoglobin A1c: 7.5% (ref <= 5.7%) [high]",
        "- Observation: Blood pressure panel: Systolic blood pressure 148 mm[Hg] [high]; "
        "Diastolic blood pressure 88 mm[Hg]",
        "- Encounter: outpatient visit: Diabetes follow-up",
        "- Procedure: Retinal examination",
        "- Immunization: Influenza vaccine",
        "- Report: Renal ultrasound: Normal kidneys.",
        "- Document: Progress note:\n  Stable. Continue metformin.",
    ]
    for line in expected:
        assert line in text
    assert "2012-03-01:\n- Condition: Type 2 diabetes" in text


def test_budget_drops_oldest_entries_first_and_keeps_active_ones(tmp_path):
    path = write(tmp_path, bundle_dict())
    full, _ = prompt_of(path)
    text, build = prompt_of(path, budget=260)
    details = build.details
    assert details["summary_tokens"] <= 260 and details["token_counter"] == "estimate"
    cut = details["cut"]
    assert cut["entries"] > 0 and details["entries_kept"] == 23 - cut["entries"]
    # the active diabetes, allergy and metformin stay although they are the oldest
    for line in ("Type 2 diabetes mellitus (active)", "Penicillin", "Metformin", "Patient: male"):
        assert line in text
    # what is left out is the oldest of the rest: every kept inactive entry is newer than every dropped one
    assert "Influenza (resolved" not in text and "Oseltamivir" not in text
    assert "2019-06-03:" in text and "Stable. Continue metformin." in text
    assert cut["from"] == "2013-01-10" and cut["undated"] == 0 and cut["truncated"] is False
    assert sum(cut["by_kind"].values()) == cut["entries"]
    kept_days = [d for d in dates_in(text) if d not in ("2011-05-05", "2012-03-01", "2012-03-02")]
    assert kept_days and min(kept_days) >= cut["to"]
    assert f"(Note: {cut['entries']} entries, dated 2013-01-10 to {cut['to']}, were left out" in text
    assert any(w.startswith("the record did not fit the token budget of 260") for w in build.warnings)
    assert len(text) < len(full)


def test_budget_report_is_exact(tmp_path):
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in [patient(), *(encounter(i, f"{2010 + i}-01-01") for i in range(5))]],
    }
    path = write(tmp_path, bundle)
    chars = {"count_tokens": len}  # one "token" per character: exact arithmetic
    _, full = prompt_of(path, extra=chars)
    # each dated encounter block costs the same; room for the patient line and two blocks keeps the newest two
    block = len("2010-01-01:\n- Encounter: outpatient visit: Diabetes follow-up\n")
    text, build = prompt_of(path, budget=full.details["summary_tokens"] - 3 * block, extra=chars)
    assert dates_in(text) == ["2013-01-01", "2014-01-01"]
    assert build.details["cut"] == {
        "entries": 3,
        "by_kind": {"encounter": 3},
        "undated": 0,
        "from": "2010-01-01",
        "to": "2012-01-01",
        "truncated": False,
    }
    assert build.details["entries_total"] == 6 and build.details["entries_kept"] == 3
    assert build.details["summary_tokens"] == full.details["summary_tokens"] - 3 * block
    _, tighter = prompt_of(path, budget=full.details["summary_tokens"] - 3 * block - 1, extra=chars)
    assert tighter.details["cut"]["entries"] == 4 and tighter.details["cut"]["to"] == "2013-01-01"


def test_injected_token_counter(tmp_path):
    calls = []

    def count(text: str) -> int:
        calls.append(text)
        return len(text.split())

    task = EhrQuestionTask(count_tokens=count)
    build = task.build([write(tmp_path, bundle_dict())], QUESTION, TaskOptions(token_budget=6000))
    assert calls and build.details["token_counter"] == "given"
    assert build.details["summary_tokens"] == len(
        build.requests[0].messages[0]["content"][0]["text"].split("\n\n")[1].split()
    )


def test_thinking_prefix_and_parser(tmp_path):
    text, _ = prompt_of(write(tmp_path, bundle_dict()), thinking=True)
    assert text.startswith(THINKING_INSTRUCTION + "\n")
    task = get_task("ehr-qa")
    parsed = task.parse(
        "<unused94>thought\nA1c is high.<unused95>Not controlled.\nFinal Answer: no", {"question": QUESTION}
    )
    assert parsed.payload == {"answer": "Not controlled.\nFinal Answer: no", "final_answer": "no"}
    assert parsed.final_answer == "no"
    choice = task.parse("The answer is B", {"question": "Which?\nA. yes\nB. no"})
    assert choice.final_answer == "B"


def test_estimate_counts_digits_one_by_one():
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcdefgh") == 2
    assert estimate_tokens("2019-06-03") == 8 + 1


def test_more_resources_undated_first_and_old_patients(tmp_path):
    old = {**patient(), "birthDate": "1920-01-01", "deceasedDateTime": "2015-03-03"}
    resources = [
        old,
        {
            "resourceType": "MedicationRequest",
            "status": "stopped",
            "intent": "order",
            "contained": [{"resourceType": "Medication", "id": "m", "code": {"text": "Warfarin"}}],
            "medicationReference": {"reference": "#m"},
            "subject": {"reference": "Patient/pat1"},
            "authoredOn": "2014-01-01",
            "dosageInstruction": [{"text": "5 mg daily"}],
        },
        {
            "resourceType": "Composition",
            "status": "final",
            "type": concept("Discharge summary", "1"),
            "date": "2015-02-02T12:00:00Z",
            "author": [{"display": "Dr Zebulon"}],
            "title": "Discharge summary",
            "section": [
                {
                    "title": "Course",
                    "text": {"status": "generated", "div": "<div><p>Atrial fibrillation &amp; stroke.</p></div>"},
                }
            ],
        },
        {"resourceType": "Condition", "code": {"text": "Hypertension"}, "subject": {"reference": "Patient/pat1"}},
        {**hba1c(9, "2014-05-05", 6.0, None), "status": "entered-in-error"},
        {"resourceType": "DocumentReference", "status": "current", "content": [{"attachment": {"url": "http://x/y"}}]},
    ]
    bundle = {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}
    text, build = prompt_of(write(tmp_path, bundle))
    assert "Patient: male, aged 90 or older at death, deceased in 2015" in text and "1920" not in text
    assert (
        "Undated:\n- Condition: Hypertension\n2014-01-01:\n- Medication: Warfarin; 5 mg daily (prescribed, stopped)"
        in text
    )
    assert "- Document: Discharge summary:\n  Course: Atrial fibrillation & stroke." in text
    assert "Zebulon" not in text and "6.0%" not in text
    assert build.details["ignored_resources"] == {"DocumentReference without text": 1}
    assert any("entered-in-error" in w for w in build.warnings)


def test_plain_text_notes_split_by_date_headers(tmp_path):
    notes = (
        "Referred by GP for chest pain.\n\n"
        "## 2020-02-01 Cardiology clinic\nExercise test negative.\n\n"
        "2019-11-12: ED visit, troponin normal.\n"
        "Date: 2021/05/06\nStarted statin.\n"
    )
    record = read_clinical(write(tmp_path, notes, "notes.md"))
    assert [(e.date and e.date.strftime("%Y-%m-%d"), e.text) for e in record.entries] == [
        (None, "Referred by GP for chest pain."),
        ("2020-02-01", "Cardiology clinic\nExercise test negative."),
        ("2019-11-12", "ED visit, troponin normal."),
        ("2021-05-06", "Started statin."),
    ]
    text, _ = prompt_of(tmp_path / "notes.md")
    assert dates_in(text) == ["2019-11-12", "2020-02-01", "2021-05-06"]
    assert text.index("Undated:\n- Note: Referred by GP") < text.index("2019-11-12:")


def test_one_long_note_keeps_its_end(tmp_path):
    path = write(tmp_path, "start of the note. " + "filler words here. " * 400 + "LAST SENTENCE.", "note.txt")
    text, build = prompt_of(path, budget=300)
    assert "LAST SENTENCE." in text and "start of the note" not in text
    assert build.details["summary_tokens"] <= 300
    assert build.details["cut"]["truncated"] is True and build.details["entries_kept"] == 1
    assert "Part of the newest entry was left out" in text


def test_folder_of_notes_and_a_bundle(tmp_path):
    write(tmp_path, bundle_dict(), "a.json")
    write(tmp_path, "2020-01-01 phone call: feeling well", "b.txt")
    write(tmp_path, "not a record", "c.csv")
    text, build = prompt_of(tmp_path)
    assert "- Note: phone call: feeling well" in text and "Type 2 diabetes" in text
    assert any("ignored 1 file(s)" in w for w in build.warnings)


@pytest.mark.parametrize(
    ("content", "name", "error", "reason"),
    [
        ("{not json", "bad.json", CorruptFileError, "not valid JSON"),
        ([1, 2], "list.json", UnsupportedInputError, "not a FHIR resource"),
        ({"resourceType": "Patient"}, "patient.json", UnsupportedInputError, "not a FHIR Bundle"),
        ({"resourceType": "Bundle"}, "type.json", CorruptFileError, "invalid FHIR Bundle: type: "),
        ({"resourceType": "Bundle", "type": "collection", "entry": {}}, "e.json", CorruptFileError, "Bundle: entry"),
        (
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": {**hba1c(0, "2020-13-45", 7.0, None), "subject": {"reference": "Zebulon"}}}],
            },
            "obs.json",
            CorruptFileError,
            "invalid FHIR entry 0 (Observation): effectiveDateTime",
        ),
        ({"resourceType": "Bundle", "type": "collection", "entry": []}, "empty.json", UnsupportedInputError, "no"),
        ("hello", "x.pdf", UnsupportedInputError, "not a FHIR Bundle"),
    ],
)
def test_invalid_inputs_raise_typed_errors(tmp_path, content, name, error, reason):
    path = write(tmp_path, content, name)
    with pytest.raises(error, match=re.escape(reason)) as info:
        read_clinical(path)
    assert info.value.path == str(path) and "Zebulon" not in str(info.value)


def test_missing_input(tmp_path):
    with pytest.raises(NotFoundError):
        read_clinical(tmp_path / "nope.json")


def test_cli_errors_exit_2(tmp_path, cli):
    path = write(tmp_path, "{not json", "bad.json")
    code, out, err = cli("ask", path, "question", "--task", "ehr-qa", "-q")
    assert code == 2 and out == ""
    assert err.startswith("medlens: error: ") and "bad.json" in err and "not valid JSON" in err
    code, _, err = cli("ask", write(tmp_path, bundle_dict()), "--task", "ehr-qa", "-q")
    assert code == 2 and "needs a question" in err


def test_cli_end_to_end_with_test_tiny(tmp_path, cli):
    path = write(tmp_path, bundle_dict())
    code, out, err = cli("ask", path, QUESTION, "--task", "ehr-qa", "--model", "test-tiny", "--think", "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "ehr-qa" and result["n_images"] == 0 and result["untrained_test_model"] is True
    assert result["details"]["entries_total"] == 23 and result["details"]["cut"]["entries"] == 0
    assert result["payload"] is None or set(result["payload"]) == {"answer", "final_answer"}
    assert any("Basic 1, Flag 2" in w for w in result["warnings"])
    assert result["prompt_tokens"] > 0
    code, out, _ = cli("ask", path, QUESTION, "--task", "ehr-qa", "--token-budget", "200", "-q")
    assert code == 0 and json.loads(out)["details"]["cut"]["entries"] > 0
