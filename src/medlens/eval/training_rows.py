"""A benchmark's items as training rows: the request its hook kind builds for evaluation (the very
``Kind.query``), and the target written as the answer the benchmark's parser reads back.

Used by ``medlens finetune`` (through :func:`medlens.api.finetune`) so that a model is trained on exactly
the prompts it is later evaluated with. A split is chosen with the loader's ``split`` option (built-in
loaders that have one, e.g. ``iu-cxr-reports``: ``train`` / ``held_out``).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlens.chat import Messages
from medlens.errors import InputError
from medlens.eval.data import data_root, load_items
from medlens.eval.kinds import Item, Kind
from medlens.eval.registry import get_benchmark, make_kind
from medlens.eval.spec import loader_function
from medlens.prep.recipes import DEFAULT_RECIPE
from medlens.registry import Registry


@dataclass(frozen=True)
class TrainingItem:
    """One benchmark item to learn: its prompt (built on use), target answer text, inputs and prompt text."""

    id: str
    answer: str
    messages: Callable[[], Messages]
    inputs: list[Path] = field(default_factory=list)
    question: str | None = None
    benchmark: str = ""


#: kind -> the target as the answer text the kind's parser reads back
TARGET_TEXTS: Registry[Callable[[Any], str]] = Registry("benchmark kind with training targets")
TARGET_TEXTS.add("report_findings", lambda target: json.dumps(sorted(target or [])))
TARGET_TEXTS.add("condition", lambda target: f"Final Answer: {target}")
TARGET_TEXTS.add("closed_label", lambda target: f"Final Answer: {target}")
TARGET_TEXTS.add("mcq", lambda target: f"Final Answer: {target}")
TARGET_TEXTS.add("vqa", str)
TARGET_TEXTS.add("open_diagnosis", str)
TARGET_TEXTS.add("images_text", str)


def training_items(
    benchmark: str,
    split: str = "train",
    data: str | Path | None = None,
    recipe: str = DEFAULT_RECIPE,
    limit: int | None = None,
) -> list[TrainingItem]:
    """The items of ``benchmark``'s ``split`` as training rows (``split="all"``: every item)."""
    spec, path = get_benchmark(benchmark)
    if split != "all":
        if not spec.data.loader or "split" not in inspect.signature(loader_function(spec.data.loader)).parameters:
            raise InputError(
                f"benchmark {spec.name} has no {split!r} split (only built-in loaders with a split option have "
                "one); give the training data as a manifest (data.manifest)",
                str(path),
            )
        loader_options = {**spec.options.get("loader_options", {}), "split": split}
        spec = spec.model_copy(update={"options": {**spec.options, "loader_options": loader_options}})
    to_text = TARGET_TEXTS.get(spec.kind)
    kind = make_kind(spec, path, recipe)
    items = load_items(spec, data_root(data), limit)
    out = []
    for item in items:
        target = kind.target(item)
        if target is None or target == "":
            raise InputError(f"benchmark {spec.name}: item {item['id']} has no target to learn", str(path))
        files = kind.files(item)
        out.append(
            TrainingItem(
                id=str(item["id"]),
                answer=to_text(target),
                messages=_messages(kind, item),
                inputs=files,
                question=None if files else _text_of(kind, item),
                benchmark=spec.name,
            )
        )
    return out


def _messages(kind: Kind, item: Item) -> Callable[[], Messages]:
    return lambda: kind.query(item).messages


def _text_of(kind: Kind, item: Item) -> str:
    """The prompt text of a text-only item (what the overlap guard compares)."""
    from medlens.backends.rendering import message_text

    return "\n".join(message_text(message) for message in kind.query(item).messages)


__all__ = ["TARGET_TEXTS", "TrainingItem", "training_items"]
