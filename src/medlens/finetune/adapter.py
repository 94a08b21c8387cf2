"""Adapter folders: a standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``, written by
peft's ``save_pretrained``) plus ``medlens_adapter.json`` (base model, its revision, recipe, task, versions);
loading one on top of its base, and merging it into a full model folder that ``medlens ask --model DIR`` runs."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medlens import __version__
from medlens.errors import InputError, NotFoundError
from medlens.files import write_json_atomic

#: medlens' own description of an adapter, next to PEFT's files
METADATA = "medlens_adapter.json"


def save_adapter(model: Any, folder: Path, base_model: str, base_revision: str, recipe: str, task: str) -> Path:
    """Write the PEFT adapter of ``model`` (a ``PeftModel``) and its ``medlens_adapter.json`` to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    metadata = {
        "base_model": base_model,
        "base_revision": base_revision,
        "recipe": recipe,
        "task": task,
        "medlens_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_json_atomic(folder / METADATA, metadata)
    return folder


def read_metadata(folder: Path) -> dict[str, Any]:
    """``medlens_adapter.json`` of an adapter folder (a typed error when the folder is no adapter)."""
    folder = Path(folder)
    if not (folder / "adapter_config.json").is_file():
        raise NotFoundError("not an adapter folder (no adapter_config.json)", str(folder))
    path = folder / METADATA
    if not path.is_file():
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        return {"base_model": config.get("base_model_name_or_path")}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{METADATA} is not JSON ({exc.msg})", str(path)) from None


def attach(backend: Any, folder: Path) -> Any:
    """Put the adapter in ``folder`` on the backend's model (in place; the backend then generates with it)."""
    from peft import PeftModel

    read_metadata(folder)
    backend.model = PeftModel.from_pretrained(backend.model, str(folder)).eval()
    return backend


def merge(folder: Path, out: Path, base_model: str | None = None, device: str = "cpu") -> Path:
    """The base model with the adapter merged in, saved as a model folder (weights, config, tokenizer or
    processor) at ``out``; the base is ``medlens_adapter.json``'s unless ``base_model`` is given."""
    from medlens.backends import load_backend

    metadata = read_metadata(folder)
    base = base_model or metadata.get("base_model")
    if not base:
        raise InputError("the adapter does not name its base model; give --base", str(folder))
    backend = load_backend(base, "transformers", device=device)
    try:
        attach(backend, folder)
        merged = backend.model.merge_and_unload()
        out.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(out))
        (backend.processor or backend.tokenizer).save_pretrained(str(out))
        write_json_atomic(out / "medlens_merged.json", {**metadata, "adapter": str(Path(folder).resolve())})
    finally:
        backend.close()
    return out


__all__ = ["METADATA", "attach", "merge", "read_metadata", "save_adapter"]
