"""A patient's record for the text tasks: a FHIR R4 Bundle (JSON) or plain-text notes -> dated entries.

Resources are validated with ``fhir.resources`` (imported lazily). The package has no R4 module; its R4B
models are used, which match R4 for every resource read here. Only clinical content is kept: the Patient
resource gives sex, birth year and age, never names, addresses, identifiers or contact details, and
references to practitioners, organisations and locations are not followed. Free text (notes, inline
documents, report conclusions) is kept as written, so it is only as de-identified as its source.
"""

from __future__ import annotations

import html
import importlib
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from medlens.errors import CorruptFileError, MedlensError, NotFoundError, TooLargeError, UnsupportedInputError

FHIR_MODELS = "fhir.resources.R4B"
BUNDLE_SUFFIXES = (".json",)
NOTE_SUFFIXES = (".txt", ".md")
MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class ClinicalEntry:
    """One fact of the record. ``active`` marks a current problem, allergy or medication (and the patient)."""

    date: datetime | None
    kind: str  # patient, condition, observation, medication, procedure, encounter, allergy, report ...
    text: str
    source: str  # file and resource (``bundle.json#Observation/42``) or file and line of a note
    active: bool = False


@dataclass
class ClinicalRecord:
    """The entries of one input, the resource types not summarised (with counts) and reading notes."""

    source: str
    entries: list[ClinicalEntry] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def read_clinical(path: str | Path) -> ClinicalRecord:
    """Read a FHIR Bundle (.json), notes (.txt/.md), or a folder of them (searched recursively)."""
    path = Path(path)
    if not path.exists():
        raise NotFoundError("no such file or folder", str(path))
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
    record, others, read = ClinicalRecord(str(path)), 0, 0
    for file in files:
        suffix = file.suffix.lower()
        if suffix in BUNDLE_SUFFIXES:
            part = read_bundle(file)
        elif suffix in NOTE_SUFFIXES:
            part = read_notes(file)
        elif path.is_file():
            raise UnsupportedInputError("not a FHIR Bundle (.json) or clinical notes (.txt, .md)", str(file))
        else:
            others += 1
            continue
        read += 1
        record.entries += part.entries
        record.ignored.update(part.ignored)
        record.notes += part.notes
    if not read:
        raise UnsupportedInputError("no FHIR Bundle (.json) or clinical notes (.txt, .md) found", str(path))
    if others:
        record.notes.append(f"ignored {others} file(s) that are neither .json bundles nor .txt/.md notes")
    if not record.entries:
        raise UnsupportedInputError("no clinical entries found", str(path))
    return record


def read_bundle(path: str | Path) -> ClinicalRecord:
    """Read one FHIR R4 Bundle from a JSON file."""
    source = str(path)
    try:
        data = json.loads(_read_bytes(Path(path)).decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise CorruptFileError("not UTF-8 text", source) from exc
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"not valid JSON (line {exc.lineno}, column {exc.colno})", source) from exc
    return bundle_record(data, source)


def bundle_record(data: Any, source: str) -> ClinicalRecord:
    """Entries of a parsed Bundle (a JSON object); ``source`` names it in errors and entries."""
    if not isinstance(data, dict) or "resourceType" not in data:
        raise UnsupportedInputError("not a FHIR resource (no resourceType)", source)
    if data["resourceType"] != "Bundle":
        raise UnsupportedInputError(f"not a FHIR Bundle (resourceType {data['resourceType']!r})", source)
    entries = data.get("entry")
    entries = [] if entries is None else entries
    if isinstance(entries, list):  # the shell is checked here, each resource below by its own model
        data = {
            **data,
            "entry": [{k: v for k, v in e.items() if k != "resource"} if isinstance(e, dict) else e for e in entries],
        }
    _validate("Bundle", data, source, "Bundle")
    record, parsed, patients, errors = ClinicalRecord(source), [], [], 0
    for i, entry in enumerate(entries):
        resource = entry.get("resource")
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if rtype is None:
            continue
        if rtype not in HANDLERS and rtype not in ("Patient", "Medication"):
            record.ignored[rtype] += 1
            continue
        model = _validate(rtype, resource, source, f"entry {i} ({rtype})")
        if _entered_in_error(model):
            errors += 1
        elif rtype == "Patient":
            patients.append(model)
        else:
            parsed.append((rtype, model, entry.get("fullUrl"), f"{source}#{rtype}/{model.id or f'entry{i}'}"))
    medications = {
        key: m for rtype, m, url, _ in parsed if rtype == "Medication" for key in (url, f"Medication/{m.id}") if key
    }
    for rtype, model, _, where in parsed:
        if rtype == "Medication":
            continue
        kind, handler = HANDLERS[rtype]
        made = handler(model, medications)
        if made is None:
            record.ignored[f"{rtype} without text"] += 1
        else:
            when, text, active = made
            record.entries.append(ClinicalEntry(when, kind, text, where, active))
    latest = max((e.date for e in record.entries if e.date), default=None)
    for patient in patients:
        record.entries.insert(0, ClinicalEntry(None, "patient", patient_text(patient, latest), source, True))
    if len(patients) > 1:
        record.notes.append(f"{source} holds {len(patients)} Patient resources; their entries are summarised together")
    if errors:
        record.notes.append(f"skipped {errors} resource(s) marked entered-in-error in {source}")
    return record


