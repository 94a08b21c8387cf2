"""``localize``: bounding boxes of anatomy or findings on one 2-D image (chest X-ray first of all).

As in MedGemma's localization evaluation (docs/tasks.md, localize) the image is padded to a square and the
model answers a JSON list of ``{"box_2d": [y0, x0, y1, x1], "label": ...}`` with coordinates normalised to
0..1000 on that square; "left" is the patient's left. Boxes are also mapped back to pixels of the original
image. Boxes are scored against references with :mod:`medlens.prep.boxes` (Chest ImaGenome reports mean IoU).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, Field

from medlens.errors import MedlensError
from medlens.prep import prepare_study
from medlens.prep.square import SCALE, Padding, pad_to_square, padding_for, to_pixels
from medlens.privacy import short_hash
from medlens.prompts import image_messages
from medlens.tasks.base import Parsed, ParseError, Task, TaskBuild, TaskOption, TaskOptions, TaskRequest
from medlens.tasks.jsonout import FoundJSON, cut_unfinished, find_json
from medlens.tasks.study import study_details

DEFAULT_QUESTION = "Locate these structures on the chest X-ray: right lung, left lung, heart."

ANSWER_FORMAT = (
    "Reply with a JSON list only, one object per structure or finding you locate, each written as "
    '{"box_2d": [y0, x0, y1, x1], "label": "<what it is>"}. '
    "(y0, x0) is the top-left and (y1, x1) the bottom-right corner of the box, as whole numbers from 0 to 1000 "
    "measured on the whole square image shown (black padding included), with (0, 0) at its top-left corner. "
    "Left and right always mean the patient's left and right, not the viewer's."
)

_BOX_KEYS = ("box2d", "box", "bbox", "boundingbox")
_LABEL_KEYS = ("label", "name", "structure", "finding", "object", "class")
_SIZE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")
#: distinct colours of overlay boxes, used in turn
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
]

Coord = Annotated[int, Field(ge=0, le=SCALE)]
Pixel = Annotated[int, Field(ge=0)]


class LocalizedBox(BaseModel):
    label: str
    box_2d: Annotated[list[Coord], Field(min_length=4, max_length=4)]  # [y0, x0, y1, x1] on the padded square
    box_px: Annotated[list[Pixel], Field(min_length=4, max_length=4)] | None  # [x0, y0, x1, y1] original pixels


class LocalizePayload(BaseModel):
    boxes: Annotated[list[LocalizedBox], Field(min_length=1)]
    image_size: Annotated[list[Annotated[int, Field(gt=0)]], Field(min_length=2, max_length=2)] | None


def localize_prompt(question: str) -> str:
    """The user's request followed by the exact answer format."""
    return f"{question.strip()}\n\n{ANSWER_FORMAT}"


class LocalizeTask(Task):
    name = "localize"
    description = "Bounding boxes of structures or findings on one image (JSON box_2d, pixel boxes, --overlay)"
    options = (TaskOption("overlay", Path | None, None, "Write the boxes drawn on the image to this PNG file."),)
    default_question = DEFAULT_QUESTION

    def __init__(self) -> None:
        self._image: np.ndarray | None = None  # the original prepared image, for the overlay

    def build(self, inputs: list[Path], question: str, options: TaskOptions) -> TaskBuild:
        prepared = prepare_study(inputs[0], options.recipe, options.series, options.modality, slide=options.slide)
        if len(prepared.images) != 1:
            raise MedlensError(
                f"localize takes one 2-D image, but this input gives {len(prepared.images)} images "
                f"({prepared.modality} {prepared.family}); choose a single image",
                str(inputs[0]),
            )
        self._image = prepared.images[0]
        square, padding = pad_to_square(self._image)
        messages = image_messages([square], localize_prompt(question), options.instruction, options.thinking)
        size = [padding.width, padding.height]
        ref = prepared.slices[0]
        # which source image the boxes are on, for the DICOM SR (medlens.results): UID hashed, frame 0-based
        image_ref = {"sop_instance": short_hash(ref.sop_instance_uid) if ref.sop_instance_uid else None}
        image_ref["frame"] = ref.frame
        return TaskBuild(
            requests=[TaskRequest(messages, context={"padding": padding.as_dict(), "image_size": size})],
            recipe=prepared.recipe,
            n_images=1,
            warnings=list(prepared.warnings),
            details={
                **study_details(prepared),
                "image_size": size,
                "padded_side": padding.side,
                "image_ref": image_ref,
            },
        )

    def parse(self, text: str, context: dict[str, Any]) -> Parsed:
        found = find_json(text)
        warnings = list(found.warnings)
        if found.repaired and (complete := cut_unfinished(text)) is not None:
            found = find_json(complete) if complete else FoundJSON([])
            warnings.append("the output was cut off: its incomplete last box was dropped")
        items = _box_items(found.value)
        padding = _padding(context)
        boxes = []
        for number, item in enumerate(items, start=1):
            box = _read_box(item, number, warnings)
            if box is not None:
                label, box_2d = box
                px = to_pixels(box_2d, padding) if padding else None
                boxes.append({"label": label, "box_2d": box_2d, "box_px": px})
        if not boxes:
            raise ParseError("the model output holds no usable box (expected a JSON list of box_2d/label objects)")
        size = [padding.width, padding.height] if padding else None
        payload = LocalizePayload(boxes=boxes, image_size=size).model_dump()
        labels = [b["label"] for b in boxes if b["label"]]
        return Parsed(payload=payload, final_answer=", ".join(labels) or None, warnings=warnings)

    def parse_context(self, **given: Any) -> dict[str, Any]:
        """``image_size="WxH"``: assume the model saw that image padded to a square, as medlens does."""
        size = given.get("image_size")
        if size is None:
            return {}
        match = _SIZE.match(str(size))
        if not match or not int(match[1]) or not int(match[2]):
            raise MedlensError("--image-size must look like 1024x768")
        padding = padding_for(int(match[1]), int(match[2]))
        return {"padding": padding.as_dict(), "image_size": [padding.width, padding.height]}

    def finish(self, parsed: Parsed, build: TaskBuild, options: TaskOptions) -> list[str]:
        if options.overlay is None:
            return []
        boxes = (parsed.payload or {}).get("boxes") or []
        if not boxes:
            return ["overlay not written: no boxes were parsed"]
        if self._image is None:
            return ["overlay not written: the image is not available"]
        try:
            draw_overlay(self._image, boxes).save(options.overlay, format="PNG")
        except OSError as exc:
            return [f"overlay not written: {exc}"]
        return []


