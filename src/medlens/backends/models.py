"""Built-in model names (``test-tiny``) -> builders that return a local model directory.

Importing this module is cheap: builders import torch/transformers only when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medlens.registry import Registry

TEST_MODEL_WARNING = "test-tiny is an untrained test model with random weights: its answers are noise"

#: what to suggest when a model is not available offline
DOWNLOAD_HINT = (
    "download it on a machine with network, e.g. "
    "`hf download google/medgemma-1.5-4b-it --local-dir DIR`, then pass --model DIR"
)

#: written into a model directory by medlens builders; lets a directory say it holds a test model
MARKER_FILE = "medlens_model.json"


@dataclass(frozen=True)
class BuiltinModel:
    """A model medlens can build locally; calling it returns the directory (built on first use)."""

    name: str
    build: Callable[[], Path]
    description: str
    is_test_model: bool = False
    default_max_new_tokens: int = 512
    warning: str | None = None

    def __call__(self) -> Path:
        return self.build()


def medlens_cache_dir() -> Path:
    """``$MEDLENS_CACHE`` or ``~/.cache/medlens``."""
    return Path(os.environ.get("MEDLENS_CACHE") or Path.home() / ".cache" / "medlens").expanduser()


def _build_test_tiny() -> Path:
    from medlens.backends.tiny import ensure_tiny_model

    return ensure_tiny_model()


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("built-in model")
BUILTIN_MODELS.add(
    "test-tiny",
    BuiltinModel(
        name="test-tiny",
        build=_build_test_tiny,
        description="Gemma 3 multimodal architecture, tiny random weights, for tests (CPU, seconds)",
        is_test_model=True,
        default_max_new_tokens=16,
        warning=TEST_MODEL_WARNING,
    ),
)
