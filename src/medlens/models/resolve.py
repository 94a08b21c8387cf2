"""Which model a name means, for every engine that loads weights here and for MedSigLIP.

A name is a built-in (``test-tiny``, ``gemma-3-270m``, ``test-tiny-siglip``: built into the medlens cache
on first use), a local directory (e.g. ``hf download google/medgemma-1.5-4b-it --local-dir DIR``), a
``.gguf`` file, or a repository id already in the local Hugging Face cache. Nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.errors import ModelNotAvailableError
from medlens.models.builtins import BUILTIN_MODELS, EMBED, GENERATE, builtin_names
from medlens.models.cache import MARKER_FILE, read_marker

#: what to suggest when a model is not on this machine, by purpose
DOWNLOAD_HINTS = {
    GENERATE: "download it on a machine with network, e.g. "
    "`hf download google/medgemma-1.5-4b-it --local-dir DIR`, then pass --model DIR",
    EMBED: "download it on a machine with network, e.g. `hf download google/medsiglip-448 --local-dir DIR`, "
    "then pass --model DIR",
}
#: ``model_type`` of a SigLIP checkpoint's config.json (MedSigLIP is one)
SIGLIP_MODEL_TYPE = "siglip"


@dataclass(frozen=True)
class ModelSource:
    """A model found on this machine: what the user called it, where it is, and what its folder says."""

    name: str
    #: the model directory, or the ``.gguf`` file given directly
    path: Path
    purpose: str = GENERATE
    is_test_model: bool = False
    warning: str | None = None
    default_max_new_tokens: int = 512
    #: True: no vision tower; None: the model's config decides
    text_only: bool | None = None
    #: GGUF models: the weights file, and the folder of a tokenizer converted from it (if any)
    gguf_file: Path | None = None
    tokenizer_dir: Path | None = None
    #: ``config.json``'s ``model_type`` (None for GGUF files)
    model_type: str | None = None


def resolve_model(model: str, purpose: str = GENERATE) -> ModelSource:
    """A built-in name, a local directory, a ``.gguf`` file or a cached HF repository id -> its source.

    ``purpose`` is :data:`GENERATE` (MedGemma and other generators) or :data:`EMBED` (MedSigLIP); a model of
    the other kind is refused. Raises :class:`ModelNotAvailableError` naming the model and the reason.
    """
    hint = DOWNLOAD_HINTS[purpose]
    if model in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS.get(model)
        if builtin.purpose != purpose:
            close = difflib.get_close_matches(model, builtin_names(purpose), n=1) or builtin_names(purpose)[:1]
            raise ModelNotAvailableError(
                f"{model} is a model to {builtin.purpose} with, not to {purpose} with; did you mean {close[0]!r}?"
            )
        defaults = {
            "is_test_model": builtin.is_test_model,
            "warning": builtin.warning,
            "default_max_new_tokens": builtin.default_max_new_tokens,
            "text_only": builtin.text_only or None,
        }
        return _from_directory(model, builtin.build(), purpose, defaults)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf" and purpose == GENERATE:
            return ModelSource(model, path.resolve(), purpose, text_only=True, gguf_file=path.resolve())
        raise ModelNotAvailableError(f"not a model directory (a file); {hint}", str(path))
    if path.is_dir():
        return _from_directory(model, path.resolve(), purpose)
    cached = None if _looks_like_path(model) else _in_hf_cache(model)
    if cached is not None:
        return _from_directory(model, cached, purpose)
    raise ModelNotAvailableError(_not_available_message(model, purpose))


def _from_directory(name: str, directory: Path, purpose: str, defaults: dict[str, Any] | None = None) -> ModelSource:
    """What a model directory holds: its marker file (medlens-built models) over the built-in's defaults."""
    hint = DOWNLOAD_HINTS[purpose]
    info = {**(defaults or {}), **read_marker(directory)}
    warning = info.get("warning")
    if warning is None and info.get("name") in BUILTIN_MODELS:  # a medlens-built copy keeps its warning
        warning = BUILTIN_MODELS.get(info["name"]).warning
    common = {
        "is_test_model": bool(info.get("is_test_model", False)),
        "warning": warning,
        "default_max_new_tokens": int(info.get("default_max_new_tokens") or 512),
    }
    if info.get("format") == "gguf":
        if purpose != GENERATE:
            raise ModelNotAvailableError("a GGUF model cannot embed images; give a SigLIP model", str(directory))
        if not info.get("gguf_file"):
            raise ModelNotAvailableError(f"the {MARKER_FILE} of a GGUF model names no gguf_file", str(directory))
        tokenizer = directory / info["tokenizer"] if info.get("tokenizer") else None
        gguf_file = directory / str(info["gguf_file"])
        return ModelSource(
            name, directory, purpose, text_only=True, gguf_file=gguf_file, tokenizer_dir=tokenizer, **common
        )
    model_type = _model_type(directory, hint)
    if purpose == EMBED and model_type != SIGLIP_MODEL_TYPE:
        raise ModelNotAvailableError(
            f"config.json says model_type {model_type!r}, not {SIGLIP_MODEL_TYPE!r}: MedSigLIP commands need a "
            "SigLIP model (google/medsiglip-448)",
            str(directory),
        )
    if purpose == GENERATE and model_type == SIGLIP_MODEL_TYPE:
        raise ModelNotAvailableError(
            "a SigLIP model embeds, it does not answer: use it with medlens embed, zeroshot, probe or search, "
            "and a MedGemma model here",
            str(directory),
        )
    text_only = info.get("text_only")
    return ModelSource(
        name,
        directory,
        purpose,
        text_only=None if text_only is None else bool(text_only),
        model_type=model_type,
        **common,
    )


def _model_type(directory: Path, hint: str) -> str | None:
    config = directory / "config.json"
    if not config.is_file():
        raise ModelNotAvailableError(f"not a model directory (no config.json); {hint}", str(directory))
    try:
        value = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotAvailableError(f"config.json is not readable JSON ({exc})", str(directory)) from None
    if not isinstance(value, dict):
        raise ModelNotAvailableError("config.json is not a JSON object", str(directory))
    return value.get("model_type")


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def _in_hf_cache(model_id: str) -> Path | None:
    """The snapshot directory of ``model_id`` when it is in the local HF cache (never downloads)."""
    if model_id.count("/") != 1:
        return None
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        return None
    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, an invalid id, offline: all mean "not here"
        return None


def _not_available_message(model: str, purpose: str) -> str:
    names = builtin_names(purpose)
    close = difflib.get_close_matches(model, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if _looks_like_path(model):
        where = "no such directory"
    else:
        where = f"not a built-in ({', '.join(names)}), a local directory or in the local HF cache"
    return f"model {model!r} is not available offline{hint}: {where}; {DOWNLOAD_HINTS[purpose]}"
