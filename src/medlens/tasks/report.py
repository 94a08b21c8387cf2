"""``report``: a radiology report with findings and impression, for a chest X-ray or a CT/MRI volume."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medlens.prep import Prepared
from medlens.prompts import split_thinking
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOptions
from medlens.tasks.study import study_build

_KINDS = {"ct": "CT volume", "mr": "MRI volume", "radiograph": "radiograph", "color": "image", "wsi": "whole slide"}
_HEADER = re.compile(
    r"^[ \t#>*_]*(findings|impression|conclusion|technique|comparison|indication|history)[ \t*_]*[:：]?[ \t*_]*",
    re.IGNORECASE | re.MULTILINE,
)
_ALIASES = {"conclusion": "impression"}


class ReportTask(Task):
    name = "report"
    description = "A report (findings and impression): radiology for X-rays and CT/MRI, pathology for whole slides"
    default_question = ""

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        def prompt(prepared: Prepared) -> str:
            text = (
                f"Write a {'pathology' if prepared.family == 'wsi' else 'radiology'} report for this "
                f"{_KINDS.get(prepared.family, 'image')}, with a FINDINGS section "
                "describing what is seen and an IMPRESSION section with the main conclusions."
            )
            return f"{text}\n{question}" if question else text

        return study_build(inputs[0], prompt, options)

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        answer = split_thinking(text).answer.strip()
        if not answer:
            raise ParseError("the model wrote no report")
        sections = split_sections(answer)
        warnings = []
        if "findings" not in sections and "impression" not in sections:
            sections = {"findings": answer}
            warnings.append("no FINDINGS/IMPRESSION headers in the report; the whole text is taken as findings")
        payload = {
            "findings": sections.pop("findings", None),
            "impression": sections.pop("impression", None),
            "other_sections": sections,
        }
        return Parsed(payload=payload, final_answer=payload["impression"], warnings=warnings)


def split_sections(text: str) -> dict[str, str]:
    """Section name (lower case) -> its text, for the headers models write (``FINDINGS:``, ``**Impression**``)."""
    matches = list(_HEADER.finditer(text))
    sections: dict[str, str] = {}
    ends = [m.start() for m in matches[1:]] + [len(text)]
    for match, end in zip(matches, ends[: len(matches)], strict=True):
        name = _ALIASES.get(match.group(1).lower(), match.group(1).lower())
        body = text[match.end() : end].strip()
        if body:
            sections[name] = f"{sections[name]}\n{body}" if name in sections else body
    return sections
