"""Worker processes for decoding that may crash, hang or exhaust memory (native image decoders).

One machinery for every kind of task (slide regions, compressed DICOM frames): workers are forked from a
forkserver (not from the caller, which may hold threads and a loaded model) that has the decoding libraries
imported already; each worker has an address-space limit, each task a time limit; results come back through
shared-memory slots (only their shape goes through the pipe), several tasks in flight per worker so a worker
never waits for the parent between two tasks. A task whose worker crashes (segfault, abort, a panic that
aborts), runs past its time limit or exhausts its memory fails alone, with the reason; the worker is replaced
and the tasks queued behind it go to the next one.

A process keeps one pool (:func:`shared_pool`), started on first use and sized to the usable cores
(:func:`usable_cores`: CPU affinity and the cgroup's CPU quota), so a server or a batch run pays the
start-up once. Tasks are submitted from any thread; a dispatcher thread owns the pipes.

Hand-written rather than ``concurrent.futures.ProcessPoolExecutor``: the executor breaks as a whole when one
worker dies (``BrokenProcessPool`` for every pending task), has no per-task time limit and pickles results
through a pipe.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import math
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextvars import ContextVar
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

#: seconds one task may take before its worker is killed
DEFAULT_TASK_TIMEOUT_S = 60.0
#: memory a worker may allocate beyond what it maps once set up (address space, MB)
DEFAULT_WORKER_MEMORY_MB = 2048
#: tasks sent ahead to each worker (the next one is queued in its pipe while it works on the current one)
IN_FLIGHT = 2

#: imported once by the fork server, so every worker forked from it starts with them loaded (importing
#: tiffslide alone took 0.33 s per worker, pydicom with its pixel plugins 0.3 s); a module that is not
#: installed is skipped by the fork server
PRELOAD = [
    "medlens.io.worker_pool",
    "numpy",
    "medlens.io.dicom_pixels",
    "pydicom.pixels",
    "openjpeg",
    "libjpeg",
    "rle",
    "jpeg_ls",
    "medlens.io.slide_workers",
    "medlens.io.slide",
    "PIL.Image",
    "cv2",
    "tifffile",
    "tiffslide",
]


class TaskFailed(Exception):
    """A task gave no result. ``cause``: "error" (it raised), "crashed", "timeout" or "memory"."""

    def __init__(self, reason: str, cause: str = "error", error: BaseException | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.cause = cause
        #: a typed medlens error raised by the task, rebuilt in the caller's process
        self.error = error


@dataclass(frozen=True)
class TaskKind:
    """What workers do: ``setup(payload, state)`` (opening a file; runs before the memory limit is set on a
    fresh worker, so the libraries' own start-up is not counted) then ``run(payload, state) -> array``.
    ``state`` is the worker's dict, kept between tasks (an open slide) and cleared after an error.
    Both must be module-level functions (they travel by name)."""

    run: Callable[[Any, dict], np.ndarray]
    setup: Callable[[Any, dict], None] | None = None


@dataclass(frozen=True)
class TaskResult:
    """A task's array, the seconds it took in the worker and what native code wrote to stderr meanwhile."""

    array: np.ndarray
    seconds: float
    stderr: str = ""


def usable_cores() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers), at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cpus, math.ceil(quota)) if quota else cpus)


def _cgroup_quota() -> float | None:
    """CPUs granted by cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``; None when unlimited or unknown."""
    for quota_file, period_file in (
        ("/sys/fs/cgroup/cpu.max", None),
        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu/cpu.cfs_period_us"),
    ):
        try:
            fields = Path(quota_file).read_text().split()
            if period_file:
                fields.append(Path(period_file).read_text().strip())
            quota, period = fields[0], float(fields[1])
        except (OSError, IndexError, ValueError):
            continue
        if quota in ("max", "-1") or period <= 0:
            return None
        return float(quota) / period
    return None


# ------------------------------------------------------------------------------------------- the worker side


