"""Built-in model names (``test-tiny``, ``gemma-3-270m``, ``test-tiny-siglip``) -> builders of a local folder.

Importing this module is cheap: a builder's module (and torch/transformers) is imported when it first runs.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from medlens.registry import Registry

#: what a model is for: answering (MedGemma and other generators) or embedding (MedSigLIP)
GENERATE, EMBED = "generate", "embed"

TEST_MODEL_WARNING = "test-tiny is an untrained test model with random weights: its answers are noise"
GEMMA_270M_WARNING = "gemma-3-270m is a small base (not instruction-tuned, not medical) model: expect low scores"
TINY_SIGLIP_WARNING = (
    "test-tiny-siglip is an untrained test model with random weights: its embeddings and scores are noise"
)


@dataclass(frozen=True)
class BuiltinModel:
    """A model medlens builds locally; :meth:`build` returns its folder (built on first use, then reused)."""

    name: str
    #: ``module:function(cache=None) -> Path``
    builder: str
    description: str
    purpose: str = GENERATE
    is_test_model: bool = False
    default_max_new_tokens: int = 512
    #: what every result made with it should say
    warning: str | None = None
    #: reads text only (no vision tower): requests with images are refused
    text_only: bool = False

    def build(self, cache: str | os.PathLike[str] | None = None) -> Path:
        module, _, attr = self.builder.partition(":")
        return getattr(importlib.import_module(module), attr)(cache)


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("built-in model")
for _model in (
    BuiltinModel(
        name="test-tiny",
        builder="medlens.models.gemma_tiny:ensure_tiny_model",
        description="Gemma 3 multimodal architecture, tiny random weights, for tests (CPU, seconds)",
        is_test_model=True,
        default_max_new_tokens=16,
        warning=TEST_MODEL_WARNING,
    ),
    BuiltinModel(
        name="gemma-3-270m",
        builder="medlens.models.gguf:ensure_gemma_270m",
        description="Gemma 3 270M base, real weights (Q4_K_M GGUF from an installed package), text only, for "
        "end-to-end runs on a CPU",
        default_max_new_tokens=128,
        warning=GEMMA_270M_WARNING,
        text_only=True,
    ),
    BuiltinModel(
        name="test-tiny-siglip",
        builder="medlens.models.siglip_tiny:ensure_tiny_siglip",
        description="SigLIP architecture at 448 px, tiny random weights, for tests (CPU, seconds)",
        purpose=EMBED,
        is_test_model=True,
        warning=TINY_SIGLIP_WARNING,
    ),
):
    BUILTIN_MODELS.add(_model.name, _model)


def builtin_names(purpose: str) -> list[str]:
    """The built-ins for ``purpose`` (:data:`GENERATE` or :data:`EMBED`)."""
    return [name for name in BUILTIN_MODELS if BUILTIN_MODELS.get(name).purpose == purpose]
