"""Text de-identification: a FHIR bundle and notes full of PHI canaries -> nothing of them left in the scrubbed
summary, while clinical content (values, units, slice numbers, years) stays."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from medlens.io.text_deid import fhir_terms, note_names, phi_terms, scrub

#: every identifying string the corpus holds, as it may appear in text sent to a model
CANARIES = {
    "given": "Aurelio",
    "family": "Quibbleston",
    "practitioner": "Zenobia",
    "practitioner-family": "Klargh",
    "mrn": "QX-77881234",
    "phone": "(617) 555-0142",
    "phone2": "617-555-0199",
    "email": "aurelio.q@example.org",
    "street": "42 Wobblewood Lane",
    "city": "Frobville",
    "postcode": "02999",
    "birth": "1961-07-23",
    "visit": "2023-03-03",
    "visit-text": "March 3, 2023",
    "report-date": "2023-04-11",
    "ssn": "123-45-6789",
    "note-patient": "Ottoline",
    "note-family": "Brackwater",
    "note-doctor": "Fennimore",
    "note-mrn": "55012345",
    "note-phone": "555-867-5309",
    "note-email": "ottoline@mail.test",
    "note-date": "04/05/2022",
    "note-date2": "2022-04-05",
}
#: clinical text that must survive
CLINICAL = ("HbA1c 8.1 %", "metformin", "type 2 diabetes", "pneumonia", "right lower lobe")


def _note(text: str) -> dict:
    return {"contentType": "text/plain", "data": base64.b64encode(text.encode()).decode()}


def phi_bundle() -> dict:
    """A FHIR R4 Bundle with PHI in every field Annex-like lists name (Patient, Practitioner) and in free text."""
    c = CANARIES
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "urn:oid:1.2.3.4", "value": c["mrn"]}, {"value": c["ssn"]}],
        "name": [{"family": c["family"], "given": [c["given"]], "text": f"{c['given']} {c['family']}"}],
        "telecom": [
            {"system": "phone", "value": c["phone"]},
            {"system": "email", "value": c["email"]},
            {"system": "phone", "value": c["phone2"]},
        ],
        "gender": "male",
        "birthDate": c["birth"],
        "address": [{"line": [c["street"]], "city": c["city"], "postalCode": c["postcode"], "country": "US"}],
    }
    practitioner = {
        "resourceType": "Practitioner",
        "id": "dr1",
        "name": [{"family": c["practitioner-family"], "given": [c["practitioner"]]}],
    }
    note = (
        f"Discharge note for {c['given']} {c['family']} (MRN {c['mrn']}), seen {c['visit-text']}. "
        f"Lives at {c['street']}, {c['city']} {c['postcode']}; phone {c['phone']}, e-mail {c['email']}. "
        f"SSN {c['ssn']}. Attending: Dr. {c['practitioner-family']}. Admitted with pneumonia of the right lower "
        f"lobe; type 2 diabetes on metformin, HbA1c 8.1 %. Call {c['phone2']} with questions."
    )
    entries = [
        patient,
        practitioner,
        {
            "resourceType": "Condition",
            "id": "c1",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "code": {"text": "type 2 diabetes"},
            "subject": {"reference": "Patient/p1"},
            "onsetDateTime": c["visit"],
        },
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "status": "current",
            "date": f"{c['visit']}T10:00:00Z",
            "content": [{"attachment": _note(note)}],
        },
        {
            "resourceType": "DiagnosticReport",
            "id": "r1",
            "status": "final",
            "code": {"text": "Chest X-ray"},
            "effectiveDateTime": c["report-date"],
            "conclusion": f"Pneumonia, right lower lobe. Compared with the study of {c['visit-text']} "
            f"for {c['given']} {c['family']}.",
        },
    ]
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in entries]}


def phi_notes() -> str:
    c = CANARIES
    return (
        f"{c['note-date2']}\n"
        f"Patient: {c['note-patient']} {c['note-family']}, MRN: {c['note-mrn']}. Seen by Dr. {c['note-doctor']} "
        f"on {c['note-date']}. Contact {c['note-phone']} or {c['note-email']}. Mrs. {c['note-family']} reports "
        "cough; metformin continued, HbA1c 8.1 %.\n"
    )


def write_corpus(folder: Path) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    bundle, notes = folder / "bundle.json", folder / "notes.txt"
    bundle.write_text(json.dumps(phi_bundle()))
    notes.write_text(phi_notes())
    return bundle, notes


def canary_hits(text: str) -> list[str]:
    return [k for k, v in CANARIES.items() if v.lower() in text.lower()]


def test_fhir_terms_by_field() -> None:
    terms = fhir_terms(phi_bundle())
    for key in ("given", "family", "mrn", "phone", "email", "street", "city", "postcode", "birth", "practitioner"):
        assert CANARIES[key] in terms, key
    assert "male" not in terms and "type 2 diabetes" not in terms and "US" not in terms


def test_note_names_by_pattern() -> None:
    names = note_names(phi_notes())
    assert {"Ottoline", "Brackwater", "Fennimore"} <= names
    assert "Patient" not in names


def test_summary_scrubbed_of_every_canary(tmp_path: Path) -> None:
    from medlens.io.fhir import read_clinical
    from medlens.tasks.ehr import render, summarize

    bundle, notes = write_corpus(tmp_path)
    for source in (bundle, notes):
        text = summarize(read_clinical(source).entries, 6000).text
        assert canary_hits(text), "the summary should carry the canaries before scrubbing"
        done = scrub(text, phi_terms([tmp_path]))
        assert canary_hits(done.text) == [], done.text
        assert sum(done.counts.values()) > 0
        assert "[2023]" in done.text or "[2022]" in done.text  # the year of a date stays
    full = scrub(render(read_clinical(bundle).entries), phi_terms([bundle])).text
    for phrase in CLINICAL:
        assert phrase.lower() in full.lower(), phrase


def test_patterns_without_terms() -> None:
    text = (
        "Seen 2021-06-01 and 6 Jan 2020, next 12/24/2021. MRN: A1234567, acct #884422. Ph +1 (212) 555-0100, "
        "j.doe@host.example, https://portal.example/p/1. 10 Downing Street, SW1A 2AA."
    )
    done = scrub(text)
    for gone in ("2021-06-01", "6 Jan 2020", "12/24/2021", "A1234567", "884422", "555-0100", "j.doe@", "portal",
                 "Downing", "SW1A"):  # fmt: skip
        assert gone not in done.text, gone
    assert done.text.count("[2021]") == 2 and "[2020]" in done.text
    assert set(done.counts) >= {"date", "identifier", "phone", "email", "url", "address", "postcode"}


def test_clinical_numbers_survive() -> None:
    text = (
        "You are looking at 85 slices of a CT volume (red: -1024 to 1024 HU, green: -135 to 215 HU). SLICE 12. "
        "BP 120/80, WBC 11000, platelets 250, HbA1c 7.2 %, born 1961, aged 62, dose 500 mg twice daily."
    )
    assert scrub(text).text == text
