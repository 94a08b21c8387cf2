"""The medlens model cache: where built-in models are built, and the one atomic way to build them there."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: written into a model directory by medlens builders, last: it marks the directory complete and says what
#: it holds (test model, text only, GGUF file, default token cap, warning)
MARKER_FILE = "medlens_model.json"


def medlens_cache_dir() -> Path:
    """``$MEDLENS_CACHE`` or ``~/.cache/medlens``."""
    return Path(os.environ.get("MEDLENS_CACHE") or Path.home() / ".cache" / "medlens").expanduser()


def models_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """``CACHE/models``: one folder per built model."""
    return (Path(cache) if cache is not None else medlens_cache_dir()) / "models"


def read_marker(directory: Path) -> dict[str, Any]:
    """The directory's :data:`MARKER_FILE` as a dict; empty when there is none or it is not a JSON object."""
    try:
        info = json.loads((directory / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_marker(directory: Path, info: dict[str, Any]) -> None:
    """Write the marker file; call it last, when everything else in ``directory`` is in place."""
    (directory / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")


def build_once(final: Path, fill: Callable[[Path], None], complete: Callable[[Path], bool] | None = None) -> Path:
    """``final`` once it is ``complete`` (default: its marker file exists); otherwise built by ``fill``-ing a
    private folder beside it that is then renamed into place, so a half-built folder is never seen. A folder
    that exists but is not complete is removed first; a concurrent builder that won the race is fine."""
    done = complete or (lambda folder: (folder / MARKER_FILE).is_file())
    if done(final):
        return final
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        fill(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, final)
        except OSError:
            if not done(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
