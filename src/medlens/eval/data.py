"""Benchmark items from local files only: a JSONL manifest, a parquet file, or a dataset saved with
``datasets.save_to_disk``, under the data root (``--data`` or ``MEDLENS_DATA``); or a built-in loader that
reads data shipped inside an installed package. Nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medlens.errors import InputError, MedlensError, NotFoundError
from medlens.eval.spec import BenchmarkSpec, loader_function

Item = dict[str, Any]


def data_root(explicit: str | Path | None = None) -> Path:
    """``--data``, else ``$MEDLENS_DATA``, else ``~/medlens-data``."""
    return Path(explicit or os.environ.get("MEDLENS_DATA") or Path.home() / "medlens-data").expanduser()


def load_items(spec: BenchmarkSpec, root: Path, limit: int | None = None) -> list[Item]:
    """The benchmark's items (each with an ``id``), renamed per ``data.fields``; paths stay relative to the
    manifest's folder and are resolved by the hooks through ``item["_base"]``, an absolute folder (the same
    for a Ray worker, whose working directory is its own)."""
    if spec.data.loader:
        items = loader_function(spec.data.loader)(**spec.options.get("loader_options", {}))
        base = root
    else:
        path = root / (spec.data.path or "")
        if not spec.data.path or not path.exists():
            raise NotFoundError(_missing_message(spec, path), str(path))
        items, base = _read(path), path.parent if path.is_file() else path
    out = []
    for number, raw in enumerate(items):
        item = {key: raw.get(column) for key, column in spec.data.fields.items()} if spec.data.fields else dict(raw)
        item.setdefault("id", str(raw.get("id", number)))
        item["_base"] = str(Path(base).absolute())
        out.append(item)
    if not out:
        raise InputError(f"benchmark {spec.name} has no items", str(root / (spec.data.path or "")))
    return out[:limit] if limit else out


def _read(path: Path) -> list[Item]:
    if path.is_dir():
        return _read_saved_dataset(path)
    if path.suffix == ".parquet":
        return _read_parquet(path)
    items = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InputError(f"line {number} is not JSON ({exc.msg})", str(path)) from None
    return items


def _read_parquet(path: Path) -> list[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MedlensError("reading parquet needs pyarrow: pip install pyarrow", str(path)) from None
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> list[Item]:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise MedlensError("reading a saved HF dataset needs `datasets`: pip install datasets", str(path)) from None
    dataset = load_from_disk(str(path))
    return [dict(row) for row in (dataset["test"] if hasattr(dataset, "keys") and "test" in dataset else dataset)]


def _missing_message(spec: BenchmarkSpec, path: Path) -> str:
    parts = [f"benchmark {spec.name} needs its data at {path}"]
    if spec.data.layout:
        parts.append(spec.data.layout)
    if spec.data.source:
        parts.append(f"public dataset: {spec.data.source}")
    parts.append("set --data or MEDLENS_DATA to the folder that holds it")
    return "; ".join(parts)
