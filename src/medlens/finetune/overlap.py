"""The leakage guard: which held-out rows overlap the training split, and a training split without them.

:func:`check_overlap` compares two lists of :class:`~medlens.finetune.manifest.TrainRow` by four measures
(``docs/overlap.md``): identical input files (content hashes), near-duplicate prepared images (perceptual
hashes), optionally near-duplicate MedSigLIP image embeddings, and shared word 13-grams of question + answer.
Every input is prepared by its row's recipe, as training and evaluation prepare it, and hashed once: the work
grows with the number of rows on both sides, not with their product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens import DISCLAIMER
from medlens.errors import MedlensError
from medlens.finetune.manifest import TrainRow, write_manifest
from medlens.finetune.overlap_defaults import COMMON_SHARE, IMAGE_HASH_DISTANCE, NGRAM, SIGLIP_THRESHOLD
from medlens.finetune.overlap_images import (
    RowImages,
    embedding_matches,
    exact_matches,
    phash_matches,
    row_images,
)
from medlens.finetune.overlap_text import text_keys, text_matches
from medlens.prep import DEFAULT_RECIPE


@dataclass(frozen=True)
class Match:
    """One overlapping pair: ``kind`` (exact, image-hash, embedding, text), its score and what matched."""

    kind: str
    train_id: str
    held_out_id: str
    score: float
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "train_id": self.train_id,
            "held_out_id": self.held_out_id,
            "score": self.score,
            "detail": self.detail,
        }


@dataclass
class OverlapReport:
    """The overlapping pairs by kind, and what was compared with which settings."""

    n_train: int
    n_held_out: int
    exact: list[Match] = field(default_factory=list)
    near_images: list[Match] = field(default_factory=list)
    text: list[Match] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def matches(self) -> list[Match]:
        return [*self.exact, *self.near_images, *self.text]

    @property
    def overlapping_train_ids(self) -> list[str]:
        return sorted({m.train_id for m in self.matches})

    @property
    def overlapping_held_out_ids(self) -> list[str]:
        return sorted({m.held_out_id for m in self.matches})

    @property
    def fraction(self) -> float:
        """Share of held-out rows that overlap any training row."""
        return len(self.overlapping_held_out_ids) / self.n_held_out if self.n_held_out else 0.0

    def summary(self) -> str:
        return (
            f"{len(self.overlapping_held_out_ids)} of {self.n_held_out} held-out rows ({self.fraction:.1%}) overlap "
            f"{len(self.overlapping_train_ids)} of {self.n_train} training rows: {len(self.exact)} exact, "
            f"{len(self.near_images)} near-image, {len(self.text)} text pair(s)"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "n_train": self.n_train,
            "n_held_out": self.n_held_out,
            "fraction": self.fraction,
            "overlapping_train_ids": self.overlapping_train_ids,
            "overlapping_held_out_ids": self.overlapping_held_out_ids,
            "exact": [m.to_json() for m in self.exact],
            "near_images": [m.to_json() for m in self.near_images],
            "text": [m.to_json() for m in self.text],
            "settings": self.settings,
            "summary": self.summary(),
            "disclaimer": DISCLAIMER,
        }

    def clean(self, train_rows: Sequence[TrainRow]) -> list[TrainRow]:
        """The training rows that overlap no held-out row."""
        drop = set(self.overlapping_train_ids)
        return [row for row in train_rows if row.id not in drop]

    def write_clean(self, train_rows: Sequence[TrainRow], path: str | Path) -> Path:
        """Write :meth:`clean` as a training manifest at ``path`` (inputs relative to its folder)."""
        return write_manifest(self.clean(train_rows), path)


Embed = Callable[[list[np.ndarray]], np.ndarray]


def check_overlap(
    train: Sequence[TrainRow],
    held_out: Sequence[TrainRow],
    *,
    image_hash_distance: int = IMAGE_HASH_DISTANCE,
    ngram: int = NGRAM,
    siglip_model: str | None = None,
    siglip_threshold: float = SIGLIP_THRESHOLD,
    text_common_share: float = COMMON_SHARE,
    text_min_share: float = 0.0,
    device: str = "auto",
) -> OverlapReport:
    """Compare ``held_out`` with ``train``: exact files, near-duplicate images, MedSigLIP embeddings (when
    ``siglip_model`` is given) and text. Unreadable inputs raise the typed error of their reader, naming the
    file and the row."""
    if not 0 <= image_hash_distance < 64:
        raise MedlensError(f"image_hash_distance must be 0..63 bits, got {image_hash_distance}")
    if ngram < 1:
        raise MedlensError(f"ngram must be at least 1, got {ngram}")
    embed, encoder = _embedder(siglip_model, device)
    prepared = _PreparedImages()
    try:
        train_images = [row_images(row, prepared, embed) for row in train]
        held_images = [row_images(row, prepared, embed) for row in held_out]
    finally:
        if encoder is not None:
            encoder.close()
    report = OverlapReport(
        len(train),
        len(held_out),
        settings={
            "image_hash": "phash 64-bit",
            "image_hash_distance": image_hash_distance,
            "ngram": ngram,
            "text_common_share": text_common_share,
            "text_min_share": text_min_share,
            "siglip_model": siglip_model,
            "siglip_threshold": siglip_threshold if siglip_model else None,
        },
    )
    for (t, h), (train_file, held_file) in sorted(exact_matches(train_images, held_images).items()):
        detail = f"same file content: {_shown(train_file, train[t])} == {_shown(held_file, held_out[h])}"
        report.exact.append(Match("exact", train[t].id, held_out[h].id, 1.0, detail))
    report.near_images.extend(_near(train, held_out, train_images, held_images, image_hash_distance))
    if siglip_model:
        for (t, h), cosine in sorted(embedding_matches(train_images, held_images, siglip_threshold).items()):
            detail = f"MedSigLIP image cosine {cosine:.4f} >= {siglip_threshold}"
            report.near_images.append(Match("embedding", train[t].id, held_out[h].id, round(cosine, 6), detail))
    report.text.extend(_text(train, held_out, ngram, text_common_share, text_min_share))
    return report


def _near(
    train: Sequence[TrainRow],
    held_out: Sequence[TrainRow],
    train_images: Sequence[RowImages],
    held_images: Sequence[RowImages],
    distance: int,
) -> list[Match]:
    out = []
    for (t, h), bits in sorted(phash_matches(train_images, held_images, distance).items()):
        detail = f"perceptual hash distance {bits} <= {distance} of 64 bits"
        out.append(Match("image-hash", train[t].id, held_out[h].id, float(bits), detail))
    return out


def _text(
    train: Sequence[TrainRow], held_out: Sequence[TrainRow], ngram: int, common_share: float, min_share: float
) -> list[Match]:
    def keys(row: TrainRow) -> set[int]:
        return text_keys(f"{row.question or ''} {row.answer}", ngram, whole=not row.inputs)

    out = []
    for match in text_matches([keys(r) for r in train], [keys(r) for r in held_out], common_share, min_share):
        what = f"{match.shared} of {match.total} {ngram}-gram(s)" if match.total > 1 else "same short text"
        out.append(Match("text", train[match.train].id, held_out[match.held_out].id, round(match.score, 4), what))
    return out


def _shown(name: str, row: TrainRow) -> str:
    """A file name relative to its manifest's folder where it lies below it."""
    try:
        return Path(name).relative_to(row.base).as_posix()
    except ValueError:
        return name


