"""Library warnings never reach the terminal raw: :func:`capture_warnings` turns them into medlens warnings.

Inside the context, Python warnings (``warnings.warn``: pydicom's ``UserWarning`` about a bad value, ...) and
the records of the library loggers in :data:`LOGGERS` (transformers, pydicom, ...) are collected instead of
printed; the context yields a list that, on exit, holds them deduplicated and short
(``"pydicom: Invalid value for VR UI ..."``), ready for an envelope's ``warnings``. Known harmless noise
(:data:`SILENCED`) is dropped. The warning filters still apply (``python -W ignore`` stays quiet).

Nesting and threads: the outermost context installs the capture and the last one to leave removes it; a
record reaches every context open at the time (worker threads included, e.g. the parallel slice encoding).

C libraries write to file descriptor 2 directly, past Python (openjpeg: "Invalid number of tiles ..."): code that
calls one wraps the call in :func:`native_stderr`, which points descriptor 2 at a temporary file while a capture is
open and records what was written, line by line, as that library's warnings.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator

#: library loggers whose WARNING+ records are captured (their own handlers are muted meanwhile)
LOGGERS = ("transformers", "pydicom", "PIL", "accelerate", "huggingface_hub", "torch")

#: harmless noise, dropped (pattern on the message, why)
SILENCED: tuple[tuple[str, str], ...] = (
    # generate() is always called with an explicit attention mask and pad token by our backend; the
    # generation config of the tiny test models lacks one and transformers says so on every call
    (r"Setting `pad_token_id` to `eos_token_id`", "the backend passes its pad token; nothing to act on"),
    (r"attention mask is not set", "the backend passes the processor's attention mask"),
    # the untrained test models get random generation configs; sampling flags are ignored with greedy decoding
    (r"generation flags are not valid and may be ignored", "greedy decoding by design; flags unused"),
    (r"`do_sample` is set to `False`", "greedy decoding by design; sampling parameters unused"),
    # processors/tokenizers built on the fly for the test models
    (r"slow image processor|use_fast", "which image-processor implementation is used does not change results"),
    # torch's TypedStorage deprecation surfaces from libraries' internals, not from medlens code
    (r"TypedStorage is deprecated", "library-internal deprecation; nothing for the user to do"),
)
_SILENCED = [re.compile(p) for p, _ in SILENCED]

#: a warning message is cut to this many characters
MAX_CHARS = 200

_lock = threading.RLock()
_sinks: list[list[tuple[str, str]]] = []
_saved: dict[str, tuple[list[logging.Handler], bool]] = {}
_catcher: contextlib.AbstractContextManager | None = None


def short(source: str, message: str) -> str:
    """One line of at most :data:`MAX_CHARS` characters: ``source: first line of the message``."""
    line = " ".join(str(message).split())
    text = f"{source}: {line}" if source else line
    return text if len(text) <= MAX_CHARS else text[: MAX_CHARS - 3] + "..."


def silenced(message: str) -> bool:
    """Whether ``message`` is known harmless noise (:data:`SILENCED`)."""
    return any(p.search(message) for p in _SILENCED)


def _record(source: str, message: str) -> None:
    if silenced(message):
        return
    with _lock:
        for sink in _sinks:
            sink.append((source, message))


def _source(module: str) -> str:
    top = module.split(".", 1)[0] if module else ""
    return "" if top in ("", "medlens", "__main__") else top


def _showwarning(message, category, filename, lineno, file=None, line=None) -> None:
    """Replaces :func:`warnings.showwarning`: record instead of print."""
    module = ""
    for name in (*LOGGERS, "nibabel", "pypdfium2", "openslide", "tifffile", "numpy", "scipy"):
        if f"/{name}/" in str(filename).replace("\\", "/"):
            module = name
            break
    _record(module, str(message))


class _Handler(logging.Handler):
    """Records WARNING+ of a library logger; mutes handlers the library adds while the capture is on."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.WARNING)
        self.logger = logger

    def emit(self, record: logging.LogRecord) -> None:
        # a library imported inside the context (transformers is imported lazily) attaches its own stderr
        # handler after ours: drop it from the list being iterated, so it is skipped, and restore it on exit
        with contextlib.suppress(Exception):
            handlers = self.logger.handlers
            if handlers and handlers[0] is self and len(handlers) > 1:
                restore = _saved[self.logger.name][0]
                restore.extend(h for h in handlers[1:] if h not in restore)
                del handlers[1:]
            _record(record.name.split(".", 1)[0], record.getMessage())


def _install() -> None:
    global _catcher
    _catcher = warnings.catch_warnings()  # saves and restores the filters and showwarning
    _catcher.__enter__()
    warnings.showwarning = _showwarning
    for name in LOGGERS:
        logger = logging.getLogger(name)
        _saved[name] = (list(logger.handlers), logger.propagate)
        logger.handlers[:] = [_Handler(logger)]
        logger.propagate = False


def _uninstall() -> None:
    global _catcher
    for name, (handlers, propagate) in _saved.items():
        logger = logging.getLogger(name)
        added = [h for h in logger.handlers if not isinstance(h, _Handler) and h not in handlers]
        logger.handlers[:] = [*handlers, *added]
        logger.propagate = propagate
    _saved.clear()
    if _catcher is not None:
        _catcher.__exit__(None, None, None)
        _catcher = None


def dedupe(records: list[tuple[str, str]]) -> list[str]:
    """Short, unique lines in first-seen order (pydicom both warns and logs the same message)."""
    return list(dict.fromkeys(short(source, message) for source, message in records))


@contextlib.contextmanager
def capture_warnings() -> Iterator[list[str]]:
    """Collect library warnings and log records; the yielded list is filled on exit (see the module doc)."""
    sink: list[tuple[str, str]] = []
    out: list[str] = []
    with _lock:
        if not _sinks:
            _install()
        _sinks.append(sink)
    try:
        yield out
    finally:
        with _lock:
            del _sinks[next(i for i, s in enumerate(_sinks) if s is sink)]  # by identity, not equality
            if not _sinks:
                _uninstall()
        out.extend(dedupe(sink))


_fd_lock = threading.Lock()
_ESCAPE = "\x1b"


@contextlib.contextmanager
def native_stderr(source: str) -> Iterator[None]:
    """While a :func:`capture_warnings` is open, what C code writes to descriptor 2 inside this context becomes
    warnings of ``source``, one per line; otherwise nothing changes. Descriptor 2 is the whole process's, so callers
    are serialised (the windows are one decoder call long); text another thread draws meanwhile (a progress bar:
    it holds terminal escape codes) is written back to the terminal, not recorded."""
    if not _sinks:
        yield
        return
    with _fd_lock, tempfile.TemporaryFile() as sink:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", errors="replace")
    for line in text.splitlines():
        if _ESCAPE in line:
            os.write(2, (line + "\n").encode())
        elif line.strip():
            _record(source, line)