def _tune_malloc() -> None:
    """Keep freed buffers (tens of MB) on glibc's heap instead of returning them to the kernel after every
    task: a fresh worker otherwise pays page faults on each new buffer (~30% of a slide patch's time)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD


def _one_thread() -> None:
    """One OpenCV thread per worker: the pool already has a worker per core."""
    with contextlib.suppress(ImportError):
        import cv2

        cv2.setNumThreads(1)


def _mapped_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


class _MemoryLimit:
    """The worker's address-space limit: what it maps when set plus ``memory_mb``, moved by the size of the
    shared-memory slots attached later (only the soft limit: the worker raises it itself for a new slot)."""

    def __init__(self, memory_mb: int | None) -> None:
        self.memory_mb = memory_mb
        self.base: int | None = None
        self.slots = 0

    def set(self, slot_bytes: int) -> None:
        if not self.memory_mb:
            return
        if self.base is None:
            self.base = _mapped_bytes() + self.memory_mb * 2**20 - slot_bytes
        self.slots = slot_bytes
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        limit = self.base + slot_bytes
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (limit if hard < 0 else min(limit, hard), hard))

    def lift(self) -> None:
        """Before attaching a slot: no soft limit until :meth:`set` is called again."""
        if self.base is None:
            return
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


class _Slots:
    """The worker's view of its shared-memory slots, attached by name (a slot grown by the parent is a new
    segment). Workers share the parent's resource tracker (forkserver children inherit it), so the
    registration an attach adds is the parent's own and goes with its unlink."""

    def __init__(self, limit: _MemoryLimit) -> None:
        self.limit = limit
        self.open: dict[int, Any] = {}

    def get(self, index: int, name: str) -> Any:
        shm = self.open.get(index)
        if shm is not None and shm.name == name:
            return shm
        from multiprocessing import shared_memory

        self.limit.lift()
        if shm is not None:
            shm.close()
        self.open[index] = shm = shared_memory.SharedMemory(name=name)
        self.limit.set(sum(s.size for s in self.open.values()))
        return shm

    def close(self) -> None:
        for shm in self.open.values():
            with contextlib.suppress(Exception):
                shm.close()


class _Stderr:
    """Descriptor 2 pointed at a scratch file while a task runs; the text comes back with its answer."""

    def __init__(self) -> None:
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - open for the worker's life
        self.saved = os.dup(2)

    @contextlib.contextmanager
    def captured(self, into: list[str]) -> Iterator[None]:
        self.file.seek(0)
        self.file.truncate()
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(self.file.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            os.dup2(self.saved, 2)
            self.file.seek(0)
            into.append(self.file.read(64 * 1024).decode("utf-8", errors="replace"))


def _describe(exc: BaseException) -> tuple[str, tuple[str, str, str, str | None] | None]:
    """One line for an exception, and (module, class, reason, path) when it is a typed medlens error."""
    from medlens.errors import MedlensError

    text = " ".join(str(exc).split())
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, MedlensError):
        return line[:500], (type(exc).__module__, type(exc).__qualname__, exc.reason, exc.path)
    return line[:500], None


def _worker_main(conn: Connection, memory_mb: int | None) -> None:
    """Serve tasks until the pipe closes; each array is written into the slot the task names (or, when it
    does not fit, sent through the pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills workers
    _tune_malloc()
    _one_thread()
    limit = _MemoryLimit(memory_mb)
    slots = _Slots(limit)
    stderr = _Stderr()
    state: dict = {}
    while True:
        try:
            job_id, kind, payload, slot_index, slot_name = conn.recv()
        except (EOFError, OSError):
            slots.close()
            return
        start = time.perf_counter()
        text: list[str] = []
        try:
            with stderr.captured(text):
                if kind.setup is not None:
                    kind.setup(payload, state)
                if limit.base is None:
                    slots.get(slot_index, slot_name)
                    limit.set(sum(s.size for s in slots.open.values()))
                array = np.ascontiguousarray(kind.run(payload, state))
            shm = slots.get(slot_index, slot_name)
            fits = array.nbytes <= shm.size
            if fits:
                np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
            answer = ("ok", job_id, array.shape, array.dtype.str, None if fits else array)
            conn.send((*answer, time.perf_counter() - start, "".join(text)))
        except MemoryError:
            state.clear()
            reason = f"out of memory (worker limit {memory_mb} MB)"
            conn.send(("memory", job_id, reason, None, None, time.perf_counter() - start, "".join(text)))
        except BaseException as exc:  # a Rust panic is a BaseException; every failure goes back
            if isinstance(exc, SystemExit):
                raise
            state.clear()
            line, typed = _describe(exc)
            conn.send(("error", job_id, line, typed, None, time.perf_counter() - start, "".join(text)))


# ------------------------------------------------------------------------------------------- the parent side


@contextlib.contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start workers without re-running the caller's script in them.

    spawn/forkserver children normally re-import the parent's ``__main__`` file (so that objects defined there
    can be unpickled); a user script that calls medlens at top level, without an ``if __name__ ==
    "__main__"`` guard, would then run again in every worker. The workers need nothing from ``__main__``, so
    its file and spec are hidden while a worker starts."""
    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main is not None and k in main.__dict__}
    try:
        for key in saved:
            if key == "__file__":
                del main.__dict__[key]
            else:
                main.__dict__[key] = None
        yield
    finally:
        if main is not None:
            main.__dict__.update(saved)


