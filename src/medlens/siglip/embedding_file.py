"""The ``.npz`` file of ``medlens embed``: one row per image, with where it came from, and text embeddings.

Arrays: ``embeddings`` (n, dim) float32, ``sources`` (n,) str, ``images`` (n,) int (1-based image number in
the study's model order), ``labels`` (n,) str ("" when none), ``texts`` (m,) str, ``text_embeddings``
(m, dim) float32, and the scalars ``model``, ``fingerprint``, ``dim``, ``medlens_version``. No pickles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medlens import __version__
from medlens.errors import InputError, NotFoundError
from medlens.files import write_atomic
from medlens.siglip.zeroshot import pool_embeddings

_REQUIRED = ("embeddings", "sources", "images", "labels", "model", "fingerprint")


@dataclass
class EmbeddingFile:
    """Image (and text) embeddings with their provenance."""

    embeddings: np.ndarray
    sources: list[str]
    images: list[int]
    labels: list[str]
    model: str
    fingerprint: str
    texts: list[str] = field(default_factory=list)
    text_embeddings: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically (a temporary file renamed into place)."""
        texts = self.text_embeddings if self.text_embeddings is not None else np.zeros((0, self.dim), np.float32)
        return write_atomic(
            path,
            lambda handle: np.savez(
                handle,
                embeddings=np.asarray(self.embeddings, np.float32),
                sources=np.asarray(self.sources, dtype=str),
                images=np.asarray(self.images, dtype=np.int32),
                labels=np.asarray(self.labels, dtype=str),
                texts=np.asarray(self.texts, dtype=str),
                text_embeddings=np.asarray(texts, np.float32),
                model=np.asarray(self.model),
                fingerprint=np.asarray(self.fingerprint),
                dim=np.asarray(self.dim),
                medlens_version=np.asarray(__version__),
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingFile:
        path = Path(path)
        if not path.is_file():
            raise NotFoundError("no such embeddings file", str(path))
        try:
            with np.load(path, allow_pickle=False) as data:
                missing = [k for k in _REQUIRED if k not in data]
                if missing:
                    raise InputError(f"not a `medlens embed` file (no {', '.join(missing)})", str(path))
                embeddings = np.asarray(data["embeddings"], np.float32).reshape(len(data["sources"]), -1)
                texts = [str(t) for t in data["texts"]] if "texts" in data else []
                text_embeddings = np.asarray(data["text_embeddings"], np.float32) if "text_embeddings" in data else None
                return cls(
                    embeddings,
                    [str(s) for s in data["sources"]],
                    [int(i) for i in data["images"]],
                    [str(label) for label in data["labels"]],
                    str(data["model"]),
                    str(data["fingerprint"]),
                    texts,
                    text_embeddings,
                )
        except InputError:
            raise
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"not a readable .npz file ({exc})", str(path)) from None

    def per_study(self) -> tuple[list[str], np.ndarray, list[str]]:
        """One pooled embedding per source (first-seen order): ``(sources, (k, dim), labels)``."""
        order = list(dict.fromkeys(self.sources))
        rows: dict[str, list[int]] = {s: [] for s in order}
        for i, source in enumerate(self.sources):
            rows[source].append(i)
        pooled = np.stack([pool_embeddings(self.embeddings[rows[s]]) for s in order]) if order else self.embeddings
        labels = [self.labels[rows[s][0]] for s in order]
        return order, pooled, labels
