"""Prompts: prepared images + a question -> chat messages in MedGemma's layouts; answer parsers."""

from __future__ import annotations

from medlens.chat import Messages
from medlens.prep.recipes import Prepared
from medlens.prompts.layouts import (
    THINKING_INSTRUCTION,
    image_messages,
    slide_instruction,
    text_messages,
    volume_messages,
)
from medlens.prompts.parsers import (
    SplitAnswer,
    auto_final_answer,
    option_letters,
    parse_choice,
    parse_yes_no,
    split_thinking,
)


def messages_for(prepared: Prepared, question: str, instruction: str | None = None, thinking: bool = False) -> Messages:
    """The official layout for what was prepared: the volume layout for CT/MR stacks; for whole slides the
    patches, then the instruction naming tissue and procedure, then the question; else image first."""
    if prepared.family == "wsi" and instruction is None:
        meta = prepared.meta
        instruction = slide_instruction(
            len(prepared.images), meta["magnification"], meta.get("tissue"), meta.get("procedure")
        )
    if prepared.is_volume:
        return volume_messages(prepared.images, question, prepared.family, instruction, thinking)
    return image_messages(prepared.images, question, instruction, thinking)


__all__ = [
    "THINKING_INSTRUCTION",
    "SplitAnswer",
    "auto_final_answer",
    "image_messages",
    "messages_for",
    "option_letters",
    "parse_choice",
    "parse_yes_no",
    "slide_instruction",
    "split_thinking",
    "text_messages",
    "volume_messages",
]
