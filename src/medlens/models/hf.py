"""Hugging Face plumbing shared by every model that loads here: the lazy torch/transformers import with a clear
error, progress bars and warnings switched off while loading, and loader errors turned into medlens errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medlens.errors import BackendUnavailableError, ModelNotAvailableError
from medlens.models.cache import write_marker


def import_torch_transformers(what: str = "the transformers backend") -> tuple[Any, Any]:
    """``(torch, transformers)``, or :class:`BackendUnavailableError` saying what to install."""
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError(
            f"{what} needs torch and transformers ({exc.name} is missing): pip install 'medlens[models]'"
        ) from None
    return torch, transformers


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' and huggingface_hub's progress bars on or off for the duration of the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


@contextlib.contextmanager
def hushed_warnings() -> Iterator[None]:
    """transformers' warnings hushed for the block (SigLIP's default config warns about its token ids on every
    load although MedSigLIP's own ids are used)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


@contextlib.contextmanager
def loader_errors(model: str, hint: str) -> Iterator[None]:
    """A loader's ``OSError``/``ValueError`` (missing or broken files; nothing is downloaded) becomes
    :class:`ModelNotAvailableError`, a missing optional library :class:`BackendUnavailableError`."""
    try:
        yield
    except ImportError as exc:  # e.g. a SentencePiece-only tokenizer without the sentencepiece package
        raise BackendUnavailableError(f"loading {model!r} needs a missing library ({exc})") from exc
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotAvailableError(f"model {model!r} could not be loaded offline ({reason}); {hint}") from exc


def save_built(directory: Path, parts: Iterable[Any], info: dict[str, Any]) -> None:
    """``save_pretrained`` every part (model, processor, tokenizer) into ``directory`` without progress bars,
    then the marker file, last: a built-in's folder is complete once its marker exists."""
    with progress_bars(False):
        for part in parts:
            part.save_pretrained(directory)
    write_marker(directory, info)
