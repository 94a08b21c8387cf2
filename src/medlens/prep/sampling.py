"""Which slices of a long volume the model sees."""

from __future__ import annotations

import numpy as np

#: 85 slices x 256 tokens = 21,760 image tokens, MedGemma 1.5's limit per query (docs/recipe.md, Slices)
MEDGEMMA_MAX_SLICES = 85


def sample_indices(n_slices: int, max_slices: int = MEDGEMMA_MAX_SLICES) -> list[int]:
    """All indices when ``n_slices <= max_slices``; else ``max_slices`` equidistant indices along the stack,
    the first and last slice included, in increasing (geometric) order and without repeats."""
    if n_slices < 1 or max_slices < 1:
        raise ValueError("need at least one slice")
    if n_slices <= max_slices:
        return list(range(n_slices))
    if max_slices == 1:
        return [n_slices // 2]
    return [int(i) for i in np.rint(np.linspace(0, n_slices - 1, max_slices))]
