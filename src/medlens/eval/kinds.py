"""Hook kinds: how a benchmark item becomes a request and a model output becomes a prediction.

A benchmark's YAML names its kind; the kind reads the item fields it needs (``question``, ``options``,
``image``, ``label``, ``target`` ...), builds MedGemma-layout messages and parses the output. Each kind
declares the ``options:`` it reads as a pydantic model (``options_model``), checked when the file is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, ClassVar, get_args, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from medlens.chat import Messages
from medlens.errors import MedlensError, UnknownNameError
from medlens.eval.checks import SpecProblem, suggestion, validated
from medlens.prep.recipes import DEFAULT_RECIPE
from medlens.prompts import image_messages, messages_for, parse_choice, parse_yes_no, split_thinking, text_messages
from medlens.registry import Registry

Item = dict[str, Any]
#: prepared studies a kind keeps for items that come back to them (the runner keeps each study's questions
#: in one batch, so a small cache suffices; each entry is a whole prepared study, 17 MB for 85 slices of 256 px)
PREPARED_CACHE = 2
STRICT = ConfigDict(extra="forbid", strict=True)


class KindOptions(BaseModel):
    """Options every kind takes: ``loader_options`` (keywords of a built-in ``data.loader``)."""

    model_config = STRICT

    loader_options: dict[str, Any] = Field(default_factory=dict)


class OpenOptions(KindOptions):
    """The options of a user hook kind that declares no model of its own: anything goes."""

    model_config = ConfigDict(extra="allow", strict=True)

    modality: str | None = None


class ImageOptions(KindOptions):
    """Kinds that prepare images: ``modality`` overrides the one read from the files (CT, MR, CR ...)."""

    modality: str | None = None


class ConditionOptions(ImageOptions):
    what: str = "image"  # what the prompt calls the study ("chest X-ray", "CT volume")


class DiagnosisOptions(ImageOptions):
    judge: bool = False  # free-text answers an LLM judge may grade (--judge)


class LabelOptions(KindOptions):
    labels: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["yes", "no"])


class FindingsOptions(KindOptions):
    labels: Annotated[list[str], Field(min_length=1)]


class TaskKindOptions(KindOptions):
    """A registered task, the item fields that are its inputs, the payload field that is the prediction,
    and the task's settings (``task_options``: the general ones and the task's own, see ``medlens tasks``)."""

    task: str
    inputs: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["image"])
    prediction: str = "final_answer"
    task_options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("task")
    @classmethod
    def _registered(cls, name: str) -> str:
        from medlens.tasks import TASKS

        try:
            TASKS.get(name)
        except UnknownNameError as exc:
            raise ValueError(exc.reason) from None
        return name


@dataclass
class Query:
    """One request of a benchmark item and what the parser needs."""

    messages: Messages
    files: list[Path] = field(default_factory=list)  # inputs whose content keys the journal
    context: dict[str, Any] = field(default_factory=dict)


class Kind:
    """Base hook: subclasses implement ``query`` and ``predict``; targets and groups come from the item.
    ``self.options`` holds the spec's ``options`` validated by ``options_model``."""

    options_model: ClassVar[type[BaseModel]] = OpenOptions

    def __init__(self, spec: Any, recipe: str = DEFAULT_RECIPE) -> None:
        self.spec, self.recipe = spec, recipe
        self.options: Any = self.check_options(spec.options)
        self._prepare = lru_cache(maxsize=PREPARED_CACHE)(self._prepare_path)

    @classmethod
    def check_options(cls, raw: dict[str, Any]) -> BaseModel:
        """The validated ``options:`` of a benchmark of this kind (:class:`SpecProblem` when invalid)."""
        return validated(cls.options_model, raw, ("options",))

    @property
    def thinking(self) -> bool:
        """Whether the benchmark's generation settings switch on thinking mode."""
        return bool(self.spec.generation.thinking)

    def files(self, item: Item) -> list[Path]:
        """The input files of ``item``, found without reading them: they key the journal, so a resumed run
        knows what is done before preparing anything. A kind that does not say builds the query to find out."""
        return self.query(item).files

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

        return prepare_study(path, self.recipe, modality=getattr(self.options, "modality", None))

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

    options_model = ImageOptions

    def files(self, item: Item) -> list[Path]:
        return [self.path(item)] if item.get("image") else []

    def query(self, item: Item) -> Query:
        options, letters = _options_text(item["options"])
        prompt = self.fill(question=item["question"], options=options)
        files = self.files(item)
        if files:
            messages = messages_for(self.prepared(files[0]), prompt, thinking=self.thinking)
            return Query(messages, files, {"letters": letters})
        return Query(text_messages(prompt, self.thinking), [], {"letters": letters})

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return parse_choice(_answer(text), context.get("letters", "ABCD"))


