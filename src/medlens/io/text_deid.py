"""Scrub text before it leaves the machine: names, identifiers, addresses, phone numbers, e-mails, exact dates.

Two sources of what to remove:

- terms found in the inputs (:func:`phi_terms`): in a FHIR Bundle, by resource field (every ``HumanName``
  of Patient, Practitioner, RelatedPerson, Person and contacts; ``identifier`` values; ``telecom`` values;
  ``address`` parts; ``birthDate``); in notes, the names after titles and labels (``Mr.``, ``Dr.``,
  ``Patient:``, ``Name:`` ...);
- patterns (:func:`scrub`): e-mail addresses, URLs, phone numbers, labelled identifiers (``MRN: ...``,
  ``ID ...``, ``#1234567``), long digit runs, social security numbers, street addresses and postcodes,
  and exact dates, which become their year (``[2021]``) so the record's chronology stays readable.

This is pattern matching, not a guarantee: a name that appears nowhere as a name in the record, and is not
after a title, can pass. Documented in docs/hospital.md.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: files read for terms (others are skipped)
TERM_SUFFIXES = (".json", ".txt", ".md")
#: bigger files are not searched for terms (patterns still apply to the text sent)
MAX_TERM_FILE_BYTES = 64 * 2**20
#: DICOM files whose headers are read for terms, per input (a study's files name the same patient)
DICOM_HEADERS_READ = 3
#: the header attributes read for terms
DICOM_TERM_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientNames",
    "OtherPatientIDs",
    "PatientBirthDate",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "AccessionNumber",
)
#: terms shorter than this are not replaced on their own (initials, "Jo")
MIN_TERM_CHARS = 3

_MONTHS = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?"
    r"|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_YEAR = r"(?P<year>(?:19|20)\d\d)"
#: (label, pattern), applied in this order; a pattern with a ``year`` group keeps the year
PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("email", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("url", re.compile(r"\b(?:https?://|www\.)\S+", re.IGNORECASE)),
    ("date", re.compile(rf"\b{_YEAR}-[01]\d-[0-3]\d[T ][0-2]\d:[0-5]\d(?::[0-5]\d(?:\.\d+)?)?(?:Z|[+-]\d\d:?\d\d)?")),
    ("date", re.compile(rf"\b{_YEAR}-[01]?\d-[0-3]?\d\b")),
    ("date", re.compile(rf"\b[0-3]?\d[/.-][01]?\d[/.-]{_YEAR}\b")),
    ("date", re.compile(rf"\b[01]?\d/[0-3]?\d/{_YEAR}\b")),
    ("date", re.compile(rf"\b{_MONTHS}\s+[0-3]?\d(?:st|nd|rd|th)?,?\s+{_YEAR}\b", re.IGNORECASE)),
    ("date", re.compile(rf"\b[0-3]?\d(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTHS},?\s+{_YEAR}\b", re.IGNORECASE)),
    ("date", re.compile(rf"\b{_YEAR}[01]\d[0-3]\d\b")),
    ("ssn", re.compile(r"\b\d{3}-\d{2}-\d{4}\b")),
    ("phone", re.compile(r"(?<![\w-])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b")),
    (
        "identifier",
        re.compile(
            r"\b(?:MRN|NHS(?:\s+number)?|ID|record(?:\s+number)?|account|acct|patient\s+number|accession)"
            r"(?:\s*(?:no\.?|number|#))?\s*[:#]?\s*[A-Z]*-?\d[\w-]{2,}",
            re.IGNORECASE,
        ),
    ),
    ("number", re.compile(r"#\s?\d{4,}\b|\b\d{7,}\b")),
    (
        "address",
        re.compile(
            r"\b\d{1,5}\s+(?:[A-Z][a-z]+\s+){1,3}(?:Street|St|Avenue|Ave|Road|Rd|Lane|Ln|Drive|Dr|Boulevard|Blvd"
            r"|Way|Court|Ct|Place|Pl|Terrace|Close)\b\.?"
        ),
    ),
    ("postcode", re.compile(r"\b[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}\b")),
)
#: a name after one of these (in notes)
_NAME_CUES = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+|\b(?i:patient|name|pt|seen by|signed by|attending|referred by"
    r"|physician|nurse|contact|mother|father|wife|husband|daughter|son)\s*[:,-]?\s+(?:(?:Mr|Mrs|Ms|Miss|Dr|Prof)\.?\s+)?)"
    r"(?P<name>[A-Z][a-z'-]+(?:\s+[A-Z]\.)?(?:\s+[A-Z][a-z'-]+){0,2})",
)
_NOT_NAMES = {"The", "This", "Patient", "Name", "Unknown", "History", "Denies", "Reports", "Has", "Was", "Is", "No"}
#: FHIR fields whose strings are identifying wherever they appear
_FHIR_FIELDS = ("identifier", "telecom", "address", "birthDate", "name", "contact", "photo")


@dataclass
class Scrubbed:
    """The scrubbed text and how many replacements of each kind were made."""

    text: str
    counts: Counter[str] = field(default_factory=Counter)


def phi_terms(paths: Iterable[str | Path]) -> set[str]:
    """Identifying strings found in the FHIR bundles, notes and DICOM headers among ``paths`` (files or
    folders; the first :data:`DICOM_HEADERS_READ` DICOM files of each)."""
    paths = list(paths)
    terms: set[str] = dicom_terms(paths)
    for path in _files(paths):
        try:
            text = path.read_text("utf-8", errors="replace")
        except OSError:
            continue
        if path.suffix.lower() == ".json":
            with contextlib.suppress(ValueError):
                terms |= fhir_terms(json.loads(text))
        terms |= note_names(text)
    return {t for t in terms if len(t) >= MIN_TERM_CHARS}


def dicom_terms(paths: Iterable[str | Path]) -> set[str]:
    """Names, identifiers and birth dates in the headers of the first DICOM files of each input."""
    terms: set[str] = set()
    for raw in paths:
        path = Path(raw)
        files = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        dicoms = (f for f in files if f.is_file() and f.suffix.lower() not in TERM_SUFFIXES and is_dicom_file(f))
        for _, file in zip(range(DICOM_HEADERS_READ), dicoms, strict=False):
            terms |= _header_terms(file)
    return {t for t in terms if len(t) >= MIN_TERM_CHARS}


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble marker."""
    try:
        with path.open("rb") as handle:
            return handle.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _header_terms(path: Path) -> set[str]:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(DICOM_TERM_KEYWORDS))
    except Exception:  # a header that cannot be read holds no terms to find
        return set()
    terms: set[str] = set()
    for keyword in DICOM_TERM_KEYWORDS:
        for value in _values(ds.get(keyword)):
            text = str(value).strip()
            if not text:
                continue
            if keyword.endswith("Date") and len(text) == 8 and text.isdigit():
                terms |= {text, f"{text[:4]}-{text[4:6]}-{text[6:]}"}
                continue
            terms.add(text.replace("^", " ").strip())
            if ds[keyword].VR == "PN":
                terms.update(w for w in re.split(r"[\^\s,=]+", text) if len(w) >= MIN_TERM_CHARS)
    return terms


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue" else [value]


