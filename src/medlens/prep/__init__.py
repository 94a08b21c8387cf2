"""Preparation recipes (pure functions over arrays), registered by name; ``medgemma-1.5`` is the default."""

from __future__ import annotations

from medlens.prep.recipes import RECIPES, Prepared, Recipe, family_of, prepare
from medlens.prep.sampling import MEDGEMMA_MAX_SLICES, sample_indices
from medlens.prep.windows import MEDGEMMA_CT_WINDOWS, ct_to_rgb

DEFAULT_RECIPE = "medgemma-1.5"

__all__ = [
    "DEFAULT_RECIPE",
    "MEDGEMMA_CT_WINDOWS",
    "MEDGEMMA_MAX_SLICES",
    "RECIPES",
    "Prepared",
    "Recipe",
    "ct_to_rgb",
    "family_of",
    "prepare",
    "sample_indices",
]
