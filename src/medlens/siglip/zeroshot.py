"""Zero-shot classification with SigLIP: one text prompt per label, scored against an image embedding.

SigLIP was trained with a sigmoid loss, so ``sigmoid(logit)`` is a per-label probability on its own (labels
are not exclusive); a softmax over the labels' logits gives the single-choice answer (``logit_bias`` cancels
in it). A study with several images (CT slices, slide patches) is scored with the mean of its image
embeddings, re-normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medlens.errors import MedlensError

#: a label as it is; MedSigLIP also does well with short descriptive prompts, e.g. "a chest X-ray showing {label}"
DEFAULT_TEMPLATE = "{label}"
PLACEHOLDER = "{label}"


def clean_labels(labels: Sequence[str]) -> list[str]:
    """Labels with white space collapsed; refuses none, empty or repeated ones."""
    cleaned = [" ".join(str(label).split()) for label in labels]
    if not cleaned:
        raise MedlensError("no labels: give them with --label (two or more for a single-choice answer)")
    if any(not label for label in cleaned):
        raise MedlensError("a label is empty")
    repeated = sorted({label for label in cleaned if cleaned.count(label) > 1})
    if repeated:
        raise MedlensError(f"labels given more than once: {', '.join(repr(r) for r in repeated)}")
    return cleaned


def label_prompts(labels: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """The text prompt of every label: ``{label}`` in ``template`` replaced by the (cleaned) label."""
    cleaned = clean_labels(labels)
    if PLACEHOLDER not in template:
        raise MedlensError(f"the prompt template {template!r} has no {PLACEHOLDER} placeholder")
    return [template.replace(PLACEHOLDER, label) for label in cleaned]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (numerically stable), float64."""
    shifted = np.asarray(logits, dtype=np.float64) - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Element-wise logistic function, float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


def pool_embeddings(embeddings: np.ndarray) -> np.ndarray:
    """The mean of ``(k, dim)`` unit embeddings, scaled back to unit length: one vector per study."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
    if len(embeddings) == 0:
        raise ValueError("no embedding to pool")
    mean = embeddings.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return (mean / norm if norm > 0 else mean).astype(np.float32)


@dataclass
class ZeroShotScores:
    """Scores of one image (or pooled study) against every label."""

    labels: list[str]
    logits: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def softmax(self) -> np.ndarray:
        return softmax(self.logits)

    @property
    def sigmoid(self) -> np.ndarray:
        return sigmoid(self.logits)

    @property
    def top_label(self) -> str:
        return self.labels[int(np.argmax(self.logits))]

    def as_dict(self, digits: int = 6) -> dict[str, Any]:
        """JSON-ready: the top label, softmax and sigmoid probabilities and logits per label."""

        def per_label(values: np.ndarray) -> dict[str, float]:
            return {label: round(float(v), digits) for label, v in zip(self.labels, values, strict=True)}

        return {
            "top_label": self.top_label,
            "softmax": per_label(self.softmax),
            "sigmoid": per_label(self.sigmoid),
            "logits": per_label(self.logits),
        }


def zero_shot_scores(logits: np.ndarray, labels: Sequence[str]) -> ZeroShotScores:
    """Wrap one row of SigLIP logits; with a single label the softmax is always 1, which is said."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    if len(row) != len(labels):
        raise ValueError(f"{len(row)} logits for {len(labels)} labels")
    warnings = []
    if len(labels) == 1:
        warnings.append("only one label: its softmax probability is always 1; read the sigmoid one")
    return ZeroShotScores(list(labels), row, warnings)
