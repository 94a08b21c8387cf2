"""Small synthetic training sets for the fine-tuning tests: PNGs, a CT series, a two-image (compare) row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from dicom_factory import write_series
from PIL import Image


def write_png(path: Path, seed: int, size: int = 48) -> Path:
    pixels = (np.random.default_rng(seed).random((size, size, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(path)
    return path


def write_ct(folder: Path, slices: int = 6) -> Path:
    rng = np.random.default_rng(7)
    arrays = [(rng.random((32, 32)) * 2000).astype("int16") for _ in range(slices)]
    write_series(folder, arrays, positions=[(0, 0, float(i)) for i in range(slices)])
    return folder


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def mixed_set(folder: Path, n_png: int = 4) -> Path:
    """A manifest of single-image qa rows, one CT volume row and one two-image compare row."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_png):
        write_png(folder / f"{i}.png", i)
        answer = "Final Answer: yes" if i % 2 else "Final Answer: no"
        rows.append({"id": f"png{i}", "inputs": [f"{i}.png"], "question": "Is there an effusion?", "answer": answer})
    write_ct(folder / "ct")
    rows.append({"id": "ct", "inputs": ["ct"], "question": "Is there a nodule?", "answer": "Final Answer: no"})
    write_png(folder / "prior.png", 100)
    write_png(folder / "current.png", 101)
    rows.append(
        {
            "id": "pair",
            "inputs": ["prior.png", "current.png"],
            "task": "compare",
            "question": "Change?",
            "answer": "Final Answer: stable",
        }
    )
    return write_manifest(folder / "train.jsonl", rows)
