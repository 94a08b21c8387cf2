"""Ctrl-C and SIGTERM: one line saying what was saved and how to resume, exit 130 / 143, no traceback.

The CLI installs :func:`install_handlers`: SIGINT and SIGTERM then raise :class:`Interrupted` (a
``BaseException``, so no ``except Exception`` swallows it, and click does not turn it into an ``Abort``).
A command that saves work as it goes registers what is true of it with :func:`on_interrupt`; the CLI
prints :attr:`Interrupted.message`. Writes that must not be torn (a journal line) run inside
:func:`deferred`: a signal arriving there takes effect when the write is done.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

#: what a command says when nothing registered a description
NOTHING_SAVED = "interrupted before finishing; nothing was saved"

_deferring = 0
_pending: list[int] = []


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM; ``exit_code`` is 128 + the signal number (130 / 143)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        #: set by the innermost :func:`on_interrupt` the interruption passed through
        self.saved: str | None = None
        super().__init__(signal.Signals(signum).name)

    @property
    def message(self) -> str:
        """The one line to print: what was saved, how to resume."""
        return self.saved or NOTHING_SAVED


def _handler(signum: int, frame: object) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


def install_handlers() -> None:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread (call from the main thread only)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold a signal that arrives inside the block until the block is done (then raise it)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
        if not _deferring and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Interrupted(signum)


@contextlib.contextmanager
def on_interrupt(describe: Callable[[], str]) -> Iterator[None]:
    """An interruption inside the block says ``describe()`` (what it leaves saved; the innermost wins)."""
    try:
        yield
    except Interrupted as exc:
        if exc.saved is None:
            try:
                exc.saved = describe()
            except Exception:
                exc.saved = "interrupted; what was saved could not be determined"
        raise