@KINDS.register("closed_label")
class ClosedLabel(Kind):
    """A text question answered with one of a few labels (PubMedQA yes/no/maybe, EHRQA)."""

    options_model = LabelOptions

    def files(self, item: Item) -> list[Path]:
        return []

    def query(self, item: Item) -> Query:
        prompt = self.fill(**{k: v for k, v in item.items() if not k.startswith("_")})
        return Query(text_messages(prompt, self.thinking))

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        labels = [label.lower() for label in self.options.labels]
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

    options_model = ImageOptions

    def files(self, item: Item) -> list[Path]:
        return [self.path(item)]

    def query(self, item: Item) -> Query:
        path = self.path(item)
        prompt = self.fill(question=item["question"])
        return Query(messages_for(self.prepared(path), prompt, thinking=self.thinking), [path])

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        answer = _answer(text).strip()
        final = re.split(r"final\s+answer\s*[:：]\s*", answer, flags=re.IGNORECASE)
        return final[-1].strip().strip("*").strip() if answer else None


@KINDS.register("condition")
class ConditionQuestion(Kind):
    """One condition at a time, yes/no, about an image or a volume (MIMIC-CXR/CheXpert/CXR14, CT-RATE,
    CT and MRI datasets); ``group`` is the condition, so per-condition metrics follow."""

    options_model = ConditionOptions

    def files(self, item: Item) -> list[Path]:
        return [self.path(item)]

    def query(self, item: Item) -> Query:
        path = self.path(item)
        prompt = self.fill(label=item["label"], what=self.options.what)
        return Query(messages_for(self.prepared(path), prompt, thinking=self.thinking), [path])

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return parse_yes_no(_answer(text))

    def group(self, item: Item) -> str | None:
        return item.get("group") or item.get("label")


@KINDS.register("open_diagnosis")
class OpenDiagnosis(VisualQuestion):
    """Free-text diagnosis (MedPix case style); targets carry the answer and its synonyms."""

    options_model = DiagnosisOptions

    def target(self, item: Item) -> Any:
        synonyms = item.get("synonyms") or []
        return [item.get("target"), *synonyms] if synonyms else item.get("target")


@KINDS.register("images_text")
class ImagesText(Kind):
    """Several images (e.g. the patches of a whole slide) then an instruction; free-text prediction (WSI
    description, scored with ROUGE-L). Item fields: ``images`` (paths) and any prompt placeholders."""

    options_model = ImageOptions

    def files(self, item: Item) -> list[Path]:
        return [Path(p) if Path(p).is_absolute() else Path(item["_base"]) / p for p in item["images"]]

    def query(self, item: Item) -> Query:
        paths = self.files(item)
        images = [img for path in paths for img in self.prepared(path).images]
        prompt = self.fill(**{k: v for k, v in item.items() if not k.startswith("_") and isinstance(v, str)})
        return Query(image_messages(images, prompt, thinking=self.thinking), paths)

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return _answer(text).strip() or None


@KINDS.register("task")
class TaskKind(Kind):
    """Items run through a registered medlens task (localize, compare, lab-extract, ehr-qa, report ...);
    ``options.inputs`` names the item fields that are its inputs, ``options.prediction`` the payload field
    that is the prediction, ``options.task_options`` its settings; thinking comes from ``generation``."""

    options_model = TaskKindOptions

    def __init__(self, spec: Any, recipe: str = DEFAULT_RECIPE) -> None:
        from medlens.tasks import get_task

        super().__init__(spec, recipe)
        self.task = get_task(self.options.task)
        self.task_options = task_options(self.options, recipe, self.thinking)

    @classmethod
    def check_options(cls, raw: dict[str, Any]) -> BaseModel:
        from medlens.tasks import task_class

        options = validated(TaskKindOptions, raw, ("options",))
        task = task_class(options.task)
        if not task.min_inputs <= len(options.inputs) <= task.max_inputs:
            wanted = f"{task.min_inputs}" + (f" to {task.max_inputs}" if task.max_inputs != task.min_inputs else "")
            reason = f"options.inputs: task {options.task} takes {wanted} inputs, not {len(options.inputs)}"
            raise SpecProblem(("options", "inputs"), reason)
        validated(task_settings_model(options.task), options.task_options, ("options", "task_options"))
        return options

    def files(self, item: Item) -> list[Path]:
        return [self.path(item, key) for key in self.options.inputs]

    def query(self, item: Item) -> Query:
        paths = self.files(item)
        build = self.task.build(paths, item.get("question") or "", self.task_options)
        (request,) = build.requests
        return Query(request.messages, paths, request.context)

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        from medlens.tasks.runner import parse_output

        parsed = parse_output(self.task, text, context)
        if parsed.payload is None:
            return None
        return parsed.payload.get(self.options.prediction, parsed.final_answer)


#: TaskOptions fields a benchmark does not set in ``task_options``: the run's recipe, ``generation``'s
#: thinking and token cap, the extra bag (filled from the task's own declared options), and de-identification
#: (the run decides: on for a remote engine)
_FROM_RUN = frozenset({"recipe", "thinking", "max_new_tokens", "extra", "deid"})


