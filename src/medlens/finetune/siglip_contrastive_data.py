"""Image-text pairs for MedSigLIP fine-tuning, from a JSONL manifest or a CSV, and their images.

JSONL: one object per line, ``{"inputs": ["cxr.png", "ct/series1"], "text": "a chest X-ray with ..."}``
(``id`` optional). CSV: columns ``path`` and ``text`` (or ``label``, used as the text). Paths are relative to
the manifest's folder unless absolute. A row's images are every image its inputs prepare to, read by
:func:`medlens.prep.prepare_study` exactly as ``medlens embed`` reads them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medlens.errors import InputError, NotFoundError
from medlens.prep import DEFAULT_RECIPE, prepare_study

CSV_TEXT_COLUMNS = ("text", "label")


@dataclass(frozen=True)
class PairRow:
    """One training pair: the studies whose images make the image side, and the text."""

    id: str
    inputs: tuple[Path, ...]
    text: str


def read_pairs(path: str | Path) -> list[PairRow]:
    """The rows of a JSONL (or ``.csv``) pair manifest; at least two, each with inputs and a non-empty text."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError("no such manifest file", str(path))
    try:
        rows = _read_csv(path) if path.suffix.lower() == ".csv" else _read_jsonl(path)
    except UnicodeDecodeError as exc:
        raise InputError(f"not a readable UTF-8 file ({exc})", str(path)) from None
    if len(rows) < 2:
        raise InputError(f"contrastive fine-tuning needs at least 2 pairs, the manifest has {len(rows)}", str(path))
    return rows


def _resolve(base: Path, given: str) -> Path:
    candidate = Path(given).expanduser()
    return candidate if candidate.is_absolute() else base / candidate


def _read_jsonl(path: Path) -> list[PairRow]:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except ValueError as exc:
            raise InputError(f"line {number}: not JSON ({exc.__class__.__name__})", str(path)) from None
        if not isinstance(value, dict):
            raise InputError(f"line {number}: not a JSON object", str(path))
        inputs, text = value.get("inputs"), value.get("text")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(i, str) and i for i in inputs):
            raise InputError(f'line {number}: "inputs" must be a non-empty list of paths', str(path))
        if not isinstance(text, str) or not text.strip():
            raise InputError(f'line {number}: "text" must be a non-empty string', str(path))
        row_id = str(value.get("id") or f"row{number}")
        rows.append(PairRow(row_id, tuple(_resolve(path.parent, i) for i in inputs), text.strip()))
    return rows


def _read_csv(path: Path) -> list[PairRow]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [(c or "").strip().lower() for c in reader.fieldnames or []]
            text_column = next((c for c in CSV_TEXT_COLUMNS if c in columns), None)
            if "path" not in columns or text_column is None:
                found = ", ".join(c for c in columns if c) or "none"
                raise InputError(f"the CSV needs the columns path and text (or label) (found: {found})", str(path))
            records = [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
    except csv.Error as exc:
        raise InputError(f"not a readable CSV ({exc})", str(path)) from None
    rows = []
    for number, record in enumerate(records, start=2):  # line 1 is the header
        if not any(record.values()):
            continue
        if not record.get("path") or not record.get(text_column):
            raise InputError(f"line {number}: empty path or {text_column}", str(path))
        rows.append(PairRow(f"row{number}", (_resolve(path.parent, record["path"]),), record[text_column]))
    return rows


def row_images(row: PairRow, recipe: str = DEFAULT_RECIPE, modality: str | None = None) -> list[np.ndarray]:
    """Every RGB uint8 image the row's inputs prepare to (in input order); a typed error names a bad input."""
    images: list[np.ndarray] = []
    for given in row.inputs:
        prepared = prepare_study(given, recipe=recipe, modality=modality)
        if not prepared.images:
            raise InputError("no images to embed", str(given))
        images.extend(prepared.images)
    return images


def same_text_mask(texts: Sequence[str]) -> np.ndarray:
    """``(n, n)`` bool: True where two texts of a batch are the same (after trimming and case folding)."""
    keys = [t.strip().casefold() for t in texts]
    return np.asarray([[a == b for b in keys] for a in keys], dtype=bool)
