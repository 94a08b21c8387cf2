"""Built-in model names (``test-tiny``, ``gemma-3-270m``) -> builders that return a local model directory.

Importing this module is cheap: builders import torch/transformers only when called.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medlens.registry import Registry

TEST_MODEL_WARNING = "test-tiny is an untrained test model with random weights: its answers are noise"
GEMMA_270M_WARNING = "gemma-3-270m is a small base (not instruction-tuned, not medical) model: expect low scores"

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
    #: what every result made with it should say
    warning: str | None = None
    #: reads text only (no vision tower): requests with images are refused
    text_only: bool = False

    def __call__(self) -> Path:
        return self.build()


def build_once(final: Path, fill: Callable[[Path], None], complete: Callable[[Path], bool] | None = None) -> Path:
    """``final`` once it is ``complete`` (default: its marker file exists); otherwise built by ``fill``-ing a
    private folder beside it that is then renamed into place, so a half-built folder is never seen. A folder
    that exists but is not complete is removed first; a concurrent builder that won the race is fine."""
    done = complete or (lambda folder: (folder / MARKER_FILE).is_file())
    if done(final):
        return final
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not done(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def medlens_cache_dir() -> Path:
    """``$MEDLENS_CACHE`` or ``~/.cache/medlens``."""
    return Path(os.environ.get("MEDLENS_CACHE") or Path.home() / ".cache" / "medlens").expanduser()


def _build_test_tiny() -> Path:
    from medlens.backends.tiny import ensure_tiny_model

    return ensure_tiny_model()


def _build_gemma_270m() -> Path:
    from medlens.backends.gguf_models import ensure_gemma_270m

    return ensure_gemma_270m()


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
BUILTIN_MODELS.add(
    "gemma-3-270m",
    BuiltinModel(
        name="gemma-3-270m",
        build=_build_gemma_270m,
        description="Gemma 3 270M base, real weights (Q4_K_M GGUF from an installed package), text only, for "
        "end-to-end runs on a CPU",
        default_max_new_tokens=128,
        warning=GEMMA_270M_WARNING,
        text_only=True,
    ),
)
