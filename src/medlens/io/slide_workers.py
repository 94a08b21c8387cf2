"""Reading slide regions in worker processes, each with a memory and a time limit.

A decoder that raises, crashes (segfault, abort, out of memory) or hangs on one tile fails only the region
that needed it: the worker is replaced, the failure is recorded with its reason, and the run goes on.
Workers are forked from a forkserver (not from the caller, which may hold threads and a loaded model) and
open the slide once each; regions come back as arrays in request order.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import numpy as np

from medlens.io.slide import SlideSpec

#: seconds one region may take before its worker is killed
DEFAULT_REGION_TIMEOUT_S = 60.0
#: memory a worker may allocate beyond what it uses once started (address space, MB)
DEFAULT_WORKER_MEMORY_MB = 2048


@dataclass(frozen=True)
class RegionRequest:
    """Read ``read_w x read_h`` pixels of ``level`` at level-0 ``(x0, y0)``, then resize to ``out_w x out_h``."""

    x0: int
    y0: int
    level: int
    read_w: int
    read_h: int
    out_w: int
    out_h: int


@dataclass
class RegionResult:
    """The region (RGB uint8) or why it could not be read."""

    image: np.ndarray | None
    error: str | None = None
    seconds: float = 0.0


def resize_region(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Shrink (or grow) an RGB region: PIL's ``reduce`` for exact integer factors (area mean), else bilinear
    with PIL's antialiasing support."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    from PIL import Image

    img = Image.fromarray(image)
    if w % width == 0 and h % height == 0 and w // width == h // height:
        return np.asarray(img.reduce(w // width))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR))


def read_one(slide: Any, req: RegionRequest) -> np.ndarray:
    """One request on an open slide (the work each worker does, also used in-process)."""
    region = slide.read(req.x0, req.y0, req.level, req.read_w, req.read_h)
    return np.ascontiguousarray(resize_region(region, req.out_w, req.out_h))


def _limit_memory(memory_mb: int | None) -> None:
    """Cap this process's address space at what it maps now plus ``memory_mb``."""
    if not memory_mb:
        return
    import resource

    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = mapped + memory_mb * 2**20
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _tune_malloc() -> None:
    """Keep freed region buffers (tens of MB) on glibc's heap instead of returning them to the kernel after
    every region: a fresh worker otherwise pays page faults on each new buffer (~30% of a patch's time)."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 2**20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 * 2**20)  # M_TRIM_THRESHOLD


def _attach(name: str) -> Any:
    """Open the parent's shared-memory slot. Workers share the parent's resource tracker (forkserver and spawn
    children inherit it), so the registration this adds is the parent's own and goes with its unlink."""
    from multiprocessing import shared_memory

    return shared_memory.SharedMemory(name=name)