_start_lock = threading.Lock()


def _context() -> Any:
    """A forkserver context that preloads the decoders (fork is cheap from there); spawn where unavailable."""
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    except ValueError:
        return mp.get_context("spawn")


def death_reason(proc: Any) -> str:
    """Why a worker process ended, in words ("the worker process crashed (SIGABRT)")."""
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process crashed ({name})"
    return f"the worker process exited (code {code})"


@dataclass
class _Job:
    id: int
    kind: TaskKind
    payload: Any
    nbytes: int
    timeout_s: float
    future: Future
    running: bool = False


@dataclass
class _Worker:
    """One process, its slots (kept when the process is replaced) and the tasks sent to it, oldest first."""

    proc: Any
    conn: Connection
    slots: list[Any]
    sent: deque[tuple[_Job, int]] = field(default_factory=deque)
    head_started: float = 0.0

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


class WorkerPool:
    """Up to ``workers`` processes, started as tasks arrive; :meth:`submit` returns a future of a
    :class:`TaskResult` or :class:`TaskFailed`. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        workers: int | None = None,
        *,
        memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB,
        in_flight: int = IN_FLIGHT,
    ) -> None:
        self.size = max(1, usable_cores() if workers is None else workers)
        self.memory_mb = memory_mb
        self.in_flight = max(1, in_flight)
        self._pid = os.getpid()
        self._ids = itertools.count()
        self._pending: deque[_Job] = deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._workers: list[_Worker] = []
        self._spare_slots: list[list[Any]] = []
        self._closed = False
        self._ctx = _context()
        self._thread = threading.Thread(target=self._dispatch, name="medlens-worker-pool", daemon=True)
        self._thread.start()

    # -- public

    def submit(self, kind: TaskKind, payload: Any, *, nbytes: int, timeout_s: float | None = None) -> Future:
        """Queue one task; ``nbytes`` is the size its array will most likely have (the slot is made so big)."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        job = _Job(next(self._ids), kind, payload, nbytes, timeout_s or DEFAULT_TASK_TIMEOUT_S, Future())
        with self._lock:
            self._pending.append(job)
        self._wake()
        return job.future

    @property
    def alive(self) -> bool:
        return not self._closed and self._pid == os.getpid() and self._thread.is_alive()

    @property
    def started_workers(self) -> int:
        return len(self._workers)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake()
        if self._pid == os.getpid() and threading.current_thread() is not self._thread:
            self._thread.join(10)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the dispatcher thread

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send_bytes(b"x")

    def _dispatch(self) -> None:
        try:
            while not self._closed:
                self._assign()
                self._wait_once()
        finally:
            self._shutdown()

    def _assign(self) -> None:
        """Send pending tasks to workers with room: an idle one, else a new one up to the pool's size, else the
        least loaded one with fewer than ``in_flight`` tasks."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                job = self._pending[0]
            idle = [w for w in self._workers if not w.sent]
            if idle:
                worker = idle[0]
            elif len(self._workers) < self.size:
                worker = self._start_worker()
            else:
                room = [w for w in self._workers if len(w.sent) < self.in_flight]
                if not room:
                    return
                worker = min(room, key=lambda w: len(w.sent))
            with self._lock:
                self._pending.popleft()
            if not job.running:
                if not job.future.set_running_or_notify_cancel():
                    continue  # cancelled before it was sent
                job.running = True
            self._send(worker, job)

    def _start_worker(self) -> _Worker:
        slots = self._spare_slots.pop() if self._spare_slots else [None] * self.in_flight
        conn, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=_worker_main, args=(child, self.memory_mb), daemon=True)
        with _start_lock, _main_module_hidden():
            proc.start()
        child.close()
        worker = _Worker(proc, conn, slots)
        self._workers.append(worker)
        return worker

    def _send(self, worker: _Worker, job: _Job) -> None:
        used = {index for _, index in worker.sent}
        index = next(i for i in range(self.in_flight) if i not in used)
        slot = worker.slots[index]
        if slot is None or slot.size < job.nbytes:
            from multiprocessing import shared_memory

            if slot is not None:
                _release(slot)
            slot = worker.slots[index] = shared_memory.SharedMemory(create=True, size=max(job.nbytes, 4096))
        if not worker.sent:
            worker.head_started = time.monotonic()
        worker.sent.append((job, index))
        try:
            worker.conn.send((job.id, job.kind, job.payload, index, slot.name))
        except (OSError, ValueError) as exc:  # a dead worker, or a payload that does not pickle
            worker.sent.pop()
            if isinstance(exc, OSError):
                with self._lock:
                    self._pending.appendleft(job)
                self._replace(worker, None)
            else:
                job.future.set_exception(TaskFailed(f"cannot send the task: {exc}"))

    def _wait_once(self) -> None:
        busy = [w for w in self._workers if w.sent]
        deadline = min((w.head_started + w.sent[0][0].timeout_s for w in busy), default=None)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        waiting: list[Any] = [self._wake_r] + [w.conn for w in busy] + [w.proc.sentinel for w in busy]
        ready = set(wait(waiting, timeout))
        if self._wake_r in ready:
            with contextlib.suppress(OSError, EOFError):
                while self._wake_r.poll():
                    self._wake_r.recv_bytes()
        for worker in busy:
            if worker.conn in ready:
                self._receive(worker)
            elif worker.proc.sentinel in ready:
                worker.proc.join(1)
                self._replace(worker, TaskFailed(death_reason(worker.proc), "crashed"))
            elif time.monotonic() - worker.head_started >= worker.sent[0][0].timeout_s:
                seconds = worker.sent[0][0].timeout_s
                self._replace(worker, TaskFailed(f"timed out after {seconds:g} s (the worker was killed)", "timeout"))

    def _receive(self, worker: _Worker) -> None:
        """Every answer the worker has written; a worker that died while answering is replaced."""
        while worker.sent:
            try:
                if not worker.conn.poll():
                    return
                status, job_id, first, second, inline, seconds, stderr = worker.conn.recv()
            except (EOFError, OSError):
                worker.proc.join(1)
                self._replace(worker, TaskFailed(death_reason(worker.proc), "crashed"))
                return
            job, index = worker.sent.popleft()
            worker.head_started = time.monotonic()
            if job.id != job_id:  # cannot happen: a worker answers in order
                self._replace(worker, TaskFailed("the worker answered out of order", "crashed"))
                return
            if status == "ok":
                array = inline if inline is not None else _copy_out(worker.slots[index], first, second)
                job.future.set_result(TaskResult(array, seconds, stderr))
            else:
                job.future.set_exception(TaskFailed(first, status, _rebuild(second)))

    def _replace(self, worker: _Worker, failure: TaskFailed | None) -> None:
        """Kill ``worker``; its oldest task fails with ``failure``, the others go back to the queue."""
        worker.kill()
        self._workers.remove(worker)
        self._spare_slots.append(worker.slots)
        sent = list(worker.sent)
        if failure is not None and sent:
            job, _ = sent.pop(0)
            job.future.set_exception(failure)
        with self._lock:
            self._pending.extendleft(reversed([job for job, _ in sent]))

    def _shutdown(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(Exception):
                worker.conn.close()
        for worker in self._workers:
            worker.proc.join(2)
            if worker.proc.is_alive():
                worker.kill()
            for job, _ in worker.sent:
                job.future.set_exception(TaskFailed("the worker pool was closed"))
        with self._lock:
            for job in self._pending:
                if job.running or job.future.set_running_or_notify_cancel():
                    job.future.set_exception(TaskFailed("the worker pool was closed"))
            self._pending.clear()
        for slots in [w.slots for w in self._workers] + self._spare_slots:
            for slot in slots:
                if slot is not None:
                    _release(slot)
        self._workers.clear()


def _copy_out(slot: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    return np.ndarray(shape, np.dtype(dtype), buffer=slot.buf).copy()


def _release(slot: Any) -> None:
    with contextlib.suppress(Exception):
        slot.close()
    with contextlib.suppress(Exception):
        slot.unlink()


def _rebuild(typed: tuple[str, str, str, str | None] | None) -> BaseException | None:
    """A typed medlens error raised in a worker, as the same class here (None when it cannot be rebuilt)."""
    if typed is None:
        return None
    import importlib

    from medlens.errors import MedlensError

    module, name, reason, path = typed
    try:
        cls = getattr(importlib.import_module(module), name)
        return cls(reason, path) if isinstance(cls, type) and issubclass(cls, MedlensError) else None
    except Exception:
        return None


# ------------------------------------------------------------------------------------------- the shared pool


@dataclass(frozen=True)
class PoolSettings:
    """Size and limits of the process's shared pool: ``workers`` None for every usable core, 0 for decoding
    in the calling process (no isolation)."""

    workers: int | None = None
    memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB


_settings = PoolSettings()
_shared: WorkerPool | None = None
_shared_lock = threading.Lock()
#: the per-task time limit for the current thread or task (a server can set one per request)
_TIMEOUT: ContextVar[float | None] = ContextVar("medlens_task_timeout", default=None)


def configure(workers: int | None = None, memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB) -> None:
    """Set the shared pool's size and worker memory (``--workers`` on the CLI); a running pool of another
    size is closed and the next task starts one of the new size."""
    global _settings, _shared
    with _shared_lock:
        new = PoolSettings(workers, memory_mb)
        if new != _settings and _shared is not None:
            _shared.close()
            _shared = None
        _settings = new


def settings() -> PoolSettings:
    return _settings


def pool_workers() -> int:
    """How many workers the shared pool has (or will have); 0 when decoding stays in this process."""
    return 0 if _settings.workers == 0 else max(1, usable_cores() if _settings.workers is None else _settings.workers)


def shared_pool() -> WorkerPool | None:
    """The process's pool, started on first use and kept until exit (None when workers is 0)."""
    global _shared
    if _settings.workers == 0:
        return None
    with _shared_lock:
        if _shared is None or not _shared.alive:
            _shared = WorkerPool(_settings.workers, memory_mb=_settings.memory_mb)
        return _shared


