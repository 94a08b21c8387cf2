"""Box overlap: intersection over union of two boxes, and the mean IoU of predicted against reference boxes
(the Chest ImaGenome localization metric). Boxes are ``[y0, x0, y1, x1]`` as MedGemma writes them, or pixel
boxes ``[x0, y0, x1, y1]``; the formulas treat both axes alike, so either order works when both boxes agree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes ``[y0, x0, y1, x1]``.

    The formula treats both axes alike, so pixel boxes ``[x0, y0, x1, y1]`` work too (both in the same
    order). Inverted corners are reordered; two boxes without area give 0.0.
    """
    ay0, ax0, ay1, ax1 = _ordered(a)
    by0, bx0, by1, bx1 = _ordered(b)
    inter = max(0.0, min(ay1, by1) - max(ay0, by0)) * max(0.0, min(ax1, bx1) - max(ax0, bx0))
    union = (ay1 - ay0) * (ax1 - ax0) + (by1 - by0) * (bx1 - bx0) - inter
    return inter / union if union > 0 else 0.0


def mean_iou(
    pred: Sequence[Mapping[str, Any]], target: Sequence[Mapping[str, Any]], by_label: bool = True, key: str = "box_2d"
) -> float:
    """Mean over the target boxes of the best IoU with a predicted box (0 when none matches).

    Boxes are mappings with ``label`` and ``key`` (``box_2d``, or ``box_px`` for pixels). With ``by_label``
    a target only matches predictions of the same label (case and spacing ignored); extra predictions
    cost nothing. Raises ``ValueError`` when there are no targets.
    """
    if not target:
        raise ValueError("mean_iou needs at least one target box")
    scores = []
    for t in target:
        candidates = [p for p in pred if not by_label or _same_label(p.get("label"), t.get("label"))]
        scores.append(max((iou(p[key], t[key]) for p in candidates), default=0.0))
    return sum(scores) / len(scores)


def _ordered(box: Sequence[float]) -> tuple[float, float, float, float]:
    a0, b0, a1, b1 = (float(v) for v in box)
    return min(a0, a1), min(b0, b1), max(a0, a1), max(b0, b1)


def _same_label(a: Any, b: Any) -> bool:
    def norm(label: Any) -> str:
        return " ".join(str(label or "").split()).casefold()

    return norm(a) == norm(b)