def _worker_main(conn: Connection, spec: SlideSpec, memory_mb: int | None, slot_name: str) -> None:
    """Serve requests until the pipe closes: each region is written into the shared-memory slot and only its
    shape goes back through the pipe. The slide is reopened after any error (OpenSlide handles become
    unusable after a failed decode)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills workers
    _tune_malloc()
    slot = _attach(slot_name)
    slide = None
    limited = False
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            slot.close()
            return
        start = time.perf_counter()
        try:
            if slide is None:
                slide = spec.open()
            if not limited:  # after the first open: the libraries' own start-up memory is not counted
                _limit_memory(memory_mb)
                limited = True
            image = read_one(slide, req)
            np.ndarray(image.shape, np.uint8, buffer=slot.buf)[...] = image
            conn.send(("ok", image.shape, time.perf_counter() - start))
        except MemoryError:
            slide = _drop(slide)
            conn.send(("error", f"out of memory (worker limit {memory_mb} MB)", time.perf_counter() - start))
        except Exception as exc:
            slide = _drop(slide)
            conn.send(("error", f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start))


def _drop(slide: Any) -> None:
    if slide is not None:
        with contextlib.suppress(Exception):
            slide.close()
    return None


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


class _Worker:
    """One reader process and its shared-memory slot (the slot outlives the process when it is replaced)."""

    def __init__(self, ctx: Any, spec: SlideSpec, memory_mb: int | None, slot: Any):
        self.slot = slot
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, spec, memory_mb, slot.name), daemon=True)
        with _main_module_hidden():
            self.proc.start()
        child.close()
        self.job: int | None = None
        self.started = 0.0

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()

    def respawn(self, ctx: Any, spec: SlideSpec, memory_mb: int | None) -> _Worker:
        self.kill()
        return _Worker(ctx, spec, memory_mb, self.slot)

    def image(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.ndarray(shape, np.uint8, buffer=self.slot.buf).copy()


def _death_reason(proc: Any) -> str:
    code = proc.exitcode
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the reader process crashed ({name})"
    return f"the reader process exited (code {code})"


#: imported once by the fork server, so every worker forked from it starts with them loaded (importing tiffslide
#: alone took 0.33 s per worker, twice per slide recipe: once for the thumbnail, once for the patches); a module
#: that is not installed is skipped by the fork server
PRELOAD = ["medlens.io.slide_workers", "medlens.io.slide", "numpy", "PIL.Image", "tifffile", "tiffslide", "openslide"]


def _context() -> Any:
    """A forkserver context that preloads this module (fork is cheap from there); spawn where unavailable."""
    try:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    except ValueError:
        return mp.get_context("spawn")


def default_workers() -> int:
    """One worker per CPU available to this process, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def read_regions(
    spec: SlideSpec,
    requests: list[RegionRequest],
    *,
    workers: int | None = None,
    timeout_s: float = DEFAULT_REGION_TIMEOUT_S,
    memory_mb: int | None = DEFAULT_WORKER_MEMORY_MB,
    on_done: Callable[[int, RegionResult], None] | None = None,
) -> list[RegionResult]:
    """Read every request; results in request order. ``workers=0`` reads in this process (no isolation)."""
    n_workers = default_workers() if workers is None else workers
    if n_workers <= 0 or not requests:
        return _read_here(spec, requests, on_done)
    from multiprocessing import shared_memory

    results: list[RegionResult | None] = [None] * len(requests)
    pending = deque(range(len(requests)))
    ctx = _context()
    slot_bytes = max(r.out_w * r.out_h * 3 for r in requests)
    slots = [shared_memory.SharedMemory(create=True, size=slot_bytes) for _ in range(min(n_workers, len(requests)))]
    pool: list[_Worker] = []

    def finish(w: _Worker, result: RegionResult) -> None:
        assert w.job is not None
        results[w.job] = result
        if on_done:
            on_done(w.job, result)
        w.job = None

    try:
        pool = [_Worker(ctx, spec, memory_mb, slot) for slot in slots]
        while pending or any(w.job is not None for w in pool):
            for w in pool:
                if w.job is None and pending:
                    w.job = pending.popleft()
                    w.started = time.monotonic()
                    w.conn.send(requests[w.job])
            busy = [w for w in pool if w.job is not None]
            deadline = min(w.started for w in busy) + timeout_s
            waiting = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
            ready = set(wait(waiting, max(0.0, deadline - time.monotonic())))
            for i, w in enumerate(pool):
                if w.job is None:
                    continue
                if w.conn in ready:
                    try:
                        status, payload, seconds = w.conn.recv()
                    except (EOFError, OSError):  # died while answering
                        w.proc.join(1)
                        finish(w, RegionResult(None, _death_reason(w.proc)))
                        pool[i] = w.respawn(ctx, spec, memory_mb)
                        continue
                    ok = status == "ok"
                    finish(w, RegionResult(w.image(payload) if ok else None, None if ok else payload, seconds))
                elif w.proc.sentinel in ready:
                    w.proc.join(1)
                    finish(w, RegionResult(None, _death_reason(w.proc)))
                    pool[i] = w.respawn(ctx, spec, memory_mb)
                elif time.monotonic() - w.started >= timeout_s:
                    finish(w, RegionResult(None, f"timed out after {timeout_s:g} s (the reader process was killed)"))
                    pool[i] = w.respawn(ctx, spec, memory_mb)
    finally:
        for w in pool:
            with contextlib.suppress(Exception):
                w.conn.close()
            w.proc.join(2)
            if w.proc.is_alive():
                w.kill()
        for slot in slots:
            slot.close()
            slot.unlink()
    return [r if r is not None else RegionResult(None, "not read") for r in results]


def _read_here(
    spec: SlideSpec, requests: list[RegionRequest], on_done: Callable[[int, RegionResult], None] | None
) -> list[RegionResult]:
    out: list[RegionResult] = []
    slide = None
    for i, req in enumerate(requests):
        start = time.perf_counter()
        try:
            if slide is None:
                slide = spec.open()
            result = RegionResult(read_one(slide, req), None, time.perf_counter() - start)
        except Exception as exc:
            slide = _drop(slide)
            result = RegionResult(None, f"{type(exc).__name__}: {exc}"[:300], time.perf_counter() - start)
        out.append(result)
        if on_done:
            on_done(i, result)
    _drop(slide)
    return out


__all__ = [
    "DEFAULT_REGION_TIMEOUT_S",
    "DEFAULT_WORKER_MEMORY_MB",
    "RegionRequest",
    "RegionResult",
    "default_workers",
    "read_one",
    "read_regions",
    "resize_region",
]