def close_shared_pool() -> None:
    """Stop the shared pool's workers (the next task starts new ones)."""
    global _shared
    with _shared_lock:
        if _shared is not None:
            _shared.close()
        _shared = None


@contextlib.contextmanager
def pool_for(workers: int | None, memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB) -> Iterator[WorkerPool | None]:
    """The shared pool when ``workers``/``memory_mb`` match its settings (``workers`` None: whatever it has),
    else a pool of that size for the block; None for ``workers=0`` (the caller works in-process)."""
    if workers == 0:
        yield None
    elif (workers is None or workers == pool_workers()) and memory_mb == _settings.memory_mb:
        yield shared_pool()
    else:
        with WorkerPool(workers, memory_mb=memory_mb) as pool:
            yield pool


def task_timeout() -> float:
    """The per-task time limit in effect here (env ``MEDLENS_TASK_TIMEOUT_S``, default 60 s)."""
    override = _TIMEOUT.get()
    if override is not None:
        return override
    try:
        return float(os.environ.get("MEDLENS_TASK_TIMEOUT_S", "") or DEFAULT_TASK_TIMEOUT_S)
    except ValueError:
        return DEFAULT_TASK_TIMEOUT_S


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block (this thread or task only), each task may take ``seconds`` (None: the default)."""
    token = _TIMEOUT.set(seconds)
    try:
        yield
    finally:
        _TIMEOUT.reset(token)


atexit.register(close_shared_pool)

__all__ = [
    "DEFAULT_TASK_TIMEOUT_S",
    "DEFAULT_WORKER_MEMORY_MB",
    "PRELOAD",
    "PoolSettings",
    "TaskFailed",
    "TaskKind",
    "TaskResult",
    "WorkerPool",
    "close_shared_pool",
    "configure",
    "death_reason",
    "pool_for",
    "pool_workers",
    "settings",
    "shared_pool",
    "task_timeout",
    "time_limit",
    "usable_cores",
]
