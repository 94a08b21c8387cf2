"""``qa``: a free question about one study (the default task of ``medlens ask``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medlens.prompts import auto_final_answer, split_thinking
from medlens.tasks.base import Parsed, Task, TaskBuild, TaskOptions
from medlens.tasks.study import study_build


class QuestionTask(Task):
    name = "qa"
    description = "A question about one study; 'Final Answer: yes/no' and option letters are parsed"
    default_question = None

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        return study_build(inputs[0], question, options, {"question": question})

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        answer = split_thinking(text).answer
        final = auto_final_answer(answer, context.get("question", ""))
        return Parsed(payload={"answer": answer, "final_answer": final}, final_answer=final)
