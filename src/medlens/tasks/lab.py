"""``lab-extract``: the tests of a lab report (PDF or page image) as rows, one request per page.

Each page image is followed by the extraction prompt; the answer is a JSON list of tests with name, result,
unit, range, panel, method, specimen and sample_collection_time (DD-MM-YYYY HH:MM:SS), as in MedGemma's
lab-report evaluation (scored with macro and micro F1 over the rows).
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from medlens.prompts import image_messages, split_thinking
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest
from medlens.tasks.jsonout import cut_unfinished, find_json

FIELDS = ("name", "result", "unit", "range", "panel", "method", "specimen", "sample_collection_time")
TIME_FORMAT = "%d-%m-%Y %H:%M:%S"

EXTRACTION_PROMPT = """\
This image is one page of a laboratory report. List every test result printed on it.

Reply with a JSON list and nothing else: one object per test, each with exactly these keys:
- "name": the test as printed (for example "Haemoglobin")
- "result": the value as printed, as a string, keeping signs such as "<" and words such as "Negative"
- "unit": the unit of the result
- "range": the reference or normal range as printed
- "panel": the heading or panel the test is listed under
- "method": the method of measurement, if printed
- "specimen": the sample material, for example "Serum", "Whole blood" or "Urine"
- "sample_collection_time": when the sample was collected, written as DD-MM-YYYY HH:MM:SS
Use null for anything the page does not show. Do not guess. If the page shows no test results, reply []."""

#: field -> the other names models give it (keys are lower-cased, every run of other characters turned to "_")
ALIASES = {
    "name": "test test_name testname analyte parameter investigation component",
    "result": "value result_value test_result observed_value measured_value",
    "unit": "units uom unit_of_measure unit_of_measurement",
    "range": "reference_range ref_range normal_range reference_interval reference reference_value reference_values "
    "normal_value normal_values ref_interval bio_ref_interval biological_reference_interval",
    "panel": "panel_name test_panel section group profile department",
    "method": "methodology technique",
    "specimen": "sample sample_type specimen_type sample_material",
    "sample_collection_time": "collection_time collected collected_at collected_on collection_date "
    "collection_datetime collection_date_time sample_collected sample_collected_at sample_collected_on "
    "sample_collection_date sample_time date_collected date_time_collected",
}
SYNONYMS = {alias: field for field, aliases in ALIASES.items() for alias in aliases.split()}
#: keys under which a wrapping object holds its list of tests
LIST_KEYS = ("tests", "results", "lab_tests", "lab_results", "test_results")
#: fields a wrapping object (report or panel) hands down to the tests it holds
INHERITED = ("panel", "method", "specimen", "sample_collection_time")
_MAX_DEPTH = 4

_STRICT_TIME = re.compile(r"\d{2}-\d{2}-\d{4} \d{2}:\d{2}:\d{2}")
_NO_SECONDS = re.compile(r"(\d{2}-\d{2}-\d{4}) (\d{2}:\d{2})")
_ISO_TIME = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})(?::(\d{2}))?(?:\.\d+)?(?:Z|[+-]\d{2}:?\d{2})?", re.IGNORECASE
)


class LabTest(BaseModel):
    """One row of a lab report. Values are kept as printed (strings); absent ones are None."""

    name: str = Field(min_length=1)
    result: str | None = None
    unit: str | None = None
    range: str | None = None
    panel: str | None = None
    method: str | None = None
    specimen: str | None = None
    sample_collection_time: str | None = None
    page: int | None = None

    @field_validator(*FIELDS, mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> str | None:
        return as_text(value)

    @field_validator("sample_collection_time")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        return normalise_time(value)

    @property
    def time_is_valid(self) -> bool:
        """True when the collection time is absent or a real DD-MM-YYYY HH:MM:SS date and time."""
        return self.sample_collection_time is None or _valid_time(self.sample_collection_time)

    def key(self) -> tuple[str | None, ...]:
        """The eight fields, for de-duplication (the page is not part of it)."""
        return tuple(getattr(self, f) for f in FIELDS)


class LabReport(BaseModel):
    """The payload: every test found, in page order, and the number of pages read."""

    tests: list[LabTest] = Field(default_factory=list)
    pages: int = Field(default=1, ge=1)


def as_text(value: Any) -> str | None:
    """A field value as a string: numbers as written, ``[low, high]`` / ``{"low", "high"}`` as "low-high"."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        low = value.get("low", value.get("min"))
        high = value.get("high", value.get("max"))
        if low is not None and high is not None:
            return f"{as_text(low)}-{as_text(high)}"
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        parts = [as_text(v) for v in value]
        joiner = "-" if len(parts) == 2 and all(isinstance(v, int | float) for v in value) else ", "
        return joiner.join(p for p in parts if p) or None
    text = str(value).strip()
    return None if text.lower() in ("", "null") else text