def read_notes(path: str | Path) -> ClinicalRecord:
    """Plain-text notes: a new entry at each line that starts with a date (``2021-03-04``, ``## 2021/03/04
    10:30 Clinic``, ``Date: 2021-03-04``); text before the first such line, or a note without any, is
    one undated entry."""
    source = str(path)
    try:
        text = _read_bytes(Path(path)).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorruptFileError("not UTF-8 text", source) from exc
    record = ClinicalRecord(source)
    when: datetime | None = None
    lines: list[str] = []
    start = 1

    def flush() -> None:
        body = tidy("\n".join(lines))
        if body or when:
            record.entries.append(ClinicalEntry(when, "note", body or "(no text)", f"{source}:{start}"))

    for number, line in enumerate(text.splitlines(), start=1):
        header = _date_header(line)
        if header is None:
            lines.append(line)
            continue
        flush()
        when, rest = header
        lines, start = [rest], number
    flush()
    return record


_DATE_LINE = re.compile(
    r"^[\s#*>_-]*(?:date\s*[:=-]?\s*)?(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:[T ](\d{1,2}):(\d{2}))?(?!\d)"
    r"[\s:|*_–—-]*(.*)$",
    re.IGNORECASE,
)


def _date_header(line: str) -> tuple[datetime, str] | None:
    match = _DATE_LINE.match(line)
    if not match:
        return None
    y, m, d, hh, mm, rest = match.groups()
    try:
        return datetime(int(y), int(m), int(d), int(hh or 0), int(mm or 0)), rest.strip()
    except ValueError:
        return None


# ---- resources -> (date, text, active) ----------------------------------------------------------------

Made = tuple[datetime | None, str, bool] | None
Meds = dict[str | None, Any]

INTERPRETATIONS = {
    "H": "high", "L": "low", "HH": "critically high", "LL": "critically low", "A": "abnormal",
    "AA": "critically abnormal", "N": "normal", "POS": "positive", "NEG": "negative", "HU": "very high",
    "LU": "very low", "R": "resistant", "S": "susceptible", "I": "intermediate",
}  # fmt: skip
ENCOUNTER_CLASSES = {
    "AMB": "outpatient visit", "EMER": "emergency visit", "IMP": "inpatient stay", "ACUTE": "inpatient stay",
    "NONAC": "inpatient stay", "OBSENC": "observation stay", "SS": "short stay", "HH": "home visit",
    "VR": "virtual visit", "FLD": "field visit", "PRENC": "pre-admission",
}  # fmt: skip
UNITS = {"s": "second", "min": "minute", "h": "hour", "d": "day", "wk": "week", "mo": "month", "a": "year"}


def condition(c: Any, meds: Meds) -> Made:
    status, verification = _code(c.clinicalStatus), _code(c.verificationStatus)
    bits = [b for b in (status, verification if verification != "confirmed" else None, _concept(c.severity)) if b]
    abated = _when(c.abatementDateTime, _start(c.abatementPeriod))
    if abated:
        bits.append(f"abated {abated:%Y-%m-%d}")
    active = status in ("active", "recurrence", "relapse") and verification != "refuted"
    return _when(c.onsetDateTime, _start(c.onsetPeriod), c.recordedDate), _named(c.code, bits, "condition"), active


def observation(o: Any, meds: Meds) -> Made:
    name = _concept(o.code) or "observation"
    parts = [measurement(o)] if _value(o) or o.dataAbsentReason or not o.component else []
    parts += [f"{_concept(c.code) or 'component'} {measurement(c)}" for c in o.component or []]
    status = f" ({o.status})" if o.status in ("registered", "preliminary", "cancelled") else ""
    when = _when(o.effectiveDateTime, _start(o.effectivePeriod), o.effectiveInstant, o.issued)
    return when, f"{name}: {'; '.join(parts)}{status}", False


