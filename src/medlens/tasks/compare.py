"""``compare``: longitudinal chest X-ray (MS-CXR-T style): prior image, current image, then the question;
the answer is improved, stable or worsened."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from medlens.errors import MedlensError
from medlens.prep import prepare_study
from medlens.prompts import image_messages, split_thinking
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest
from medlens.tasks.comparable import check_comparable

PROGRESSION = ("improved", "stable", "worsened")
#: words models use for each class, mapped to the MS-CXR-T label
_SYNONYMS = {
    "improved": "improved", "improving": "improved", "improvement": "improved", "better": "improved",
    "resolved": "improved", "resolving": "improved", "decreased": "improved",
    "stable": "stable", "unchanged": "stable", "no change": "stable", "no significant change": "stable",
    "worsened": "worsened", "worsening": "worsened", "worse": "worsened", "progressed": "worsened",
    "progression": "worsened", "increased": "worsened",
}  # fmt: skip
_WORDS = "|".join(sorted((re.escape(w) for w in _SYNONYMS), key=len, reverse=True))
_FINAL = re.compile(rf"final\s+answer\s*[:：]?\s*[*_`\"'(\[]*\s*({_WORDS})\b", re.IGNORECASE)
_ANY = re.compile(rf"\b({_WORDS})\b", re.IGNORECASE)
ANSWER_FORMAT = 'Answer with "Final Answer: improved", "Final Answer: stable" or "Final Answer: worsened".'


class CompareTask(Task):
    name = "compare"
    description = "Prior and current chest X-ray: has the finding improved, stayed stable or worsened?"
    min_inputs = max_inputs = 2
    options = (
        TaskOption(
            "allow_different_patients",
            bool,
            False,
            "Compare inputs whose PatientIDs differ (then a warning, not an error).",
        ),
    )
    default_question = (
        "The first image is the prior chest X-ray and the second image is the current one. Compared with the "
        "prior image, have the findings improved, remained stable or worsened?"
    )

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        studies = [
            prepare_study(p, options.recipe, options.series, options.modality, slide=options.slide) for p in inputs
        ]
        for path, study in zip(inputs, studies, strict=True):
            if len(study.images) != 1:
                raise MedlensError(f"compare needs one image per input; {path} gave {len(study.images)}")
        allow = bool(options.extra.get("allow_different_patients", False))
        identity_warnings = check_comparable(inputs, studies, allow)
        order, warning = chronological(studies)
        prior, current = (studies[i] for i in order)
        paths = [inputs[i] for i in order]
        if "final answer" not in question.lower():
            question = f"{question}\n{ANSWER_FORMAT}"
        messages = image_messages([prior.images[0], current.images[0]], question, options.instruction, options.thinking)
        context = {
            "prior": {"file": str(paths[0]), "acquired": prior.acquired},
            "current": {"file": str(paths[1]), "acquired": current.acquired},
            "reordered": order != [0, 1],
        }
        return TaskBuild(
            requests=[TaskRequest(messages, context)],
            recipe=prior.recipe,
            n_images=2,
            warnings=[*([warning] if warning else []), *identity_warnings, *prior.warnings, *current.warnings],
            details={"prior": context["prior"], "current": context["current"], "reordered": context["reordered"]},
        )

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        answer = split_thinking(text).answer
        label = parse_progression(answer)
        if label is None:
            raise ParseError("no improved/stable/worsened answer found")
        payload = {"progression": label, **{k: context[k] for k in ("prior", "current", "reordered") if k in context}}
        return Parsed(payload=payload, final_answer=label)


def parse_progression(answer: str) -> str | None:
    """improved / stable / worsened: the ``Final Answer`` line first, else the only class the text names."""
    final = _FINAL.findall(answer)
    if final:
        return _SYNONYMS[final[-1].lower()]
    named = {_SYNONYMS[m.lower()] for m in _ANY.findall(answer)}
    return named.pop() if len(named) == 1 else None


def chronological(studies: list[Any]) -> tuple[list[int], str | None]:
    """Order (prior first) by acquisition time when both inputs have one; say when the order changed."""
    times = [s.acquired for s in studies]
    if all(times):
        if times[0] > times[1]:
            return [1, 0], f"inputs reordered by acquisition date: prior {_date(times[1])}, current {_date(times[0])}"
        if times[0] == times[1]:
            return [0, 1], "both inputs have the same acquisition date; taking them in the order given"
        return [0, 1], None
    return [0, 1], "no acquisition date on both inputs; taking them in the order given (prior first)"


def _date(stamp: str) -> str:
    return f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}"
