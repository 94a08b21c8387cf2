"""Hook kinds: how a benchmark item becomes a request and a model output becomes a prediction.

A benchmark's YAML names its kind; the kind reads the item fields it needs (``question``, ``options``,
``image``, ``label``, ``target`` ...), builds MedGemma-layout messages and parses the output.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from medlens.chat import Messages
from medlens.errors import MedlensError
from medlens.prompts import image_messages, messages_for, parse_choice, parse_yes_no, split_thinking, text_messages
from medlens.registry import Registry

Item = dict[str, Any]


@dataclass
class Query:
    """One request of a benchmark item and what the parser needs."""

    messages: Messages
    files: list[Path] = field(default_factory=list)  # inputs whose content keys the journal
    context: dict[str, Any] = field(default_factory=dict)


class Kind:
    """Base hook: subclasses implement ``query`` and ``predict``; targets and groups come from the item."""

    def __init__(self, spec: Any, recipe: str = "medgemma-1.5") -> None:
        self.spec, self.recipe = spec, recipe
        self._prepare = lru_cache(maxsize=4)(self._prepare_path)

    def query(self, item: Item) -> Query:
        raise NotImplementedError

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        raise NotImplementedError

    def target(self, item: Item) -> Any:
        return item.get("target")

    def group(self, item: Item) -> str | None:
        return item.get("group")

    def path(self, item: Item, key: str = "image") -> Path:
        value = item.get(key)
        if not value:
            raise MedlensError(f"item {item.get('id')} has no {key!r} field")
        path = Path(value)
        return path if path.is_absolute() else Path(item["_base"]) / path

    def prepared(self, path: Path) -> Any:
        """The prepared study of ``path`` (cached: items asking about one volume share its preparation)."""
        return self._prepare(str(path))

    def _prepare_path(self, path: str) -> Any:
        from medlens.prep import prepare_study

        return prepare_study(path, self.recipe, modality=self.spec.options.get("modality"))

    def fill(self, **values: Any) -> str:
        return self.spec.prompt.format(**values).strip()


KINDS: Registry[Callable[..., Kind]] = Registry("benchmark kind")


def _answer(text: str) -> str:
    return split_thinking(text).answer


def _options_text(options: Any) -> tuple[str, str]:
    """Option lines ``A. ...`` and their letters, from a dict {A: text} or a list."""
    pairs = list(options.items()) if isinstance(options, dict) else list(zip("ABCDEFGHIJ", options, strict=False))
    return "\n".join(f"{k}. {v}" for k, v in pairs), "".join(str(k) for k, _ in pairs)


@KINDS.register("mcq")
class MultipleChoice(Kind):
    """Question + lettered options (MedQA, MedMCQA, MMLU, MedXpertQA, AfriMed-QA; with an image: PathMCQA)."""

    def query(self, item: Item) -> Query:
        options, letters = _options_text(item["options"])
        prompt = self.fill(question=item["question"], options=options)
        if item.get("image"):
            path = self.path(item)
            return Query(messages_for(self.prepared(path), prompt), [path], {"letters": letters})
        return Query(text_messages(prompt, self.spec.generation.get("thinking", False)), [], {"letters": letters})

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return parse_choice(_answer(text), context.get("letters", "ABCD"))


@KINDS.register("closed_label")
class ClosedLabel(Kind):
    """A text question answered with one of a few labels (PubMedQA yes/no/maybe, EHRQA)."""

    def query(self, item: Item) -> Query:
        prompt = self.fill(**{k: v for k, v in item.items() if not k.startswith("_")})
        return Query(text_messages(prompt, self.spec.generation.get("thinking", False)))

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        labels = [str(label).lower() for label in self.spec.options.get("labels", ["yes", "no"])]
        words = "|".join(re.escape(label) for label in labels)
        answer = _answer(text).lower()
        final = re.findall(rf"final\s+answer\s*[:：]?\s*[*_`\"'(\[]*\s*({words})\b", answer)
        if final:
            return final[-1]
        named = set(re.findall(rf"\b({words})\b", answer))
        return named.pop() if len(named) == 1 else None


@KINDS.register("vqa")
class VisualQuestion(Kind):
    """An image and an open or closed question (VQA-RAD, SLAKE); the prediction is the answer text."""

    def query(self, item: Item) -> Query:
        path = self.path(item)
        prompt = self.fill(question=item["question"])
        return Query(messages_for(self.prepared(path), prompt), [path])

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        answer = _answer(text).strip()
        final = re.split(r"final\s+answer\s*[:：]\s*", answer, flags=re.IGNORECASE)
        return final[-1].strip().strip("*").strip() if answer else None


@KINDS.register("condition")
class ConditionQuestion(Kind):
    """One condition at a time, yes/no, about an image or a volume (MIMIC-CXR/CheXpert/CXR14, CT-RATE,
    CT and MRI datasets); ``group`` is the condition, so per-condition metrics follow."""

    def query(self, item: Item) -> Query:
        path = self.path(item)
        prompt = self.fill(label=item["label"], what=self.spec.options.get("what", "image"))
        return Query(messages_for(self.prepared(path), prompt), [path])

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return parse_yes_no(_answer(text))

    def group(self, item: Item) -> str | None:
        return item.get("group") or item.get("label")


@KINDS.register("open_diagnosis")
class OpenDiagnosis(VisualQuestion):
    """Free-text diagnosis (MedPix case style); targets carry the answer and its synonyms."""

    def target(self, item: Item) -> Any:
        synonyms = item.get("synonyms") or []
        return [item.get("target"), *synonyms] if synonyms else item.get("target")


@KINDS.register("images_text")
class ImagesText(Kind):
    """Several images (e.g. the patches of a whole slide) then an instruction; free-text prediction (WSI
    description, scored with ROUGE-L). Item fields: ``images`` (paths) and any prompt placeholders."""

    def query(self, item: Item) -> Query:
        paths = [Path(p) if Path(p).is_absolute() else Path(item["_base"]) / p for p in item["images"]]
        images = [img for path in paths for img in self.prepared(path).images]
        prompt = self.fill(**{k: v for k, v in item.items() if not k.startswith("_") and isinstance(v, str)})
        return Query(image_messages(images, prompt), paths)

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return _answer(text).strip() or None


@KINDS.register("task")
class TaskKind(Kind):
    """Items run through a registered medlens task (localize, compare, lab-extract, ehr-qa, report ...);
    ``options.prediction`` names the payload field that is the prediction."""

    def __init__(self, spec: Any, recipe: str = "medgemma-1.5") -> None:
        from medlens.tasks import TaskOptions, get_task

        super().__init__(spec, recipe)
        self.task = get_task(spec.options["task"])
        self.options = TaskOptions(recipe=recipe, **spec.options.get("task_options", {}))

    def query(self, item: Item) -> Query:
        keys = self.spec.options.get("inputs", ["image"])
        paths = [self.path(item, key) for key in keys]
        build = self.task.build(paths, item.get("question") or "", self.options)
        (request,) = build.requests
        return Query(request.messages, paths, request.context)

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        from medlens.tasks.runner import parse_output

        parsed = parse_output(self.task, text, context)
        if parsed.payload is None:
            return None
        return parsed.payload.get(self.spec.options.get("prediction", "final_answer"), parsed.final_answer)


@KINDS.register("report_findings")
class ReportFindings(Kind):
    """A text report in, the present findings out, from a fixed label list (``iu-cxr-findings``)."""

    def query(self, item: Item) -> Query:
        labels = self.spec.options["labels"]
        prompt = self.fill(report=item["report"], labels=", ".join(labels))
        return Query(text_messages(prompt, self.spec.generation.get("thinking", False)))

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return findings_in(_answer(text), self.spec.options["labels"])


def findings_in(answer: str, labels: list[str]) -> list[str] | None:
    """The labels in the answer's JSON list (case-insensitive); None when the answer has no JSON list.
    Free text is not scanned for label words: "no pleural effusion" names the label it denies."""
    from medlens.tasks.base import ParseError
    from medlens.tasks.jsonout import find_json

    try:
        value = find_json(answer).value
    except ParseError:
        return None
    if not isinstance(value, list):
        return None
    named = {str(v).strip().lower() for v in value}
    return sorted(label for label in labels if label.lower() in named)
