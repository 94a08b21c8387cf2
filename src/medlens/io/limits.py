"""Resource limits checked before any decoding, so a hostile or huge header cannot exhaust memory."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextvars import ContextVar

from medlens.errors import ImageTooSmallError, TooLargeError

#: images with a side shorter than this carry nothing a model can read (icons, 1x1 placeholders)
MIN_SIDE = 16
DEFAULT_MAX_DECODED_MB = 4096
DEFAULT_MAX_ARCHIVE_MB = 16384
#: a budget set for the current thread / task (a server's per-request cap), over the environment's
_DECODED_OVERRIDE: ContextVar[int | None] = ContextVar("medlens_decoded_budget", default=None)


def max_decoded_bytes() -> int:
    """Budget for decoded pixels of one input: the one :func:`decoded_budget` set here, else env
    ``MEDLENS_MAX_DECODED_MB`` (default 4096 MB)."""
    override = _DECODED_OVERRIDE.get()
    return override if override is not None else _env_mb("MEDLENS_MAX_DECODED_MB", DEFAULT_MAX_DECODED_MB)


@contextlib.contextmanager
def decoded_budget(n_bytes: int | None) -> Iterator[None]:
    """Within the block (in this thread or task only), the decoded-pixel budget is ``n_bytes``
    (None: the environment's)."""
    token = _DECODED_OVERRIDE.set(n_bytes)
    try:
        yield
    finally:
        _DECODED_OVERRIDE.reset(token)


def max_archive_bytes() -> int:
    """Budget for the unpacked contents of a zip input (env ``MEDLENS_MAX_ARCHIVE_MB``)."""
    return _env_mb("MEDLENS_MAX_ARCHIVE_MB", DEFAULT_MAX_ARCHIVE_MB)


def check_decoded_size(n_bytes: int, path: str, what: str = "pixel data") -> None:
    budget = max_decoded_bytes()
    if n_bytes > budget:
        raise TooLargeError(
            f"{what} would need {n_bytes / 2**20:,.0f} MB decoded, over the {budget / 2**20:,.0f} MB budget "
            "(raise MEDLENS_MAX_DECODED_MB if this is intended)",
            path,
        )


def check_image_size(rows: int, columns: int, path: str) -> None:
    if rows < MIN_SIDE or columns < MIN_SIDE:
        raise ImageTooSmallError(f"image is {columns}x{rows} pixels; at least {MIN_SIDE}x{MIN_SIDE} is needed", path)


def _env_mb(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(float(raw) * 2**20) if raw else default * 2**20
    except ValueError:
        return default * 2**20
