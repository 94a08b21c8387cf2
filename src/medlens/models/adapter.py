"""PEFT adapters (LoRA and its relatives) on top of a base model: what a folder holds, its identity, and whether
it fits the model it is put on.

An adapter folder is what peft's ``save_pretrained`` writes (``adapter_config.json`` and
``adapter_model.safetensors``, or the older ``adapter_model.bin``), optionally with ``medlens_adapter.json``
written by ``medlens finetune`` (the base model's name and revision, the recipe ...). Its identity is the
SHA-256 of the config and weight files' names and bytes, so that every result made with it (the eval journal
key, the envelope, the SR's algorithm identification) changes when the adapter does. Reading a folder needs
no torch; :func:`attach_adapter` puts it on a loaded transformers model with peft (imported there).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medlens.errors import BackendUnavailableError, InputError

CONFIG_FILE = "adapter_config.json"
#: the weight files peft writes, preferred first
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: written by ``medlens finetune`` beside peft's files; optional
MEDLENS_FILE = "medlens_adapter.json"
#: hex characters of the adapter hash kept in a backend's fingerprint
TAG_LENGTH = 16
#: a config file larger than this is not a PEFT config
_MAX_JSON_BYTES = 1 << 20
_BLOCK = 1 << 20


class AdapterError(InputError):
    """The folder is not a PEFT adapter, or the adapter does not fit the model it is put on."""


@dataclass(frozen=True)
class AdapterInfo:
    """An adapter folder as read from disk (nothing loaded)."""

    path: Path
    #: the folder's name
    name: str
    #: SHA-256 of the config and weight files (names and bytes)
    sha256: str
    peft_type: str
    weights: Path
    #: LoRA rank (``r``) when the config has one
    rank: int | None = None
    #: from ``medlens_adapter.json`` (None for a plain PEFT folder)
    base_model: str | None = None
    base_revision: str | None = None

    def identity(self) -> dict[str, str]:
        """What results record about the adapter: ``{"name", "sha256"}``."""
        return {"name": self.name, "sha256": self.sha256}

    def fingerprint(self, base: str) -> str:
        """The fingerprint of ``base`` weights with this adapter on them."""
        return f"{base}+adapter:{self.sha256[:TAG_LENGTH]}"

    def check_base(self, model_name: str, base_revision: str) -> None:
        """Refuse a model other than the one ``medlens_adapter.json`` says the adapter was trained on: by
        revision (the base weights' fingerprint) when recorded, else by the name given to ``finetune``."""
        if self.base_revision is not None and self.base_revision != base_revision:
            raise AdapterError(
                f"the adapter was trained on {self.base_model or 'another model'} (revision {self.base_revision}), "
                f"not on {model_name} (revision {base_revision}); load it on its own base model",
                str(self.path),
            )
        if self.base_revision is None and self.base_model is not None and self.base_model != model_name:
            raise AdapterError(
                f"the adapter was trained on {self.base_model}, not on {model_name}; load it on its own base model",
                str(self.path),
            )


def read_adapter(path: str | Path) -> AdapterInfo:
    """The adapter in folder ``path``; :class:`AdapterError` naming the folder when it is not a PEFT adapter."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise AdapterError("no such adapter folder", str(folder))
    if not folder.is_dir():
        raise AdapterError(
            f"an adapter is a folder with {CONFIG_FILE} (peft's save_pretrained), not a file", str(folder)
        )
    config = _read_json(folder / CONFIG_FILE, folder, required=True)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or not peft_type:
        raise AdapterError(f"{CONFIG_FILE} names no peft_type: not a PEFT adapter", str(folder))
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise AdapterError(f"no adapter weights ({' or '.join(WEIGHT_FILES)}) beside {CONFIG_FILE}", str(folder))
    meta = _read_json(folder / MEDLENS_FILE, folder, required=False)
    rank = config.get("r")
    return AdapterInfo(
        path=folder.resolve(),
        name=folder.resolve().name,
        sha256=_content_hash(folder / CONFIG_FILE, weights),
        peft_type=peft_type,
        weights=weights,
        rank=rank if isinstance(rank, int) and not isinstance(rank, bool) else None,
        base_model=_text(meta.get("base_model")),
        base_revision=_text(meta.get("base_revision")),
    )


def attach_adapter(model: Any, info: AdapterInfo) -> Any:
    """``model`` (a loaded transformers model) with the adapter's layers injected and its weights loaded, in
    eval mode: the same model object's ``forward``/``generate`` then run through the adapter. A config whose
    target modules the model lacks, weights of other shapes, or weights that leave adapter layers unset are an
    :class:`AdapterError` naming the folder."""
    try:
        import peft
    except ImportError as exc:
        raise BackendUnavailableError(
            f"adapters need peft ({exc.name} is missing): pip install 'medlens[finetune]'"
        ) from None
    folder = str(info.path)
    try:
        config = peft.PeftConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError, OSError) as exc:
        raise AdapterError(
            f"{CONFIG_FILE} is not a PEFT config peft {peft.__version__} reads ({_short(exc)})", folder
        ) from None
    if config.is_prompt_learning:
        raise AdapterError(
            f"{info.peft_type} adapters add virtual tokens, which medlens's generate paths do not carry; "
            "use a LoRA-type adapter",
            folder,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = peft.PeftModel.from_pretrained(model, folder, is_trainable=False)
    except (ValueError, RuntimeError, KeyError, TypeError, OSError) as exc:
        raise AdapterError(f"the adapter does not fit the model: {_short(exc)}", folder) from None
    _check_keys(peft, wrapped, info)
    wrapped.eval()
    return wrapped.get_base_model()


def _check_keys(peft: Any, wrapped: Any, info: AdapterInfo) -> None:
    """Every adapter weight the injected layers need is in the file, and the file holds no others."""
    expected = set(peft.get_peft_model_state_dict(wrapped).keys())
    saved = set(peft.utils.load_peft_weights(str(info.path), device="cpu").keys())
    missing, unexpected = sorted(expected - saved), sorted(saved - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter weights missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} weights for layers the model lacks (first: {unexpected[0]})")
        raise AdapterError(f"the adapter does not fit the model: {'; '.join(parts)}", str(info.path))


def _read_json(path: Path, folder: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise AdapterError(
                f"no {CONFIG_FILE}: not a PEFT adapter folder (peft's save_pretrained writes one)", str(folder)
            )
        return {}
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise AdapterError(f"{path.name} is larger than {_MAX_JSON_BYTES >> 20} MB", str(folder))
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise AdapterError(f"{path.name} is not valid JSON ({type(exc).__name__})", str(folder)) from None
    if not isinstance(value, dict):
        raise AdapterError(f"{path.name} is not a JSON object", str(folder))
    return value


def _content_hash(*files: Path) -> str:
    digest = hashlib.sha256()
    for file in files:
        digest.update(f"{file.name}\0{file.stat().st_size}\0".encode())
        with file.open("rb") as handle:
            while block := handle.read(_BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _text(value: Any) -> str | None:
    return str(value) if value not in (None, "") else None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
