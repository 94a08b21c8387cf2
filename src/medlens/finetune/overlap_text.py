"""Text overlap between a training and a held-out split: shared word 13-grams, the usual decontamination measure.

The text of a row is its question followed by its answer (prompt and target), normalised: Unicode NFKC,
lowercase, every run of punctuation, symbols and whitespace made one space, split into words. A text of at least
``n`` words contributes its word ``n``-grams; a shorter one, when the row has no image inputs (a text-only
example), contributes its whole normalised text as one key. Rows with images and fewer than ``n`` words of text
(a label, a short question) are left to the image checks: equal labels next to different images are no leak.

Keys that occur in many training rows are boilerplate (a template question, a stock "the lungs are clear"
sentence of normal reports), not a copy: a key found in more than ``max(COMMON_MIN_ROWS, common_share x
training rows)`` training rows is ignored. A held-out row overlaps a training row when they share at least one
remaining key (or, with ``min_share``, at least that share of the held-out row's keys); the score is the share of
the held-out row's keys found in that training row.

Keys are Python string hashes held in a dict from key to training rows, so the check is linear in the number of
words on both sides (no pairwise comparison of texts).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from medlens.finetune.overlap_defaults import COMMON_MIN_ROWS, COMMON_SHARE, NGRAM

_SEPARATORS = re.compile(r"[\W_]+")


def normalise(text: str) -> list[str]:
    """The words of ``text``: NFKC, lowercase, punctuation and whitespace runs as one separator."""
    return _SEPARATORS.sub(" ", unicodedata.normalize("NFKC", text).lower()).split()


def text_keys(text: str, n: int = NGRAM, whole: bool = True) -> set[int]:
    """Hashes of the word ``n``-grams of ``text``; of the whole normalised text when it is shorter than ``n``
    words and ``whole`` (empty otherwise)."""
    words = normalise(text)
    if len(words) < n:
        return {hash(("whole", " ".join(words)))} if words and whole else set()
    return {hash(" ".join(words[i : i + n])) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class TextMatch:
    """Held-out row ``held_out`` shares ``shared`` of its ``total`` keys with training row ``train``."""

    train: int
    held_out: int
    shared: int
    total: int

    @property
    def score(self) -> float:
        return self.shared / self.total


def text_matches(
    train: Sequence[set[int]], held_out: Sequence[set[int]], common_share: float = COMMON_SHARE, min_share: float = 0.0
) -> list[TextMatch]:
    """Every (training row, held-out row) pair sharing a key that is not boilerplate (and at least ``min_share``
    of the held-out row's keys); rows by index."""
    index: dict[int, list[int]] = defaultdict(list)
    for row, keys in enumerate(train):
        for key in keys:
            index[key].append(row)
    common = max(COMMON_MIN_ROWS, int(common_share * len(train)))
    matches = []
    for row, keys in enumerate(held_out):
        rare = [key for key in keys if len(index.get(key, ())) <= common]
        counts = Counter(t for key in rare for t in index.get(key, ()))
        matches.extend(TextMatch(t, row, n, len(rare)) for t, n in sorted(counts.items()) if n >= min_share * len(rare))
    return matches
