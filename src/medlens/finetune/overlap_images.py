"""What the image checks of the overlap guard compare: content hashes of input files, perceptual hashes of the
prepared images, and (optionally) their MedSigLIP embeddings.

- Exact: SHA-256 of every local input file (each file of a folder, hidden and empty files left out), so a file
  copied under another name or into another folder is found; a ``dicomweb://`` reference by its text.
- Near: the 64-bit DCT perceptual hash (``imagehash.phash``) of every image the row's recipe prepares (the
  images the model is trained on, e.g. the 85 windowed slices of a CT), compared by Hamming distance through a
  multi-index: the hash is cut into ``distance + 1`` bands, and two hashes within ``distance`` bits agree
  exactly on at least one band (pigeonhole), so only hashes sharing a band are compared.
- Embedding: cosine of L2-normalised MedSigLIP image embeddings, in blocks of held-out images against all
  training images.

Images with (almost) no contrast (standard deviation below :data:`FLAT_STD`: blank slices, padding) hash alike
whatever they came from and are left out of the near and embedding checks.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import InputError, NotFoundError
from medlens.files import sha256_of
from medlens.finetune.manifest import TrainRow

#: grey-level standard deviation below which an image counts as blank
FLAT_STD = 1.0
HASH_BITS = 64
#: held-out images per block of the embedding comparison
BLOCK = 1024


@dataclass
class RowImages:
    """What one row's inputs hash to: file hashes (-> the input they came from) and image hashes / embeddings."""

    files: dict[str, str] = field(default_factory=dict)
    phashes: list[int] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)


def file_hashes(ref: Path | str) -> dict[str, str]:
    """SHA-256 -> file name of an input: each file of a folder, the file itself, or a remote reference's text."""
    if isinstance(ref, str):
        return {"ref:" + sha256_of_text(ref): ref}
    if not ref.exists():
        raise NotFoundError("input does not exist", str(ref))
    files = sorted(p for p in ref.rglob("*") if p.is_file()) if ref.is_dir() else [ref]
    out = {}
    for file in files:
        relative = file.relative_to(ref) if ref.is_dir() else Path(file.name)
        try:
            if any(part.startswith(".") for part in relative.parts) or file.stat().st_size == 0:
                continue
            out[sha256_of(file)] = str(file)
        except OSError as exc:
            raise InputError(f"cannot read ({exc.strerror or exc})", str(file)) from None
    return out


def sha256_of_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def is_flat(image: np.ndarray) -> bool:
    """True for an image with (almost) no contrast."""
    grey = image.mean(axis=-1) if image.ndim == 3 else image
    return float(np.std(grey)) < FLAT_STD


def perceptual_hash(image: np.ndarray) -> int:
    """The 64-bit DCT perceptual hash of an RGB uint8 image, as an integer."""
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(image))).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def row_images(
    row: TrainRow,
    prepared: Callable[[Path | str, TrainRow], list[np.ndarray]],
    embed: Callable[[list[np.ndarray]], np.ndarray] | None = None,
) -> RowImages:
    """File hashes, perceptual hashes and (with ``embed``) embeddings of every input of ``row``."""
    out = RowImages()
    for ref in row.inputs:
        out.files.update(file_hashes(ref))
        images = [image for image in prepared(ref, row) if not is_flat(image)]
        out.phashes.extend(perceptual_hash(image) for image in images)
        if embed is not None and images:
            out.embeddings.extend(embed(images))
    return out


class HammingIndex:
    """Integers of ``bits`` bits, found again within a Hamming distance by exact lookups on bands."""

    def __init__(self, distance: int, bits: int = HASH_BITS) -> None:
        self.distance = distance
        bands = min(bits, distance + 1)
        edges = np.linspace(0, bits, bands + 1).astype(int)
        self.bands = [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in pairwise(edges)]
        self.tables: list[dict[int, list[tuple[int, int]]]] = [defaultdict(list) for _ in self.bands]

    def add(self, value: int, owner: int) -> None:
        for table, (shift, mask) in zip(self.tables, self.bands, strict=True):
            table[(value >> shift) & mask].append((value, owner))

    def near(self, value: int) -> dict[int, int]:
        """owner -> smallest Hamming distance of its values within ``distance`` of ``value``."""
        found: dict[int, int] = {}
        for table, (shift, mask) in zip(self.tables, self.bands, strict=True):
            for other, owner in table.get((value >> shift) & mask, ()):
                d = (value ^ other).bit_count()
                if d <= self.distance and d < found.get(owner, HASH_BITS + 1):
                    found[owner] = d
        return found


def phash_matches(
    train: Sequence[RowImages], held_out: Sequence[RowImages], distance: int
) -> dict[tuple[int, int], int]:
    """(training row, held-out row) -> smallest Hamming distance between their images, for pairs within
    ``distance``."""
    index = HammingIndex(distance)
    for row, images in enumerate(train):
        for value in set(images.phashes):
            index.add(value, row)
    out: dict[tuple[int, int], int] = {}
    for row, images in enumerate(held_out):
        for value in set(images.phashes):
            for owner, d in index.near(value).items():
                key = (owner, row)
                out[key] = min(d, out.get(key, HASH_BITS + 1))
    return out


def exact_matches(train: Sequence[RowImages], held_out: Sequence[RowImages]) -> dict[tuple[int, int], tuple[str, str]]:
    """(training row, held-out row) -> (training file, held-out file) of the first identical file they share."""
    index: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row, images in enumerate(train):
        for digest, name in images.files.items():
            index[digest].append((row, name))
    out: dict[tuple[int, int], tuple[str, str]] = {}
    for row, images in enumerate(held_out):
        for digest, name in images.files.items():
            for owner, train_name in index.get(digest, ()):
                out.setdefault((owner, row), (train_name, name))
    return out


def embedding_matches(
    train: Sequence[RowImages], held_out: Sequence[RowImages], threshold: float
) -> dict[tuple[int, int], float]:
    """(training row, held-out row) -> highest cosine between their image embeddings, for pairs >= ``threshold``."""
    train_vectors, train_rows = _stack(train)
    held_vectors, held_rows = _stack(held_out)
    out: dict[tuple[int, int], float] = {}
    if not len(train_vectors) or not len(held_vectors):
        return out
    for start in range(0, len(held_vectors), BLOCK):
        cosine = held_vectors[start : start + BLOCK] @ train_vectors.T
        for i, j in zip(*np.nonzero(cosine >= threshold), strict=True):
            key = (int(train_rows[j]), int(held_rows[start + i]))
            out[key] = max(float(cosine[i, j]), out.get(key, -1.0))
    return out


def _stack(rows: Sequence[RowImages]) -> tuple[np.ndarray, np.ndarray]:
    vectors: list[Any] = [v for images in rows for v in images.embeddings]
    owners = [row for row, images in enumerate(rows) for _ in images.embeddings]
    if not vectors:
        return np.zeros((0, 1), np.float32), np.zeros(0, int)
    return np.stack(vectors).astype(np.float32), np.asarray(owners)
