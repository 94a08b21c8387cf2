"""Chat layouts MedGemma 1.5 was trained and evaluated with. One user turn, no system prompt.

Volume: instruction text, then every slice image followed by ``SLICE n`` (n from 1), then the question.
Single image: the image, then the text. Images always come before the question, so requests that ask
several questions about one study share their whole image prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medlens.chat import Messages

#: prepended to the prompt to switch on MedGemma's thinking mode; the trace ends at <unused95>
THINKING_INSTRUCTION = "SYSTEM INSTRUCTION: think silently if needed."

VOLUME_INSTRUCTIONS = {
    "ct": (
        "You are looking at {n} slices of a CT volume, in order along the body axis. Each slice shows "
        "three CT windows as colour channels (red: -1024 to 1024 HU, green: -135 to 215 HU, blue: 0 to 80 "
        "HU) and is followed by its slice number."
    ),
    "mr": "You are looking at {n} slices of an MRI volume, in order along the body axis, each followed by its "
    "slice number.",
}


def slide_instruction(n: int, magnification: float, tissue: str | None = None, procedure: str | None = None) -> str:
    """What MedGemma is told about whole-slide patches: how many, at what magnification, tissue and procedure."""
    specimen = " ".join(part for part in (tissue, procedure) if part) or "tissue"
    return (
        f"You are looking at {n} non-overlapping patches at {magnification:g}x magnification from a whole-slide "
        f"histopathology image of a {specimen} specimen, in reading order."
    )


def volume_messages(
    images: Sequence[np.ndarray],
    question: str,
    family: str = "ct",
    instruction: str | None = None,
    thinking: bool = False,
) -> Messages:
    """Instruction, then image + ``SLICE n`` for each slice, then the question last."""
    text = instruction if instruction is not None else VOLUME_INSTRUCTIONS.get(family, VOLUME_INSTRUCTIONS["mr"])
    content: list[dict[str, Any]] = [_text(_with_thinking(text.format(n=len(images)), thinking))]
    for n, image in enumerate(images, start=1):
        content += [_image(image), _text(f"SLICE {n}")]
    content.append(_text(question))
    return [{"role": "user", "content": content}]


def image_messages(
    images: Sequence[np.ndarray], question: str, instruction: str | None = None, thinking: bool = False
) -> Messages:
    """The image(s) first, then the text (an optional instruction joined before the question)."""
    content: list[dict[str, Any]] = [_image(image) for image in images]
    text = f"{instruction}\n\n{question}" if instruction else question
    content.append(_text(_with_thinking(text, thinking)))
    return [{"role": "user", "content": content}]


def text_messages(question: str, thinking: bool = False) -> Messages:
    return [{"role": "user", "content": [_text(_with_thinking(question, thinking))]}]


def _with_thinking(text: str, thinking: bool) -> str:
    return f"{THINKING_INSTRUCTION}\n{text}" if thinking else text


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _image(image: np.ndarray) -> dict[str, Any]:
    return {"type": "image", "image": image}
