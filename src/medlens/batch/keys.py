"""A row's journal key, like the eval journal's: what the row's result depends on and nothing else.

The key hashes the inputs' contents (a file's bytes; a folder's every file; a ``dicomweb://`` reference's
text with the series as the server lists them: UIDs and instance counts), the model's revision (adapter and
quantization included), the task, the question, the options that change the result, the recipe and the
medlens version. The row's id is not in it: renaming or reordering rows reuses their results."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from medlens import __version__
from medlens.files import sha256_of


def input_identity(source: str, cache: dict[str, str]) -> str:
    """The content hash of a local input (``cache``: by path, a file is hashed once per run), or the identity
    of a DICOMweb reference; typed errors (not found, a server away) as reading would raise them."""
    if source not in cache:
        from medlens.io.dicomweb import is_dicomweb

        cache[source] = dicomweb_identity(source) if is_dicomweb(source) else _local(source)
    return cache[source]


def _local(source: str) -> str:
    from medlens.errors import NotFoundError

    path = Path(source)
    if not path.exists():
        raise NotFoundError("no such file or folder", source)
    return sha256_of(path)


def dicomweb_identity(source: str) -> str:
    """A DICOMweb study or series by its reference and the series the server lists for it (QIDO-RS: UID,
    modality, instance count): instances added to a series change it; nothing is retrieved."""
    from medlens.io.dicomweb import connect, parse_ref, search_series
    from medlens.io.dicomweb_config import get_server

    ref = parse_ref(source)
    server = get_server(ref.server)
    listed = search_series(connect(server), server, ref)
    series = sorted((s.uid, s.modality, s.count) for s in listed if ref.series is None or s.uid == ref.series)
    text = json.dumps({"ref": str(ref), "series": series})
    return "dicomweb:" + hashlib.sha256(text.encode()).hexdigest()


def row_key(
    inputs: list[str],
    task: str,
    question: str | None,
    options: dict[str, Any],
    revision: str,
    cache: dict[str, str],
) -> str:
    """The key of one row (``options``: :func:`medlens.batch.options.key_options`)."""
    content = {
        "inputs": [input_identity(source, cache) for source in inputs],
        "model": revision,
        "task": task,
        "question": question,
        "options": options,
        "recipe": options.get("recipe"),
        "medlens": __version__,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