def draw_overlay(image: np.ndarray, boxes: Sequence[Mapping[str, Any]]) -> Any:
    """A PIL image of ``image`` with each box's ``box_px`` drawn and labelled, one colour per box."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short = min(canvas.size)
    line = max(2, round(short / 300))
    try:
        font = ImageFont.load_default(size=max(12, round(short / 40)))
    except (TypeError, ImportError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    for number, box in enumerate(boxes):
        if not box.get("box_px"):
            continue
        colour = PALETTE[number % len(PALETTE)]
        x0, y0, x1, y1 = box["box_px"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line)
        if box.get("label"):
            left, top, right, bottom = draw.textbbox((x0 + line, y0 + line), box["label"], font=font)
            draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=colour)
            draw.text((x0 + line, y0 + line), box["label"], fill=(0, 0, 0), font=font)
    return canvas


def _padding(context: Mapping[str, Any]) -> Padding | None:
    if context.get("padding"):
        return Padding.from_dict(context["padding"])
    if context.get("image_size"):
        width, height = context["image_size"]
        return padding_for(int(width), int(height))
    return None


def _norm_key(key: Any) -> str:
    return re.sub(r"[\s_\-]", "", str(key)).casefold()


def _box_items(value: Any) -> list[Any]:
    """The box candidates in the JSON: a list, one box object, a list inside a dict, or label -> box."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        if any(_norm_key(k) in _BOX_KEYS for k in value):
            return [value]
        for inner in value.values():  # {"boxes": [...]}
            if isinstance(inner, list) and any(isinstance(i, dict) for i in inner):
                return inner
        if value and all(_coords(v) is not None for v in value.values()):  # {"heart": [y0, x0, y1, x1]}
            return [{"label": k, "box_2d": v} for k, v in value.items()]
    raise ParseError("the model's JSON holds no boxes (expected a list of box_2d/label objects)")


def _pick(item: Mapping[str, Any], names: tuple[str, ...]) -> tuple[bool, Any]:
    """``(found, value)`` for the first of ``names`` (the canonical one first); ``(True, None)`` when
    several alternative spellings disagree."""
    keys = {_norm_key(k): k for k in item}
    if names[0] in keys:
        return True, item[keys[names[0]]]
    values = [item[k] for k in item if _norm_key(k) in names]
    if not values:
        return False, None
    return True, values[0] if all(v == values[0] for v in values) else None


def _coords(raw: Any) -> list[float] | None:
    """Four finite numbers from a list (numbers or numeric strings) or a string like ``"1, 2, 3, 4"``."""
    if isinstance(raw, str):
        raw = [p for p in re.split(r"[,;\s]+", raw.strip().strip("[]()")) if p]
    if not isinstance(raw, list | tuple) or len(raw) != 4:
        return None
    values = []
    for v in raw:
        if isinstance(v, bool) or not isinstance(v, int | float | str):
            return None
        try:
            number = float(v)
        except ValueError:
            return None
        if not math.isfinite(number):
            return None
        values.append(number)
    return values


def _read_box(item: Any, number: int, warnings: list[str]) -> tuple[str, list[int]] | None:
    """``(label, [y0, x0, y1, x1])`` from one JSON element, or None (with a warning) when it is unusable."""
    if not isinstance(item, dict):
        warnings.append(f"element {number} is not a box object and was dropped")
        return None
    has_label, label = _pick(item, _LABEL_KEYS)
    label = "" if label is None else str(label).strip()
    where = f"box {number}" + (f" ({label})" if label else "")
    found, raw = _pick(item, _BOX_KEYS)
    values = _coords(raw) if found else None
    if values is None:
        problem = "has no box_2d" if not found else "does not hold exactly 4 numbers"
        warnings.append(f"{where} {problem} and was dropped")
        return None
    if not has_label or not label:
        warnings.append(f"{where} has no label")
    if all(0 <= v <= 1 for v in values) and any(v != int(v) for v in values):
        values = [v * SCALE for v in values]
        warnings.append(f"{where} was given as fractions of 1 and was scaled to 0..{SCALE}")
    box = [math.floor(v + 0.5) for v in values]
    clamped = [min(max(v, 0), SCALE) for v in box]
    if clamped != box:
        warnings.append(f"{where} had coordinates outside 0..{SCALE}; they were clamped")
    y0, x0, y1, x1 = clamped
    if y0 > y1 or x0 > x1:
        warnings.append(f"{where} had inverted corners; they were reordered")
    return label, [min(y0, y1), min(x0, x1), max(y0, y1), max(x0, x1)]
