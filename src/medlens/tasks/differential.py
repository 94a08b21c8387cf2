"""``differential``: two-stage reasoning. Stage 1, the vision model lists the findings in the images as JSON;
stage 2, a text reasoning model (``--reasoner``, default the same model) ranks a differential diagnosis that
cites those findings. Both stages' raw outputs are kept in the envelope."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator

from medlens.prompts import text_messages
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest
from medlens.tasks.jsonout import find_json
from medlens.tasks.study import study_build

FINDINGS_PROMPT = (
    "List every imaging finding you see, normal or abnormal, as a JSON list. Each item is an object with the "
    'keys "finding" (short description), "location" (anatomical location or null), "severity" ("mild", '
    '"moderate", "severe" or null) and "confidence" (a number from 0 to 1). Reply with the JSON list only.'
)
REASONING_PROMPT = (
    "You are given imaging findings, numbered, extracted from a study{context}.\n\nFindings:\n{findings}\n\n"
    "Give a ranked differential diagnosis as a JSON list, most likely first. Each item is an object with the keys "
    '"rank" (1, 2, ...), "diagnosis", "likelihood" ("high", "medium" or "low"), "supporting_findings" (the '
    'numbers of the findings above that support it) and "reasoning" (one sentence). Reply with the JSON list only.'
)


class Finding(BaseModel):
    finding: str = Field(min_length=1)
    location: str | None = None
    severity: Literal["mild", "moderate", "severe"] | None = None
    confidence: float | None = Field(default=None, ge=0, le=1)

    @field_validator("severity", mode="before")
    @classmethod
    def _severity(cls, value: Any) -> Any:
        value = str(value).strip().lower() if value is not None else None
        return value if value in ("mild", "moderate", "severe") else None


class Diagnosis(BaseModel):
    rank: int = Field(ge=1)
    diagnosis: str = Field(min_length=1)
    likelihood: Literal["high", "medium", "low"] | None = None
    supporting_findings: list[int] = Field(default_factory=list)
    reasoning: str | None = None

    @field_validator("likelihood", mode="before")
    @classmethod
    def _likelihood(cls, value: Any) -> Any:
        value = str(value).strip().lower() if value is not None else None
        return {"moderate": "medium"}.get(value, value) if value in ("high", "medium", "moderate", "low") else None


class DifferentialTask(Task):
    name = "differential"
    description = "Two stages: findings from the images (JSON), then a ranked differential citing them (--reasoner)"
    options = (
        TaskOption("reasoner", str | None, None, "Text model of stage 2 (default: the same model; same engine)."),
    )
    default_question = ""

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        return study_build(inputs[0], FINDINGS_PROMPT, options, {"stage": 1})

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        if context.get("stage", 1) == 1:
            items, warnings = _validated(text, Finding, "finding")
            return Parsed(payload={"findings": items}, warnings=warnings)
        items, warnings = _validated(text, Diagnosis, "diagnosis")
        n_findings = int(context.get("n_findings", 0))
        for item in items:
            cited = item["supporting_findings"]
            item["supporting_findings"] = [i for i in cited if 1 <= i <= n_findings]
            if len(item["supporting_findings"]) != len(cited):
                warnings.append(f"{item['diagnosis']}: citations of findings that do not exist were dropped")
        items.sort(key=lambda d: d["rank"])
        top = items[0]["diagnosis"] if items else None
        return Parsed(payload={"differential": items}, final_answer=top, warnings=warnings)

    def second_stage(self, first: Parsed, question: str, options: TaskOptions) -> TaskBuild | None:
        findings = (first.payload or {}).get("findings") or []
        if not findings:
            return None
        numbered = "\n".join(f"{i}. {_describe(f)}" for i, f in enumerate(findings, start=1))
        context = f" (clinical question: {question})" if question else ""
        prompt = REASONING_PROMPT.format(context=context, findings=numbered)
        return TaskBuild(
            requests=[TaskRequest(text_messages(prompt, options.thinking), {"stage": 2, "n_findings": len(findings)})]
        )

    def merge(self, first: Parsed, second: Parsed) -> Parsed:
        payload = {**(first.payload or {}), "differential": (second.payload or {}).get("differential", [])}
        error = f"stage 2: {second.error}" if second.error else None
        return Parsed(payload=payload, final_answer=second.final_answer, warnings=first.warnings, error=error)


def _validated(text: str, model: type[BaseModel], what: str) -> tuple[list[dict[str, Any]], list[str]]:
    """A JSON list of ``model`` items from ``text``; invalid items are dropped with a warning."""
    found = find_json(text)
    value = found.value
    if isinstance(value, dict):
        value = next((v for v in value.values() if isinstance(v, list)), [value])
    items, warnings = [], list(found.warnings)
    for raw in value if isinstance(value, list) else []:
        try:
            items.append(model.model_validate(raw).model_dump())
        except ValidationError as exc:
            warnings.append(f"dropped an invalid {what}: {exc.errors()[0]['msg']} ({json.dumps(raw)[:80]})")
    if not items:
        raise ParseError(f"no valid {what} in the model output")
    return items, warnings


def _describe(finding: dict[str, Any]) -> str:
    parts = [finding["finding"]]
    if finding.get("location"):
        parts.append(f"location: {finding['location']}")
    if finding.get("severity"):
        parts.append(f"severity: {finding['severity']}")
    return "; ".join(parts)