@lru_cache(maxsize=32)
def task_settings_model(task: str) -> type[BaseModel]:
    """What ``task_options`` may set for ``task``: the general TaskOptions fields (series, modality,
    instruction, slide) and the task's own declared options, with their types and bounds (strict)."""
    from medlens.tasks import TASKS, TaskOptions, task_class

    own = {decl.name: decl for decl in task_class(task).options}
    others = {decl.name for name in TASKS for decl in task_class(name).options} - set(own)
    hints = get_type_hints(TaskOptions)
    fields: dict[str, Any] = {}
    for item in dataclasses.fields(TaskOptions):
        if item.name not in _FROM_RUN | others | set(own):
            fields[item.name] = _setting(hints[item.name], _default_of(item))
    for decl in own.values():
        fields[decl.name] = _setting(decl.type, decl.default, decl.min, decl.max)
    return create_model(f"TaskOptions_{task.replace('-', '_')}", __config__=STRICT, **fields)


def task_options(options: TaskKindOptions, recipe: str, thinking: bool) -> Any:
    """The :class:`~medlens.tasks.TaskOptions` of a task benchmark (its settings already validated)."""
    from medlens.prep.slide_recipe import SlideOptions
    from medlens.tasks import TaskOptions

    values = task_settings_model(options.task).model_validate(options.task_options).model_dump()
    slide = SlideOptions(**values.pop("slide")) if "slide" in values else SlideOptions()
    known = {item.name for item in dataclasses.fields(TaskOptions)}
    extra = {k: values.pop(k) for k in list(values) if k not in known}
    return TaskOptions(recipe=recipe, thinking=thinking, slide=slide, extra=extra, **values)


def _setting(hint: Any, default: Any, low: float | None = None, high: float | None = None) -> tuple[Any, Any]:
    """A pydantic field for a dataclass field: nested dataclasses become strict models; paths may be text."""
    if dataclasses.is_dataclass(hint):
        model = _dataclass_model(hint)
        return model, Field(default_factory=model)
    lax = hint is Path or Path in get_args(hint)
    return Annotated[hint, Field(ge=low, le=high, strict=False if lax else None)], default


@lru_cache(maxsize=8)
def _dataclass_model(cls: type) -> type[BaseModel]:
    hints = get_type_hints(cls)
    fields = {item.name: _setting(hints[item.name], _default_of(item)) for item in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Settings", __config__=STRICT, **fields)


def _default_of(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


@KINDS.register("report_findings")
class ReportFindings(Kind):
    """A text report in, the present findings out, from a fixed label list (``iu-cxr-findings``)."""

    options_model = FindingsOptions

    def files(self, item: Item) -> list[Path]:
        return []

    def query(self, item: Item) -> Query:
        prompt = self.fill(report=item["report"], labels=", ".join(self.options.labels))
        return Query(text_messages(prompt, self.thinking))

    def predict(self, text: str, item: Item, context: dict[str, Any]) -> Any:
        return findings_in(_answer(text), self.options.labels)


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


def kind_class(kind: str, folder: Path) -> Callable[..., Any]:
    """The class of a kind: a registered name, or ``hooks.py:ClassName`` in ``folder`` (the YAML's folder)."""
    file, sep, attr = kind.partition(":")
    if not (sep and file.endswith(".py")):
        try:
            return KINDS.get(kind)
        except UnknownNameError as exc:
            raise SpecProblem(("kind",), f"kind: {exc.reason}") from None
    module = _hook_module((folder / file).resolve())
    found = getattr(module, attr, None)
    if not isinstance(found, type):
        classes = [name for name, value in vars(module).items() if isinstance(value, type) and not name.startswith("_")]
        raise SpecProblem(("kind",), f"kind: {file} has no class {attr!r} ({suggestion(attr, classes)})")
    return found


def check_kind_options(cls: Any, raw: dict[str, Any]) -> Any:
    """The validated options of a kind class: its ``check_options`` or ``options_model``; a hook class with
    neither takes anything."""
    check = getattr(cls, "check_options", None)
    if callable(check):
        return check(raw)
    model = getattr(cls, "options_model", None)
    return validated(model, raw, ("options",)) if model is not None else raw


def _hook_module(path: Path) -> ModuleType:
    if not path.is_file():
        raise SpecProblem(("kind",), f"kind: hook file {path} not found")
    return _load_hook(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _load_hook(path: str, mtime_ns: int) -> ModuleType:
    """The module of a hook file (loaded once per version of the file)."""
    name = "medlens_user_hooks_" + hashlib.sha256(path.encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise SpecProblem(("kind",), f"kind: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except (ImportError, SyntaxError) as exc:
        raise SpecProblem(("kind",), f"kind: hook file {path} does not load ({type(exc).__name__}: {exc})") from None
    return module
