"""Preparation recipes (pure functions over arrays), registered by name; ``medgemma-1.5`` is the default.

:func:`prepare_study` reads a study and runs a recipe on it; :func:`write_prepared` writes what it made.
"""

from __future__ import annotations

from medlens.prep.prepared import Prepared
from medlens.prep.recipes import DEFAULT_RECIPE, RECIPES, Recipe, family_of, prepare
from medlens.prep.sampling import MEDGEMMA_MAX_SLICES, sample_indices
from medlens.prep.study import prepare_study, write_prepared
from medlens.prep.windows import MEDGEMMA_CT_WINDOWS, ct_to_rgb

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
    "prepare_study",
    "sample_indices",
    "write_prepared",
]