def measurement(item: Any) -> str:
    """``13.5 g/dL (ref 12-16 g/dL) [low]``: value, reference range, interpretation of an observation
    or one of its components."""
    value = _value(item) or f"no value ({_concept(item.dataAbsentReason) or 'not given'})"
    ranges = [r for r in map(_ref_range, getattr(item, "referenceRange", None) or []) if r]
    flags = [INTERPRETATIONS.get(_code(i) or "", _concept(i)) for i in item.interpretation or []]
    return value + (f" (ref {'; '.join(ranges)})" if ranges else "") + "".join(f" [{f}]" for f in flags if f)


def medication_request(m: Any, meds: Meds) -> Made:
    text = _medication(m, meds) + _dosage(m.dosageInstruction) + f" (prescribed, {m.status})"
    return _when(m.authoredOn), text, m.status in ("active", "on-hold")


def medication_statement(m: Any, meds: Meds) -> Made:
    end = _when(m.effectivePeriod.end if m.effectivePeriod else None)
    until = f", until {end:%Y-%m-%d}" if end else ""
    text = _medication(m, meds) + _dosage(m.dosage) + f" (reported, {m.status}{until})"
    when = _when(m.effectiveDateTime, _start(m.effectivePeriod), m.dateAsserted)
    return when, text, m.status in ("active", "intended", "on-hold")


def procedure(p: Any, meds: Meds) -> Made:
    site, reason, outcome = _concepts(p.bodySite), _concepts(p.reasonCode), _concept(p.outcome)
    bits = [p.status if p.status != "completed" else None, site and f"site {site}", reason and f"for {reason}"]
    bits = [b for b in [*bits, outcome and f"outcome {outcome}"] if b]
    return _when(p.performedDateTime, _start(p.performedPeriod)), _named(p.code, bits, "procedure"), False


def encounter(e: Any, meds: Meds) -> Made:
    code = e.class_fhir.code if e.class_fhir else None
    label = (e.class_fhir.display if e.class_fhir else None) or ENCOUNTER_CLASSES.get(code or "", "encounter")
    bits = [b for b in (_concepts(e.type), _concept(e.serviceType)) if b]
    if _concepts(e.reasonCode):
        bits.append(f"for {_concepts(e.reasonCode)}")
    start, end = _when(_start(e.period)), _when(e.period.end if e.period else None)
    if end and (not start or end.date() != start.date()):
        bits.append(f"until {end:%Y-%m-%d}")
    if e.hospitalization and _concept(e.hospitalization.dischargeDisposition):
        bits.append(f"discharged to {_concept(e.hospitalization.dischargeDisposition)}")
    if e.status not in ("finished", None):
        bits.append(e.status)
    return start, label + (f": {', '.join(bits)}" if bits else ""), False


def allergy(a: Any, meds: Meds) -> Made:
    status, verification = _code(a.clinicalStatus), _code(a.verificationStatus)
    bits = [*(a.category or []), status, verification if verification != "confirmed" else None]
    if a.criticality and a.criticality != "unable-to-assess":
        bits.append(f"{a.criticality} criticality")
    for reaction in a.reaction or []:
        severity = f" ({reaction.severity})" if reaction.severity else ""
        bits.append(f"reaction {_concepts(reaction.manifestation)}{severity}")
    active = status in ("active", None) and verification != "refuted"
    when = _when(a.onsetDateTime, _start(a.onsetPeriod), a.recordedDate)
    return when, _named(a.code, [b for b in bits if b], "allergy"), active


def diagnostic_report(r: Any, meds: Meds) -> Made:
    text = _concept(r.code) or "report"
    if r.conclusion:
        text += f": {tidy(r.conclusion)}"
    if r.conclusionCode:
        text += f" [{_concepts(r.conclusionCode)}]"
    return _when(r.effectiveDateTime, _start(r.effectivePeriod), r.issued), text, False


def immunization(i: Any, meds: Meds) -> Made:
    bits = ["not given"] if i.status == "not-done" else []
    return _when(i.occurrenceDateTime), _named(i.vaccineCode, bits, "vaccine"), False