def normalise_time(value: str | None) -> str | None:
    """DD-MM-YYYY HH:MM:SS from the forms that are unambiguous (ISO 8601, missing seconds); else unchanged."""
    if value is None or _STRICT_TIME.fullmatch(value):
        return value
    if match := _NO_SECONDS.fullmatch(value):
        return f"{match[1]} {match[2]}:00"
    if match := _ISO_TIME.fullmatch(value):
        year, month, day, hour, minute, second = match.groups()
        return f"{day}-{month}-{year} {hour}:{minute}:{second or '00'}"
    return value


def _valid_time(value: str) -> bool:
    try:
        datetime.strptime(value, TIME_FORMAT)
    except ValueError:
        return False
    return bool(_STRICT_TIME.fullmatch(value))


def normalise_key(key: str) -> str:
    """``"Reference Range"`` -> ``"range"``; unknown keys come back lower-cased with underscores."""
    norm = re.sub(r"[^0-9a-z]+", "_", str(key).lower()).strip("_")
    return SYNONYMS.get(norm, norm)


def parse_tests(text: str, page: int = 1) -> tuple[list[LabTest], list[str]]:
    """The tests in one raw output and the warnings; raises ParseError when there is nothing usable."""
    split = split_thinking(text)
    if split.thinking is not None and not split.answer:
        raise ParseError("the output ended inside the thinking trace (no answer; raise max_new_tokens)")
    found = find_json(text)
    warnings = list(found.warnings)
    if found.repaired and (complete := cut_unfinished(text)) is not None:
        if not complete:
            raise ParseError("the output was cut off before its first test was complete")
        found = find_json(complete)  # JSON cut off mid-row (max_new_tokens): keep only the complete rows
        warnings.append("the output was cut off; the unfinished last entry was dropped")
    rows: list[dict[str, Any]] = []
    ignored: set[str] = set()
    dropped = _collect(found.value, {}, rows, ignored, depth=0)
    tests: list[LabTest] = []
    for row in rows:
        try:
            tests.append(LabTest(**row, page=page))
        except ValidationError:
            dropped += 1
    if found.value and not tests:
        raise ParseError("the JSON holds no test with a name")
    if dropped:
        warnings.append(f"dropped {dropped} entr{'y' if dropped == 1 else 'ies'} without a test name")
    if ignored:
        warnings.append(f"ignored keys: {', '.join(sorted(ignored))}")
    bad_times = sorted({t.sample_collection_time for t in tests if not t.time_is_valid})
    for value in bad_times:
        warnings.append(f"sample_collection_time {value!r} is not DD-MM-YYYY HH:MM:SS; kept as written")
    unique, removed = dedupe(tests)
    if removed:
        warnings.append(f"removed {removed} repeated row(s)")
    return unique, warnings