class _PreparedImages:
    """The images each input's recipe prepares, read once per (input, recipe, series, modality)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[str, ...], list[np.ndarray]] = {}

    def __call__(self, ref: Path | str, row: TrainRow) -> list[np.ndarray]:
        options = row.options
        recipe = str(options.get("recipe") or DEFAULT_RECIPE)
        series, modality = options.get("series"), options.get("modality")
        key = (str(ref), recipe, str(series), str(modality))
        if key not in self.cache:
            try:
                self.cache[key] = _read(ref, recipe, series, modality)
            except MedlensError as exc:
                raise type(exc)(f"{exc.reason} (row {row.id!r})", exc.path) from exc
        return self.cache[key]


def _read(ref: Path | str, recipe: str, series: Any, modality: Any) -> list[np.ndarray]:
    """Prepared images of an input; PDF pages as rendered; none for text documents (FHIR, notes)."""
    from medlens.io.discover import document_kind
    from medlens.prep import prepare_study

    kind = document_kind(Path(ref)) if isinstance(ref, Path) else None
    if kind == "pdf":
        from medlens.io.pdf import read_pages

        return read_pages(ref)
    if kind is not None:
        return []
    return prepare_study(ref, recipe, series, modality).images


def _embedder(model: str | None, device: str) -> tuple[Embed | None, Any]:
    if not model:
        return None, None
    from medlens.models.siglip_encoder import SiglipEncoder

    encoder = SiglipEncoder(model, device=device)
    return (lambda images: encoder.embed_images(images)), encoder


__all__ = ["Match", "OverlapReport", "check_overlap"]
