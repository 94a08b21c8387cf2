"""Re-export of :mod:`medlens.models.siglip_encoder` (the encoder lives in the models layer so that other
consumers, e.g. fine-tuning and overlap checks, can embed without importing :mod:`medlens.siglip`)."""

from __future__ import annotations

from medlens.models.siglip_encoder import TEXT_TOKENS, Progress, SiglipEncoder, normalize_rows

__all__ = ["TEXT_TOKENS", "Progress", "SiglipEncoder", "normalize_rows"]
