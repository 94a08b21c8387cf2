"""What a task is: a prompt builder, a parser and a result type, registered by name.

A task reads and prepares its inputs (through ``medlens.io``/``medlens.prep``), builds one or more chat
requests, and parses each raw model output into a validated payload. It never raises on bad model output:
a parse failure is reported in :class:`Parsed.error` and ends up in the result envelope.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from medlens.chat import Messages
from medlens.prep.recipes import DEFAULT_RECIPE
from medlens.prep.slide_recipe import SlideOptions


@dataclass
class TaskOptions:
    """Everything a user can set for a task run. The task-specific fields are those tasks declare as
    :class:`TaskOption` (the CLI makes one flag of each); a new task's own settings go in ``extra``."""

    recipe: str = DEFAULT_RECIPE
    series: str | None = None
    modality: str | None = None
    instruction: str | None = None
    thinking: bool = False
    max_new_tokens: int | None = None
    overlay: Path | None = None  # localize
    dpi: int = 150  # lab-extract
    token_budget: int = 6000  # ehr-qa
    reasoner: str | None = None  # differential
    slide: SlideOptions = field(default_factory=SlideOptions)  # whole-slide images: magnification, tissue ...
    #: de-identify the text sent to the model (names, identifiers, dates ...): None follows the backend
    #: (on for a remote one, off for a local one)
    deid: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskOption:
    """A setting only some tasks use, declared by the task (``Task.options``): a :class:`TaskOptions` field
    or, for names that are none, a key of ``TaskOptions.extra``. ``medlens ask`` shows it as ``--name``."""

    name: str
    type: Any
    default: Any
    help: str
    min: float | None = None
    max: float | None = None


@dataclass
class TaskRequest:
    """One prompt of a task and what its parser needs to know about the inputs (image size, padding ...)."""

    messages: Messages
    context: dict[str, Any] = field(default_factory=dict)
    max_new_tokens: int | None = None


@dataclass
class TaskBuild:
    """The prepared prompts of one task run."""

    requests: list[TaskRequest]
    recipe: str | None = None
    n_images: int = 0
    warnings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)  # extra envelope fields (modality, series tag ...)


@dataclass
class Parsed:
    """A parsed model output: the payload (JSON-ready), its short form, and what went wrong if anything."""

    payload: dict[str, Any] | None = None
    final_answer: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None


class ParseError(ValueError):
    """Raised inside parsers; the runner turns it into ``Parsed.error``."""


class Task(ABC):
    """Base class of every task. Subclasses set the class attributes and implement build and parse."""

    name: ClassVar[str]
    description: ClassVar[str]
    min_inputs: ClassVar[int] = 1
    max_inputs: ClassVar[int] = 1
    #: used when the user gives no question; None means a question is required
    default_question: ClassVar[str | None] = ""
    #: the task's own settings (beyond recipe, series, instruction, thinking ...)
    options: ClassVar[tuple[TaskOption, ...]] = ()

    @abstractmethod
    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        """Read the inputs and build the requests."""

    @abstractmethod
    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        """Parse one raw output (thinking trace included; the parser removes it)."""

    def combine(self, parsed: list[Parsed]) -> Parsed:
        """Merge the parses of several requests (e.g. PDF pages); one request by default."""
        if len(parsed) != 1:
            raise NotImplementedError(f"task {self.name} builds one request")
        return parsed[0]

    def second_stage(self, first: Parsed, question: str, options: TaskOptions) -> TaskBuild | None:
        """Requests built from the first stage's result, for two-stage tasks (None: one stage)."""
        return None

    def merge(self, first: Parsed, second: Parsed) -> Parsed:
        """The result of a two-stage task from both stages' parses."""
        return second

    def finish(self, parsed: Parsed, build: TaskBuild, options: TaskOptions) -> list[str]:
        """Side outputs after parsing (an overlay image ...); returns warnings."""
        return []

    def parse_context(self, **given: Any) -> dict[str, Any]:
        """The parse context for ``medlens parse`` from what the user gave (e.g. ``image_size="WxH"``)."""
        return {k: v for k, v in given.items() if v is not None}

    def render(self, payload: dict[str, Any], fmt: str) -> str | None:
        """The payload in another format (``csv`` ...), or None when the task has no such format."""
        return None
