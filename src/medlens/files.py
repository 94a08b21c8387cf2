"""Files: content hashes, and writes that happen all at once or not at all (a synced temporary file, renamed).

Every file medlens writes for later reading (results, indexes, embeddings, probes, manifests) goes through
:func:`write_atomic`, so a crash or a full disk never leaves half a file where a whole one was expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

#: bytes read at a time when hashing
_BLOCK = 1 << 20


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, or of a folder's sorted (relative name, file hash) list."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{child.relative_to(path)}\0{sha256_of(child)}\n".encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def json_hash(value: Any, length: int | None = None) -> str:
    """SHA-256 of ``value`` as canonical JSON (sorted keys; other types by ``str``), optionally shortened."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def _file_mode() -> int:
    """What ``open()`` would give a new file under the current umask (mkstemp makes it private)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file next to ``path``, fsync it, and rename it to ``path``; an exception
    (or a crash) on the way leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`write_atomic` of a UTF-8 text."""
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike[str], value: Any, indent: int | None = 2) -> Path:
    """:func:`write_atomic` of ``value`` as JSON (non-ASCII kept, other types by ``str``), newline-terminated."""
    return write_text_atomic(path, json.dumps(value, indent=indent, ensure_ascii=False, default=str) + "\n")


def write_jsonl_atomic(path: str | os.PathLike[str], rows: Iterable[Any]) -> Path:
    """:func:`write_atomic` of one JSON object per line."""
    lines = "".join(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    return write_text_atomic(path, lines)