def document_reference(d: Any, meds: Meds) -> Made:
    texts = [_attachment_text(c.attachment) for c in d.content or []]
    body = "\n".join(t for t in texts if t)
    if not body:
        return None
    title = _concept(d.type) or d.description or "document"
    when = _when(d.date, _start(d.context.period) if d.context else None)
    return when, f"{title}:\n{body}", False


def composition(c: Any, meds: Meds) -> Made:
    body = "\n".join(_section_texts(c.section or []))
    return (_when(c.date), f"{c.title or _concept(c.type) or 'document'}:\n{body}", False) if body else None


HANDLERS: dict[str, tuple[str, Callable[[Any, Meds], Made]]] = {
    "Condition": ("condition", condition),
    "Observation": ("observation", observation),
    "MedicationRequest": ("medication", medication_request),
    "MedicationStatement": ("medication", medication_statement),
    "Procedure": ("procedure", procedure),
    "Encounter": ("encounter", encounter),
    "AllergyIntolerance": ("allergy", allergy),
    "DiagnosticReport": ("report", diagnostic_report),
    "Immunization": ("immunization", immunization),
    "DocumentReference": ("document", document_reference),
    "Composition": ("document", composition),
}


def patient_text(p: Any, latest: datetime | None) -> str:
    """Sex, birth year and age only (ages of 90 and over as "90 or older", without the birth year)."""
    bits = [p.gender if p.gender and p.gender != "unknown" else "sex unknown"]
    birth, died = _when(p.birthDate), _when(p.deceasedDateTime)
    if birth:
        exact = isinstance(p.birthDate, date)
        at = died or latest or datetime.now()
        age = at.year - birth.year - (exact and (at.month, at.day) < (birth.month, birth.day))
        when = "at death" if died else f"at the latest entry ({at:%Y-%m-%d})" if latest else "today"
        if age >= 90:
            bits.append(f"aged 90 or older {when}")
        else:
            bits += [f"born {birth.year}", f"aged {'' if exact else 'about '}{age} {when}"]
    if died or p.deceasedBoolean:
        bits.append(f"deceased in {died.year}" if died else "deceased")
    return ", ".join(bits)


# ---- helpers ------------------------------------------------------------------------------------------


def _models(rtype: str) -> Any:
    try:
        module = importlib.import_module(f"{FHIR_MODELS}.{rtype.lower()}")
    except ImportError as exc:
        raise MedlensError("reading FHIR needs the fhir.resources package (pip install 'fhir.resources>=8')") from exc
    return getattr(module, rtype)


def _validate(rtype: str, data: dict[str, Any], source: str, where: str) -> Any:
    try:
        return _models(rtype).model_validate(data)
    except ValueError as exc:  # pydantic's ValidationError; the values themselves are never shown (PHI)
        errors = getattr(exc, "errors", None)
        if errors is None:
            raise CorruptFileError(f"invalid FHIR {where}: {exc}", source) from exc
        first = errors(include_input=False, include_url=False)
        loc = ".".join(str(p) for p in first[0]["loc"]) if first else ""
        more = f" (and {len(first) - 1} more)" if len(first) > 1 else ""
        raise CorruptFileError(
            f"invalid FHIR {where}: {loc}: {first[0]['msg'] if first else exc}{more}", source
        ) from exc
    except (KeyError, TypeError) as exc:  # an unknown resourceType nested inside (contained ...)
        raise CorruptFileError(f"invalid FHIR {where}: unknown or malformed {exc}", source) from exc


def _entered_in_error(model: Any) -> bool:
    return getattr(model, "status", None) == "entered-in-error" or (
        _code(getattr(model, "verificationStatus", None)) == "entered-in-error"
    )


