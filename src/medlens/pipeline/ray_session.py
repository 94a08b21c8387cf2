"""Ray for the pipeline: import it (or say how to install it), connect to the cluster the settings name (or
start a private one), keep Ray Data quiet for the run, and turn a failed run's Ray exception back into the
typed medlens error that caused it."""

from __future__ import annotations

import contextlib
import logging
import socket
import warnings
from collections.abc import Iterator
from typing import Any

from medlens.errors import MedlensError
from medlens.pipeline.spec import RaySettings

INSTALL_HINT = "pip install 'medlens[scale]'"
#: the Ray Data logger that reports a block whose task failed for good (the run goes on past it)
BLOCK_ERRORS_LOGGER = "ray.data._internal.execution.streaming_executor_state"


def import_ray() -> Any:
    """The ``ray`` module with Ray Data, or a :class:`MedlensError` saying how to install it."""
    try:
        import ray
        import ray.data  # Ray Data is the part the pipeline needs
    except ImportError as exc:
        raise MedlensError(f"running on Ray needs Ray Data ({exc.name} is missing): {INSTALL_HINT}") from None
    return ray


def connect(settings: RaySettings) -> bool:
    """Join the Ray the settings name; True when this call started it (the caller then shuts it down).

    ``local`` reuses a Ray this process already runs, else starts a private one with ``num_cpus`` CPUs (all
    usable cores by default); any other address (``auto``, ``host:port``, ``ray://host:port``) connects to a
    running cluster, or reuses the connection this process already has."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if settings.address == "local":
        from medlens.io.worker_pool import usable_cores

        options: dict[str, Any] = {"num_cpus": settings.num_cpus or usable_cores(), "include_dashboard": False}
    else:
        probe(settings.address)
        options = {"address": settings.address}
    try:
        ray.init(log_to_driver=False, logging_level=logging.ERROR, **options)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError ... from ray.init
        where = "start a local Ray" if settings.address == "local" else f"reach the Ray cluster at {settings.address}"
        raise MedlensError(f"cannot {where}: {one_line(exc)}") from None
    return True


class BlockErrors(logging.Handler):
    """Collects the failures Ray Data lets a run go past (``max_errored_blocks``): its message and error."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.seen: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        self.seen.append((record.getMessage(), one_line(error) if error is not None else ""))


def probe(address: str, timeout: float = 5.0) -> None:
    """Refuse a ``host:port`` nothing answers on, at once: ``ray.init`` waits from 100 s to many minutes
    (measured with Ray 2.60) before it gives up on such an address. ``auto`` and ``ray://`` addresses are
    left to Ray (it fails fast when no cluster runs)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MedlensError(f"a Ray address is local, auto, host:port or ray://host:port, not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise MedlensError(
            f"cannot reach the Ray cluster at {address}: {reason} (is `ray start --head` running?)"
        ) from None


@contextlib.contextmanager
def quiet_data() -> Iterator[BlockErrors]:
    """For one run: Ray Data without progress bars or execution banners, failed blocks skipped (their rows
    are reported by the runner) and their tracebacks collected instead of printed; restored afterwards."""
    import ray.data

    context = ray.data.DataContext.get_current()
    saved = {
        name: getattr(context, name)
        for name in ("enable_progress_bars", "print_on_execution_start", "max_errored_blocks")
        if hasattr(context, name)
    }
    data_logger, block_logger = logging.getLogger("ray.data"), logging.getLogger(BLOCK_ERRORS_LOGGER)
    levels = data_logger.level, block_logger.propagate
    errors = BlockErrors()
    for name, value in (("enable_progress_bars", False), ("print_on_execution_start", False)):
        if name in saved:
            setattr(context, name, value)
    context.max_errored_blocks = -1
    data_logger.setLevel(logging.ERROR)
    block_logger.addHandler(errors)
    block_logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"ray(\.|$)")
            yield errors
    finally:
        for name, value in saved.items():
            setattr(context, name, value)
        block_logger.removeHandler(errors)
        data_logger.setLevel(levels[0])
        block_logger.propagate = levels[1]


def typed_error(exc: BaseException) -> MedlensError:
    """The :class:`MedlensError` behind a Ray failure (a model that cannot load in a replica), else one
    naming the Ray error in a line."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, MedlensError):
            return current
        todo.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    return MedlensError(f"the Ray run failed: {one_line(exc)}")


def one_line(exc: BaseException) -> str:
    """``TypeName: first line of the message`` (Ray's messages run over many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0].strip()}" if text else type(exc).__name__
