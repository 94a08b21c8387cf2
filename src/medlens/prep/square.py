"""Pad an image to a square (black bars on both sides of the short axis) and map boxes back.

MedGemma's localization prompts show the image padded to a square; the model answers boxes as
``[y0, x0, y1, x1]`` normalised to 0..1000 on that square. :func:`to_pixels` undoes both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: box coordinates of the model are normalised to 0..SCALE
SCALE = 1000


@dataclass(frozen=True)
class Padding:
    """Where the original ``width`` x ``height`` image sits in the ``side`` x ``side`` square."""

    width: int
    height: int
    x: int  # columns of padding on the left
    y: int  # rows of padding on the top
    side: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Padding:
        return cls(**{k: int(data[k]) for k in ("width", "height", "x", "y", "side")})


def padding_for(width: int, height: int) -> Padding:
    """The padding :func:`pad_to_square` applies to a ``width`` x ``height`` image (odd extra goes last)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    side = max(width, height)
    return Padding(width, height, (side - width) // 2, (side - height) // 2, side)


def pad_to_square(image: np.ndarray) -> tuple[np.ndarray, Padding]:
    """``image`` (H x W or H x W x C) centred on a black square; the original is returned when already square."""
    if image.ndim not in (2, 3):
        raise ValueError(f"expected an H x W or H x W x C image, got shape {image.shape}")
    height, width = image.shape[:2]
    padding = padding_for(width, height)
    if width == height:
        return image, padding
    rows = (padding.y, padding.side - height - padding.y)
    cols = (padding.x, padding.side - width - padding.x)
    pad_width = [rows, cols] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad_width, mode="constant", constant_values=0), padding


def to_pixels(box_2d: Sequence[float], padding: Padding) -> list[int]:
    """``[y0, x0, y1, x1]`` (0..1000 on the padded square) -> ``[x0, y0, x1, y1]`` pixels of the original
    image, rounded and clipped to ``0..width`` / ``0..height`` (edges, so a full-width box ends at ``width``)."""
    y0, x0, y1, x1 = (float(v) * padding.side / SCALE for v in box_2d)

    def clip(value: float, offset: int, size: int) -> int:
        return min(max(_round(value - offset), 0), size)

    return [
        clip(x0, padding.x, padding.width),
        clip(y0, padding.y, padding.height),
        clip(x1, padding.x, padding.width),
        clip(y1, padding.y, padding.height),
    ]


def from_pixels(box_px: Sequence[float], padding: Padding) -> list[int]:
    """The inverse of :func:`to_pixels`: ``[x0, y0, x1, y1]`` pixels -> ``[y0, x0, y1, x1]`` on 0..1000."""
    x0, y0, x1, y1 = (float(v) for v in box_px)

    def norm(value: float, offset: int) -> int:
        return min(max(_round((value + offset) * SCALE / padding.side), 0), SCALE)

    return [norm(y0, padding.y), norm(x0, padding.x), norm(y1, padding.y), norm(x1, padding.x)]


def _round(value: float) -> int:
    """Round half up (``round`` rounds half to even)."""
    return math.floor(value + 0.5)