def _read_bytes(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TooLargeError(f"{size / 2**20:,.0f} MB, over the {MAX_FILE_BYTES / 2**20:,.0f} MB limit", str(path))
    return path.read_bytes()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _when(*values: Any) -> datetime | None:
    """The first value given as a naive datetime (local wall time kept; partial dates start the period)."""
    for value in values:
        if isinstance(value, datetime):
            return value.replace(tzinfo=None)
        if isinstance(value, date):
            return datetime(value.year, value.month, value.day)
        if isinstance(value, str) and (match := re.fullmatch(r"(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?", value.strip())):
            return datetime(int(match[1]), int(match[2] or 1), int(match[3] or 1))
    return None


def _start(period: Any) -> Any:
    return period.start if period else None


def _concept(cc: Any) -> str | None:
    """A CodeableConcept's text, else its first coding's display or code."""
    if cc is None:
        return None
    if cc.text:
        return cc.text
    return next((c.display or c.code for c in cc.coding or [] if c.display or c.code), None)


def _concepts(ccs: Iterable[Any] | None) -> str | None:
    return ", ".join(t for t in (_concept(c) for c in ccs or []) if t) or None


def _code(cc: Any) -> str | None:
    return next((c.code for c in cc.coding or [] if c.code), None) if cc is not None else None


def _named(cc: Any, bits: list[str], fallback: str) -> str:
    return (_concept(cc) or fallback) + (f" ({', '.join(bits)})" if bits else "")


def _quantity(q: Any) -> str | None:
    if q is None or q.value is None:
        return None
    unit = q.unit or q.code or ""
    return f"{q.comparator or ''}{q.value}{'' if unit in ('', '%') else ' '}{unit}"


def _value(item: Any) -> str | None:
    def g(key: str) -> Any:
        return getattr(item, key, None)

    if g("valueRange"):
        low, high = _quantity(g("valueRange").low), _quantity(g("valueRange").high)
        return f"{low or ''}-{high or ''}"
    if g("valueRatio"):
        return f"{_quantity(g('valueRatio').numerator)}/{_quantity(g('valueRatio').denominator)}"
    if g("valueBoolean") is not None:
        return "yes" if g("valueBoolean") else "no"
    for key in ("valueQuantity", "valueCodeableConcept", "valueString", "valueInteger", "valueDateTime"):
        value = g(key)
        if value is not None:
            text = _quantity(value) if key == "valueQuantity" else _concept(value) if "Concept" in key else value
            return f"{text:%Y-%m-%d}" if isinstance(text, date) else str(text)
    return None


def _ref_range(r: Any) -> str | None:
    low, high = _quantity(r.low), _quantity(r.high)
    if low and high:
        return f"{r.low.value}-{high}"
    if low or high:
        return f">= {low}" if low else f"<= {high}"
    return r.text


def _medication(m: Any, meds: Meds) -> str:
    if m.medicationCodeableConcept:
        return _concept(m.medicationCodeableConcept) or "medication"
    ref = m.medicationReference
    target = ref.reference if ref else None
    if target and target.startswith("#"):
        found = next((c for c in m.contained or [] if c.id == target[1:]), None)
    else:
        found = meds.get(target) if target else None
    return _concept(getattr(found, "code", None)) or (ref.display if ref else None) or "medication"


def _dosage(dosages: list[Any] | None) -> str:
    if not dosages:
        return ""
    d = dosages[0]
    if d.text:
        return f"; {d.text}"
    bits = []
    for rate in d.doseAndRate or []:
        bits.append(_quantity(rate.doseQuantity) or "")
    repeat = d.timing.repeat if d.timing else None
    if repeat and repeat.frequency and repeat.periodUnit:
        unit, period, freq = UNITS.get(repeat.periodUnit, repeat.periodUnit), repeat.period or 1, repeat.frequency
        per = f"a {unit}" if period == 1 else f"every {period} {unit}s"
        bits.append(f"{'once' if freq == 1 else f'{freq} times'} {per}")
    elif d.timing and d.timing.code:
        bits.append(_concept(d.timing.code) or "")
    bits.append(_concept(d.route) or "")
    if d.asNeededBoolean or d.asNeededCodeableConcept:
        bits.append(
            f"as needed for {_concept(d.asNeededCodeableConcept)}" if d.asNeededCodeableConcept else "as needed"
        )
    text = ", ".join(b for b in bits if b)
    return f"; {text}" if text else ""


def _attachment_text(a: Any) -> str | None:
    if a is None or not a.data or not (a.contentType or "").startswith("text/"):
        return None
    text = a.data.decode("utf-8", errors="replace") if isinstance(a.data, bytes) else str(a.data)
    return tidy(strip_html(text) if "html" in a.contentType else text)


def _section_texts(sections: list[Any]) -> list[str]:
    out = []
    for s in sections:
        text = tidy(strip_html(s.text.div)) if s.text and s.text.div else ""
        if text:
            out.append(f"{s.title}: {text}" if s.title else text)
        out += _section_texts(s.section or [])
    return out


def strip_html(text: str) -> str:
    """The text of an XHTML fragment (tags dropped, block ends as line breaks, entities decoded)."""
    text = re.sub(r"<(br|/p|/div|/li|/tr|/h\d)\b[^>]*>", "\n", text, flags=re.IGNORECASE)
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def tidy(text: str) -> str:
    """Trim every line, squeeze spaces, drop empty lines."""
    lines = (re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)
