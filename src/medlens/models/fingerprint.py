"""One fingerprint of a model's files, used wherever results must not mix models: the evaluation journal keys,
the MedSigLIP search index and probes, and fine-tuning runs.

Hashing every byte of 8-50 GB of weights would take minutes, so large files contribute their name, size and
three samples (start, middle, end); small files (configs, chat templates, most tokenizers) are hashed whole.
A retrained or re-quantised checkpoint changes its size or its sampled bytes; a renamed copy does not change
the fingerprint. Hidden files and folders (``.cache`` of ``hf download --local-dir``) are left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: files up to this size are hashed whole
WHOLE_FILE_BYTES = 4 << 20
#: bytes read at the start, middle and end of a larger file
SAMPLE_BYTES = 1 << 20
#: hex characters kept
LENGTH = 16


def model_fingerprint(path: str | Path) -> str:
    """A short tag of a model directory's files (or of one weights file, e.g. a ``.gguf``)."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        _add_file(digest, path, path.name)
        return digest.hexdigest()[:LENGTH]
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue
        _add_file(digest, file, relative.as_posix())
    return digest.hexdigest()[:LENGTH]


def _add_file(digest: Any, file: Path, name: str) -> None:
    size = file.stat().st_size
    digest.update(f"{name}\0{size}\0".encode())
    with file.open("rb") as handle:
        if size <= WHOLE_FILE_BYTES:
            digest.update(handle.read())
            return
        for offset in (0, size // 2 - SAMPLE_BYTES // 2, size - SAMPLE_BYTES):
            handle.seek(offset)
            digest.update(handle.read(SAMPLE_BYTES))