def fhir_terms(data: Any) -> set[str]:
    """Identifying strings of a FHIR resource or Bundle, by field (see the module docstring)."""
    terms: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in _FHIR_FIELDS:
                    terms.update(_strings(value, key))
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(data)
    return terms


def _strings(value: Any, key: str) -> Iterator[str]:
    """The identifying strings of one FHIR field (names also word by word)."""
    skip = {"use", "system", "type", "rank", "period", "coding", "relationship", "gender", "extension", "country"}
    if isinstance(value, str):
        yield value.strip()
        if key == "name":  # a name's parts also on their own ("Smith" of "John Smith")
            yield from (w for w in re.split(r"[\s,]+", value) if len(w) >= MIN_TERM_CHARS)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item, key)
    elif isinstance(value, dict):
        for sub, item in value.items():
            if sub not in skip:
                yield from _strings(item, sub if key != "name" else "name")


def note_names(text: str) -> set[str]:
    """Names after titles and labels in free text, whole and word by word."""
    found: set[str] = set()
    for match in _NAME_CUES.finditer(text):
        name = match.group("name").strip()
        words = [w for w in name.split() if w not in _NOT_NAMES and len(w.rstrip(".")) >= MIN_TERM_CHARS]
        if words:
            found.add(" ".join(words))
            found.update(words)
    return found


def scrub(text: str, terms: Iterable[str] = ()) -> Scrubbed:
    """``text`` with the terms and the patterns replaced by ``[REDACTED]``-style markers."""
    counts: Counter[str] = Counter()
    names = set(terms) | note_names(text)

    def apply(patterns: Iterable[tuple[str, re.Pattern[str]]]) -> None:
        nonlocal text
        for label, pattern in patterns:
            text, n = pattern.subn(lambda m, label=label: _marker(m, label), text)
            counts[label] += n

    apply(PATTERNS[:2])  # e-mails and URLs first: a name inside one must not break it up
    for term in sorted(names, key=len, reverse=True):  # longest first: "John Smith" before "John"
        pattern = re.compile(r"(?<!\w)" + re.escape(term) + r"(?!\w)", re.IGNORECASE)
        text, n = pattern.subn("[REDACTED]", text)
        counts["term"] += n
    apply(PATTERNS[2:])
    return Scrubbed(text, +counts)


def scrub_messages(messages: list[dict[str, Any]], terms: Iterable[str] = ()) -> int:
    """:func:`scrub` every text of chat ``messages`` in place (string contents and ``text`` parts); the number
    of replacements."""
    terms = list(terms)
    total = 0
    for message in messages:
        content = message.get("content")
        parts = [message] if isinstance(content, str) else [p for p in content or () if p.get("type") == "text"]
        key = "content" if isinstance(content, str) else "text"
        for part in parts:
            done = scrub(part[key], terms)
            part[key] = done.text
            total += sum(done.counts.values())
    return total


def _marker(match: re.Match[str], label: str) -> str:
    year = match.groupdict().get("year")
    if year:
        return f"[{year}]"
    return f"[{label.upper()}]"


def _files(paths: Iterable[str | Path]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        candidates = [path] if path.is_file() else sorted(path.rglob("*")) if path.is_dir() else []
        for file in candidates:
            if file.is_file() and file.suffix.lower() in TERM_SUFFIXES and file.stat().st_size <= MAX_TERM_FILE_BYTES:
                yield file
