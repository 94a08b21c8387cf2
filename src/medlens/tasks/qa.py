"""``qa``: a free question about one study (the default task of ``medlens ask``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlens.api import prepare_study
from medlens.privacy import short_hash
from medlens.prompts import auto_final_answer, messages_for, split_thinking
from medlens.tasks.base import Parsed, Task, TaskBuild, TaskOptions, TaskRequest


class QuestionTask(Task):
    name = "qa"
    description = "A question about one study; 'Final Answer: yes/no' and option letters are parsed"
    default_question = None

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        prepared = prepare_study(inputs[0], options.recipe, options.series, options.modality)
        messages = messages_for(prepared, question, instruction=options.instruction, thinking=options.thinking)
        return TaskBuild(
            requests=[TaskRequest(messages, context={"question": question})],
            recipe=prepared.recipe,
            n_images=len(prepared.images),
            warnings=list(prepared.warnings),
            details=study_details(prepared),
        )

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        answer = split_thinking(text).answer
        final = auto_final_answer(answer, context.get("question", ""))
        return Parsed(payload={"answer": answer, "final_answer": final}, final_answer=final)


def study_details(prepared: Any) -> dict[str, Any]:
    """Envelope details of a prepared study: modality, series tag (never the UID), slice counts."""
    return {
        "modality": prepared.modality,
        "family": prepared.family,
        "series": short_hash(prepared.series_uid) if prepared.series_uid else None,
        "n_source_slices": prepared.n_source_slices,
    }