def _collect(value: Any, inherited: dict[str, Any], rows: list[dict[str, Any]], ignored: set[str], depth: int) -> int:
    """Walk lists, wrapping objects and panel groups; append test rows; return how many entries were dropped."""
    if depth > _MAX_DEPTH:
        return 1
    if isinstance(value, list):
        return sum(_collect(item, inherited, rows, ignored, depth + 1) for item in value)
    if not isinstance(value, dict):
        return 1
    fields: dict[str, Any] = {}
    nested: list[Any] = []
    other_lists: list[Any] = []
    for raw_key, item in sorted(value.items(), key=lambda kv: normalise_key(kv[0]) != str(kv[0]).lower()):
        key = normalise_key(raw_key)
        if key in LIST_KEYS and isinstance(item, list):
            nested.append(item)
        elif key in FIELDS:
            if fields.get(key) is None:  # exact keys come first and win over synonyms
                fields[key] = item
        elif isinstance(item, list) and item and all(isinstance(i, dict) for i in item):
            other_lists.append(item)  # {"Haematology": [...]}: tests under some other name
        else:
            ignored.add(str(raw_key))
    if not nested and not as_text(fields.get("name")):
        nested = other_lists
    if nested:  # a report or a panel holding tests: its own fields go down to them
        group = {k: v for k, v in fields.items() if k in INHERITED and as_text(v) is not None}
        if "panel" not in group and as_text(fields.get("name")):
            group["panel"] = fields["name"]
        return sum(_collect(item, {**inherited, **group}, rows, ignored, depth + 1) for item in nested)
    if not as_text(fields.get("name")):
        return 1
    rows.append({**inherited, **{k: v for k, v in fields.items() if as_text(v) is not None or k not in inherited}})
    return 0


def dedupe(tests: list[LabTest]) -> tuple[list[LabTest], int]:
    """Drop rows whose eight fields repeat an earlier row's; returns the rows kept and how many were removed."""
    seen: set[tuple[str | None, ...]] = set()
    kept = []
    for test in tests:
        if test.key() not in seen:
            seen.add(test.key())
            kept.append(test)
    return kept, len(tests) - len(kept)


class LabExtractTask(Task):
    name = "lab-extract"
    description = "Tests of a lab report (PDF or page image) as JSON rows or CSV; one request per page"
    options = (TaskOption("dpi", int, 150, "Resolution PDF pages are rendered at.", min=50, max=600),)
    default_question = ""

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        from medlens.io.pdf import is_pdf, read_pages

        source = inputs[0]
        pages = read_pages(source, dpi=options.dpi)
        prompt = options.instruction or EXTRACTION_PROMPT
        if question:
            prompt = f"{prompt}\n\nAdditional instructions: {question}"
        requests = [
            TaskRequest(image_messages([page], prompt, thinking=options.thinking), context={"page": n})
            for n, page in enumerate(pages, start=1)
        ]
        kind = "pdf" if source.is_file() and is_pdf(source) else "image"
        return TaskBuild(
            requests=requests,
            n_images=len(pages),
            details={"source": kind, "pages": len(pages), "dpi": options.dpi if kind == "pdf" else None},
        )

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        tests, warnings = parse_tests(text, page=int(context.get("page", 1)))
        payload = LabReport(tests=tests, pages=1).model_dump(mode="json")
        return Parsed(payload=payload, final_answer=_summary(len(tests)), warnings=warnings)

    def combine(self, parsed: list[Parsed]) -> Parsed:
        """Pages in order, repeated rows removed; failed pages become warnings (an error only if all failed)."""
        if len(parsed) == 1:
            return parsed[0]
        tests: list[LabTest] = []
        warnings: list[str] = []
        failed: list[str] = []
        for n, page in enumerate(parsed, start=1):
            warnings += [f"page {n}: {w}" for w in page.warnings]
            if page.payload is None:
                failed.append(f"page {n}: {page.error}")
                continue
            tests += [LabTest(**row) for row in page.payload.get("tests", [])]
        if len(failed) == len(parsed):
            return Parsed(warnings=warnings, error="no page could be parsed (" + "; ".join(failed) + ")")
        warnings += [f"could not parse {f}" for f in failed]
        tests, removed = dedupe(tests)
        if removed:
            warnings.append(f"removed {removed} row(s) repeated across pages")
        payload = LabReport(tests=tests, pages=len(parsed)).model_dump(mode="json")
        return Parsed(payload=payload, final_answer=_summary(len(tests)), warnings=warnings)

    def render(self, payload: dict[str, Any], fmt: str) -> str | None:
        if fmt != "csv":
            return None
        return to_csv(payload)


def to_csv(payload: dict[str, Any]) -> str:
    """The tests as CSV: a header row (page and the eight fields), then one row per test."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(("page", *FIELDS))
    for test in payload.get("tests") or []:
        writer.writerow([_cell(test.get(f)) for f in ("page", *FIELDS)])
    return out.getvalue()


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _summary(n: int) -> str:
    return f"{n} test{'' if n == 1 else 's'}"
