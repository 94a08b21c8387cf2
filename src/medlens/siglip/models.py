"""Which SigLIP model a name means: built-ins (``test-tiny-siglip``), a local directory with real weights
(``google/medsiglip-448`` downloaded with ``hf download``), or a repository id in the local Hugging Face cache.

Importing this module is cheap: builders import torch/transformers only when called. Nothing is downloaded.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.backends.models import MARKER_FILE
from medlens.errors import ModelNotAvailableError
from medlens.registry import Registry

TINY_SIGLIP_WARNING = (
    "test-tiny-siglip is an untrained test model with random weights: its embeddings and scores are noise"
)

#: what to suggest when MedSigLIP is not on this machine
MEDSIGLIP_HINT = (
    "download it on a machine with network, e.g. `hf download google/medsiglip-448 --local-dir DIR`, "
    "then pass --model DIR"
)
#: ``model_type`` of a SigLIP checkpoint's config.json (MedSigLIP is one)
SIGLIP_MODEL_TYPE = "siglip"
#: bytes read from the middle of each weight file for the fingerprint
_FINGERPRINT_SAMPLE = 1 << 20
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class BuiltinSiglip:
    """A SigLIP model medlens can build locally; calling it returns its directory (built on first use)."""

    name: str
    build: Callable[[], Path]
    description: str
    is_test_model: bool = False
    warning: str | None = None

    def __call__(self) -> Path:
        return self.build()


@dataclass(frozen=True)
class SiglipSource:
    """A SigLIP model found on this machine: what the user called it, where it is, what to warn about."""

    name: str
    directory: Path
    is_test_model: bool = False
    warning: str | None = None


def _build_tiny_siglip() -> Path:
    from medlens.siglip.tiny import ensure_tiny_siglip

    return ensure_tiny_siglip()


SIGLIP_MODELS: Registry[BuiltinSiglip] = Registry("built-in SigLIP model")
SIGLIP_MODELS.add(
    "test-tiny-siglip",
    BuiltinSiglip(
        name="test-tiny-siglip",
        build=_build_tiny_siglip,
        description="SigLIP architecture at 448 px, tiny random weights, for tests (CPU, seconds)",
        is_test_model=True,
        warning=TINY_SIGLIP_WARNING,
    ),
)


def resolve_siglip(model: str) -> SiglipSource:
    """A built-in name, a local SigLIP directory, or a repository id in the local HF cache -> its directory.

    Raises :class:`ModelNotAvailableError` naming the model and the reason when it is none of these.
    """
    if model in SIGLIP_MODELS:
        builtin = SIGLIP_MODELS.get(model)
        directory = builtin()
        return SiglipSource(model, directory, builtin.is_test_model, builtin.warning)
    path = Path(model).expanduser()
    if path.exists():
        directory = check_siglip_dir(path)
        return _from_directory(str(directory), directory)
    cached = _in_hf_cache(model)
    if cached is not None:
        return _from_directory(model, check_siglip_dir(cached))
    raise ModelNotAvailableError(_not_available_message(model))


def check_siglip_dir(path: Path) -> Path:
    """``path`` if it is a directory holding a SigLIP config, else :class:`ModelNotAvailableError` saying why."""
    if not path.is_dir():
        raise ModelNotAvailableError(f"not a model directory (a file); {MEDSIGLIP_HINT}", str(path))
    config = path / "config.json"
    if not config.is_file():
        raise ModelNotAvailableError(f"not a model directory (no config.json); {MEDSIGLIP_HINT}", str(path))
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelNotAvailableError(f"config.json is not readable JSON ({exc})", str(path)) from None
    if model_type != SIGLIP_MODEL_TYPE:
        raise ModelNotAvailableError(
            f"config.json says model_type {model_type!r}, not {SIGLIP_MODEL_TYPE!r}: MedSigLIP commands need a "
            "SigLIP model (google/medsiglip-448)",
            str(path),
        )
    return path.resolve()


def _from_directory(name: str, directory: Path) -> SiglipSource:
    """A local directory; a medlens-built copy of a test model keeps its warning."""
    marker = _read_marker(directory)
    is_test = bool(marker.get("is_test_model", False))
    warning = marker.get("warning") or (TINY_SIGLIP_WARNING if is_test else None)
    return SiglipSource(name, directory, is_test, warning)


def _read_marker(directory: Path) -> dict[str, Any]:
    try:
        info = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _in_hf_cache(model_id: str) -> Path | None:
    """The snapshot directory of ``model_id`` when it is in the local HF cache (never downloads)."""
    if model_id.count("/") != 1 or model_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, invalid id, offline: all mean "not here"
        return None


def _not_available_message(model: str) -> str:
    close = difflib.get_close_matches(model, SIGLIP_MODELS.names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    known = ", ".join(SIGLIP_MODELS.names())
    return (
        f"SigLIP model {model!r} is not available offline{hint}: not a built-in ({known}), a local directory "
        f"or in the local HF cache; {MEDSIGLIP_HINT}"
    )


def model_fingerprint(directory: Path) -> str:
    """A short tag of a model's config and weights (a slice from the middle of each weight file), so that an
    index or a probe can tell embeddings of another model apart without hashing gigabytes."""
    digest = hashlib.sha256((directory / "config.json").read_bytes())
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in directory.glob(pattern)})
    for path in weights:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            handle.seek(max(0, size // 2 - _FINGERPRINT_SAMPLE // 2))
            digest.update(handle.read(_FINGERPRINT_SAMPLE))
    return digest.hexdigest()[:16]
