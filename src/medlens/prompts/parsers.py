"""Answer parsers: thinking-trace removal, ``Final Answer: yes/no``, multiple-choice letters."""

from __future__ import annotations

import re
from dataclasses import dataclass

THOUGHT_START = "<unused94>"
THOUGHT_END = "<unused95>"

_FINAL = r"final\s+answer\s*(?:is)?\s*[:：]?\s*[*_`\"'(\[]*\s*"
_YES_NO = re.compile(_FINAL + r"(yes|no)\b", re.IGNORECASE)
_CHOICE_FINAL = re.compile(_FINAL + r"([A-J])\b(?![a-z])", re.IGNORECASE)
_CHOICE_PHRASE = re.compile(
    r"(?:answer|option|choice)\s+(?:is\s+)?(?:option\s+)?[*(\[]*([A-J])\b[)\].:]?", re.IGNORECASE
)
_CHOICE_ALONE = re.compile(r"^\s*[*(\[]*([A-J])[)\].:]?(?:\s|$)")
_OPTION_LINE = re.compile(r"(?:^|\n)\s*\(?([A-J])[).:]\s+\S")


@dataclass(frozen=True)
class SplitAnswer:
    """A model's output split into the visible answer and the (optional) thinking trace."""

    answer: str
    thinking: str | None


def split_thinking(raw: str) -> SplitAnswer:
    """Remove the thinking trace: everything up to ``<unused95>``. An unfinished trace leaves no answer."""
    if THOUGHT_END in raw:
        thought, _, answer = raw.partition(THOUGHT_END)
        return SplitAnswer(answer.strip(), _clean_thought(thought))
    if THOUGHT_START in raw:
        return SplitAnswer("", _clean_thought(raw))
    return SplitAnswer(raw.strip(), None)


def _clean_thought(text: str) -> str:
    text = text.replace(THOUGHT_START, "", 1).strip()
    return text[len("thought") :].lstrip() if text.lower().startswith("thought") else text


def parse_yes_no(text: str) -> str | None:
    """The last ``Final Answer: yes|no`` in ``text`` (lower case), else None."""
    found = _YES_NO.findall(text)
    return found[-1].lower() if found else None


def parse_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter: ``Final Answer: B`` first, then "the answer is (B)", then a reply that is
    just the letter. Upper case, restricted to ``letters``; None when nothing matches."""
    allowed = set(letters.upper())
    for pattern in (_CHOICE_FINAL, _CHOICE_PHRASE):
        found = [m.upper() for m in pattern.findall(text) if m.upper() in allowed]
        if found:
            return found[-1]
    match = _CHOICE_ALONE.match(text)
    if match and match.group(1).upper() in allowed and len(text.strip()) <= 80:
        return match.group(1).upper()
    return None


def option_letters(question: str) -> str:
    """Letters of the options listed in a question (``A. ...``/``(B) ...`` lines), or ''."""
    return "".join(dict.fromkeys(m.upper() for m in _OPTION_LINE.findall(question)))


def auto_final_answer(answer: str, question: str) -> str | None:
    """yes/no when the answer states one; else an option letter when the question lists options."""
    yes_no = parse_yes_no(answer)
    if yes_no is not None:
        return yes_no
    letters = option_letters(question)
    return parse_choice(answer, letters) if len(letters) >= 2 else None
