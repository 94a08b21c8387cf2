"""medlens: run MedGemma on real clinical data, prepared exactly as MedGemma 1.5 expects.

Research use only, not for clinical decisions. Heavy libraries (torch, transformers) load lazily,
only when a model backend is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

DISCLAIMER = "Research use only, not for clinical decisions."

__all__ = ["DISCLAIMER", "__version__"]
