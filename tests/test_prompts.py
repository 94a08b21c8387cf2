"""Prompt layouts and answer parsers."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.io.types import SliceRef
from medlens.prep import Prepared
from medlens.prompts import (
    THINKING_INSTRUCTION,
    auto_final_answer,
    image_messages,
    messages_for,
    option_letters,
    parse_choice,
    parse_yes_no,
    split_thinking,
    text_messages,
    volume_messages,
)


def _imgs(n):
    return [np.full((4, 4, 3), i, np.uint8) for i in range(n)]


def test_volume_layout_instruction_slices_then_question():
    images = _imgs(3)
    (turn,) = volume_messages(images, "Is there X?", family="ct")
    assert turn["role"] == "user"
    kinds = [(p["type"], p.get("text")) for p in turn["content"]]
    assert kinds[0][0] == "text" and "3 slices of a CT volume" in kinds[0][1]
    assert kinds[1:7] == [
        ("image", None),
        ("text", "SLICE 1"),
        ("image", None),
        ("text", "SLICE 2"),
        ("image", None),
        ("text", "SLICE 3"),
    ]
    assert kinds[-1] == ("text", "Is there X?")
    assert [p["image"] for p in turn["content"] if p["type"] == "image"] == images  # same arrays, same order


def test_no_system_prompt_and_custom_instruction():
    messages = volume_messages(_imgs(2), "Q", family="mr", instruction="Look.")
    assert [m["role"] for m in messages] == ["user"]
    assert messages[0]["content"][0]["text"] == "Look."


def test_single_image_layout_image_first():
    (turn,) = image_messages(_imgs(1), "Describe.")
    assert [p["type"] for p in turn["content"]] == ["image", "text"]
    assert turn["content"][1]["text"] == "Describe."


def test_thinking_switch_is_prepended():
    assert text_messages("Q?", thinking=True)[0]["content"][0]["text"] == f"{THINKING_INSTRUCTION}\nQ?"
    vol = volume_messages(_imgs(1), "Q?", thinking=True)[0]["content"]
    assert vol[0]["text"].startswith(THINKING_INSTRUCTION) and vol[-1]["text"] == "Q?"
    assert THINKING_INSTRUCTION == "SYSTEM INSTRUCTION: think silently if needed."


@pytest.mark.parametrize(
    ("family", "n", "layout"),
    [("ct", 5, "volume"), ("mr", 2, "volume"), ("ct", 1, "image"), ("radiograph", 1, "image"), ("color", 2, "image")],
)
def test_messages_for_picks_the_layout(family, n, layout):
    prepared = Prepared("medgemma-1.5", "CT", family, _imgs(n), [SliceRef("f")] * n, "src", None, n)
    content = messages_for(prepared, "Q")[0]["content"]
    has_slice_labels = any(p.get("text") == "SLICE 1" for p in content)
    assert has_slice_labels == (layout == "volume")
    assert content[-1]["text"].endswith("Q")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: yes", "yes"),
        ("The liver looks normal.\nFinal Answer: no", "no"),
        ("**Final Answer:** Yes.", "yes"),
        ("final answer - no", None),
        ("Final answer: NO", "no"),
        ("I first thought Final Answer: yes but on review Final Answer: no", "no"),
        ("Yes, there is a lesion.", None),
        ("Final Answer: yesterday", None),
    ],
)
def test_yes_no(text, expected):
    assert parse_yes_no(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Final Answer: B", "B"),
        ("The answer is (C) because ...", "C"),
        ("D", "D"),
        ("A. Myocardial infarction", "A"),
        ("Final Answer: (E)", None),  # not an option here
        ("I am not sure.", None),
    ],
)
def test_choice(text, expected):
    assert parse_choice(text, "ABCD") == expected


def test_option_letters_and_auto():
    question = "Which drug?\nA. aspirin\nB. heparin\nC. warfarin\nD. none"
    assert option_letters(question) == "ABCD"
    assert auto_final_answer("Final Answer: C", question) == "C"
    assert auto_final_answer("Final Answer: yes", "Is there X?") == "yes"
    assert auto_final_answer("Probably.", "Is there X?") is None


def test_thinking_trace_removed():
    raw = "<unused94>thought\nThe slices show a hypodense lesion.<unused95>Final Answer: yes"
    split = split_thinking(raw)
    assert split.answer == "Final Answer: yes"
    assert split.thinking == "The slices show a hypodense lesion."
    unfinished = split_thinking("<unused94>thought\nstill thinking when cut off")
    assert unfinished.answer == "" and unfinished.thinking == "still thinking when cut off"
    assert split_thinking("  plain answer \n").answer == "plain answer"
    assert split_thinking("plain").thinking is None
