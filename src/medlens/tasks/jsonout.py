"""Finding JSON in what models really write: code fences or not, prose around it, a thinking trace before
``<unused95>``, a trailing ``Final Answer:`` line, a truncated last element. Repairs go through json-repair
and are reported, never silent."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from medlens.prompts.parsers import split_thinking
from medlens.tasks.base import ParseError

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.DOTALL)


@dataclass
class FoundJSON:
    value: Any
    repaired: bool = False
    warnings: list[str] = field(default_factory=list)


def find_json(text: str) -> FoundJSON:
    """The first JSON array or object in ``text`` (after removing any thinking trace)."""
    answer = split_thinking(text).answer or text
    candidates = [m.group(1) for m in _FENCE.finditer(answer) if m.group(1).strip()]
    candidates.append(answer)
    for candidate in candidates:
        start = _first_bracket(candidate)
        if start is None:
            continue
        body = candidate[start:]
        exact = _exact(body)
        if exact is not None:
            return FoundJSON(exact)
        repaired = _repair(body)
        if repaired is not None:
            return FoundJSON(repaired, True, ["the model's JSON was malformed and has been repaired"])
    raise ParseError("no JSON found in the model output")


def _first_bracket(text: str) -> int | None:
    positions = [i for i in (text.find("["), text.find("{")) if i >= 0]
    return min(positions) if positions else None


def _exact(body: str) -> Any:
    """Valid JSON from the start of ``body``, ignoring whatever follows it."""
    try:
        value, _ = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError:
        return None
    return value


def _repair(body: str) -> Any:
    import json_repair

    end = max(body.rfind("]"), body.rfind("}"))
    for attempt in (body, body[: end + 1] if end > 0 else body):
        try:
            value = json_repair.loads(attempt)
        except Exception:  # json-repair gives up in several ways
            continue
        if isinstance(value, list | dict) and value:
            return value
    return None


def cut_unfinished(text: str) -> str | None:
    """The answer up to its last closed object when another object was opened after it (a reply cut off at
    max_new_tokens mid-element), else None. Returns "" when not even the first object was closed."""
    answer = split_thinking(text).answer or text
    end = answer.rfind("}")
    if "{" not in answer[end + 1 :]:
        return None
    return answer[: end + 1] if end >= 0 else ""
