"""An optional LLM judge for free-text answers (MedPix-style diagnosis): any backend decides whether a
prediction names the same diagnosis as the reference. Verdicts are journaled like model outputs."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from medlens import __version__
from medlens.backends import Backend, GenerationRequest
from medlens.journal import Journal
from medlens.prompts import parse_yes_no, split_thinking, text_messages

JUDGE_PROMPT = (
    "You are grading an answer to a medical case question.\n"
    "Reference diagnosis: {reference}\n"
    "Candidate answer: {candidate}\n\n"
    "Does the candidate answer name the same diagnosis as the reference (synonyms and more specific forms count, "
    'a different or vaguer diagnosis does not)? Answer with "Final Answer: yes" or "Final Answer: no".'
)
_TEMPLATE_HASH = hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()[:16]


def judge_verdicts(samples: list[dict[str, Any]], judge: Backend, revision: str, journal: Journal) -> list[str]:
    """``yes``/``no`` per sample (an unparsed verdict or a missing prediction counts as ``no``)."""
    keys, requests, pending = [], [], []
    for i, sample in enumerate(samples):
        reference = sample["target"] if isinstance(sample["target"], str) else " / ".join(map(str, sample["target"]))
        prompt = JUDGE_PROMPT.format(reference=reference, candidate=sample["prediction"] or "(no answer)")
        key = hashlib.sha256(
            json.dumps(
                {"judge": revision, "prompt": prompt, "template": _TEMPLATE_HASH, "medlens": __version__}
            ).encode()
        ).hexdigest()
        keys.append(key)
        if sample["prediction"] and journal.get(key) is None:
            pending.append(i)
            requests.append(GenerationRequest(text_messages(prompt), max_new_tokens=64))
    for i, output in zip(pending, judge.generate(requests), strict=True):
        journal.add({"key": keys[i], "id": samples[i]["id"], "kind": "judge", "raw_output": output.text})
    verdicts = []
    for sample, key in zip(samples, keys, strict=True):
        record = journal.get(key) if sample["prediction"] else None
        verdict = parse_yes_no(split_thinking(record["raw_output"]).answer) if record else None
        verdicts.append(verdict or "no")
    return verdicts
