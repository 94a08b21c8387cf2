"""``ehr-qa``: a question about one patient's record (a FHIR R4 Bundle, or plain-text notes).

The record (read by :mod:`medlens.io.fhir`) becomes a compact summary: the patient line (sex, birth year,
age), then one line per entry, grouped under date headers, oldest first. Entries without a date come
first, under "Undated": their age is unknown, so they count as the oldest, and the newest entries end up
next to the question, which comes last. One text-only request; ``--think`` prepends MedGemma's thinking
instruction.

The summary must fit ``TaskOptions.token_budget`` tokens. Whole entries are left out, oldest first; active
conditions, allergies and medications go only after every other entry, and the patient line never. When
not even the newest entry fits on its own (one long note), the end of its text is kept. Tokens are
estimated (:func:`estimate_tokens`) unless a real counter is given, e.g. the model tokenizer's
``lambda s: len(tokenizer(s).input_ids)``, as ``EhrQuestionTask(count_tokens=...)`` or
``TaskOptions(extra={"count_tokens": ...})``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medlens.io.fhir import ClinicalEntry, read_clinical
from medlens.prompts import auto_final_answer, split_thinking, text_messages
from medlens.tasks.base import Parsed, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest

TokenCounter = Callable[[str], int]

#: characters per token of the estimate (digits apart)
CHARS_PER_TOKEN = 4
_NO_DIGITS = str.maketrans("", "", "0123456789")

INSTRUCTION = (
    "Below is a summary of one patient's health record: the patient, then the entries grouped by date, "
    'oldest first (entries without a date come first, under "Undated"). Use it to answer the question '
    "that follows."
)
CUT_MARK = "[earlier text left out] "


def estimate_tokens(text: str) -> int:
    """A cheap token count: one per digit (Gemma's tokenizer splits numbers into single digits) plus one
    per 4 other characters, rounded up."""
    rest = len(text.translate(_NO_DIGITS))
    return len(text) - rest + -(-rest // CHARS_PER_TOKEN)


@dataclass
class Summary:
    """The summary text, its token count, and which entries it kept and left out."""

    text: str
    tokens: int
    kept: list[ClinicalEntry]
    dropped: list[ClinicalEntry]
    truncated: bool = False


def chronological(entries: Sequence[ClinicalEntry]) -> list[ClinicalEntry]:
    """Patient lines, then undated entries (in reading order), then dated ones oldest first (stable)."""
    patients = [e for e in entries if e.kind == "patient"]
    undated = [e for e in entries if e.date is None and e.kind != "patient"]
    dated = sorted((e for e in entries if e.date is not None and e.kind != "patient"), key=lambda e: e.date)
    return patients + undated + dated


def render(entries: Sequence[ClinicalEntry]) -> str:
    """``Patient: ...``, then ``YYYY-MM-DD:``/``Undated:`` headers with ``- Kind: text`` lines (in the
    order given)."""
    lines: list[str] = []
    group: object = object()
    for entry in entries:
        if entry.kind == "patient":
            lines.append(f"Patient: {entry.text}")
            continue
        day = entry.date.date() if entry.date else None
        if day != group:
            lines.append(f"{day:%Y-%m-%d}:" if day else "Undated:")
            group = day
        lines.append(f"- {entry.kind.capitalize()}: " + entry.text.replace("\n", "\n  "))
    return "\n".join(lines)


def summarize(entries: Sequence[ClinicalEntry], budget: int, count_tokens: TokenCounter = estimate_tokens) -> Summary:
    """The chronological summary within ``budget`` tokens (see the module docstring for what goes first)."""
    ordered = chronological(entries)
    patients = [e for e in ordered if e.kind == "patient"]
    others = ordered[len(patients) :]
    drop_order = [e for e in others if not e.active] + [e for e in others if e.active]

    def attempt(n_dropped: int) -> Summary:
        gone = {id(e) for e in drop_order[:n_dropped]}
        kept = [e for e in ordered if id(e) not in gone]
        text = render(kept)
        return Summary(text, count_tokens(text), kept, drop_order[:n_dropped])

    low, high = 0, len(drop_order)  # dropping more never lengthens the text: bisect the smallest cut
    while low < high:
        mid = (low + high) // 2
        if attempt(mid).tokens <= budget:
            high = mid
        else:
            low = mid + 1
    best = attempt(low)
    if drop_order and low == len(drop_order):
        best = _keep_tail(patients, drop_order, budget, count_tokens) or best
    return best


def _keep_tail(
    patients: list[ClinicalEntry], drop_order: list[ClinicalEntry], budget: int, count_tokens: TokenCounter
) -> Summary | None:
    """The patient lines and as much of the end of the last entry to go as fits, or None."""
    last = drop_order[-1]

    def attempt(n_chars: int) -> Summary:
        kept = [*patients, replace(last, text=CUT_MARK + last.text[len(last.text) - n_chars :])]
        text = render(kept)
        return Summary(text, count_tokens(text), kept, drop_order[:-1], truncated=True)

    low, high = 0, len(last.text)  # the largest tail that fits
    while low < high:
        mid = (low + high + 1) // 2
        if attempt(mid).tokens <= budget:
            low = mid
        else:
            high = mid - 1
    return attempt(low) if low > 0 else None


def cut_report(summary: Summary) -> dict[str, Any]:
    """What was left out: counts by kind, undated count, date range, and whether an entry was truncated."""
    dates = [e.date for e in summary.dropped if e.date]
    return {
        "entries": len(summary.dropped),
        "by_kind": dict(sorted(Counter(e.kind for e in summary.dropped).items())),
        "undated": sum(e.date is None for e in summary.dropped),
        "from": f"{min(dates):%Y-%m-%d}" if dates else None,
        "to": f"{max(dates):%Y-%m-%d}" if dates else None,
        "truncated": summary.truncated,
    }


def describe_cut(cut: dict[str, Any], total: int, budget: int) -> str | None:
    """One sentence about what was cut, or None when nothing was."""
    if not cut["entries"] and not cut["truncated"]:
        return None
    parts = []
    if cut["entries"]:
        kinds = ", ".join(f"{kind} {n}" for kind, n in cut["by_kind"].items())
        span = f" dated {cut['from']} to {cut['to']}" if cut["from"] else ""
        undated = f" ({cut['undated']} undated)" if cut["undated"] else ""
        parts.append(f"left out {cut['entries']} of {total} entries ({kinds}){span}{undated}")
    if cut["truncated"]:
        parts.append("kept only the end of the newest entry")
    return f"the record did not fit the token budget of {budget}: {' and '.join(parts)}"


class EhrQuestionTask(Task):
    name = "ehr-qa"
    description = "A question about a patient's record (FHIR R4 Bundle or plain-text notes), summarised to fit"
    options = (TaskOption("token_budget", int, 6000, "Tokens the patient summary must fit in.", min=200),)
    default_question = None

    def __init__(self, count_tokens: TokenCounter | None = None) -> None:
        self.count_tokens = count_tokens

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        record = read_clinical(inputs[0])
        counter = options.extra.get("count_tokens") or self.count_tokens
        summary = summarize(record.entries, options.token_budget, counter or estimate_tokens)
        cut = cut_report(summary)
        total = len(record.entries)
        warnings = list(record.notes)
        if record.ignored:
            ignored = ", ".join(f"{kind} {n}" for kind, n in sorted(record.ignored.items()))
            warnings.append(f"not summarised (resource types medlens does not read): {ignored}")
        said = describe_cut(cut, total, options.token_budget)
        if said:
            warnings.append(said)
        if summary.tokens > options.token_budget:
            warnings.append(f"the patient line alone takes {summary.tokens} tokens, over the budget")
        prompt = "\n\n".join(
            p for p in (options.instruction or INSTRUCTION, summary.text, _omission(cut), f"Question: {question}") if p
        )
        return TaskBuild(
            requests=[TaskRequest(text_messages(prompt, options.thinking), context={"question": question})],
            n_images=0,
            warnings=warnings,
            details={
                "summary_tokens": summary.tokens,
                "token_budget": options.token_budget,
                "token_counter": "estimate" if counter is None else "given",
                "entries_total": total,
                "entries_kept": total - len(summary.dropped),
                "cut": cut,
                "ignored_resources": dict(sorted(record.ignored.items())),
            },
        )

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        answer = split_thinking(text).answer
        final = auto_final_answer(answer, context.get("question", ""))
        return Parsed(payload={"answer": answer, "final_answer": final}, final_answer=final)


def _omission(cut: dict[str, Any]) -> str | None:
    """The note that tells the model part of the record is missing."""
    if not cut["entries"] and not cut["truncated"]:
        return None
    span = f", dated {cut['from']} to {cut['to']}," if cut["from"] else ""
    what = f"{cut['entries']} entries{span} were" if cut["entries"] else "Part of the newest entry was"
    return f"(Note: {what} left out of this summary to fit the length limit.)"
