"""Concurrent requests batched into the engine: each request's task talks to a :class:`LaneBackend`, whose
``generate`` queues its prompts; one engine thread takes what has queued within ``batch_wait_ms`` (up to
``batch_size``) and calls the real backend's ``generate`` once for all of them."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from medlens.backends import Backend, GenerationOutput, GenerationRequest
from medlens.backends.base import OutputCallback, ProgressCallback
from medlens.progress import Reporter
from medlens.serve.problems import Cancelled, QueueFull, TimedOut

log = logging.getLogger("medlens.serve")

StageCallback = Callable[[str, int, int], None]
TextCallback = Callable[[str], None]


@dataclass(eq=False)
class RunContext:
    """One request's run: its cancel flag, deadline, and where its progress and generated text go."""

    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: float | None = None
    on_stage: StageCallback = lambda stage, done, total: None
    on_text: TextCallback = lambda delta: None
    #: set by the engine thread: why the run stopped (timeout / cancel)
    timed_out: bool = False

    def check(self) -> None:
        """Raise if the run was cancelled or is past its deadline (called at stage and batch boundaries)."""
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.timed_out = True
            self.cancel.set()
        if self.cancel.is_set():
            if self.timed_out:
                raise TimedOut("the request took longer than the server's timeout (timeout_s)")
            raise Cancelled("cancelled")


class StageReporter(Reporter):
    """A :class:`~medlens.progress.Reporter` that sends each stage to the run's context and stops a cancelled
    run at the next stage."""

    def __init__(self, context: RunContext) -> None:
        super().__init__(False)
        self.context = context

    @contextlib.contextmanager
    def stage(self, description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
        self.context.check()
        self.context.on_stage(description, 0, total or 0)
        yield lambda done, new_total: self.context.on_stage(description, done, new_total)


class Admission:
    """At most ``limit`` runs admitted at once (waiting or running); the next one is refused with 429."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()
        self._recent: list[float] = []

    def enter(self) -> None:
        with self._lock:
            if self.active >= self.limit:
                raise QueueFull(
                    f"the server is busy ({self.active} requests queued or running, max_queue {self.limit})",
                    retry_after=self.retry_after(),
                )
            self.active += 1

    def leave(self, seconds: float | None = None) -> None:
        with self._lock:
            self.active = max(0, self.active - 1)
            if seconds is not None:
                self._recent = [*self._recent[-19:], seconds]

    def retry_after(self) -> int:
        """Seconds a client should wait: the mean of recent run times (at least 1)."""
        return max(1, math.ceil(sum(self._recent) / len(self._recent))) if self._recent else 1


@dataclass
class _Item:
    request: GenerationRequest
    context: RunContext
    future: Future = field(default_factory=Future)
    retried: bool = False


class Scheduler:
    """The engine thread in front of one loaded backend."""

    def __init__(
        self,
        backend: Backend,
        batch_size: int = 8,
        batch_wait_ms: float = 20,
        max_new_tokens: int | None = None,
        on_batch: Callable[[int, Sequence[GenerationOutput]], None] | None = None,
    ) -> None:
        self.backend = backend
        self.batch_size = batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_new_tokens = max_new_tokens
        self.on_batch = on_batch
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self._streams = "on_text" in inspect.signature(backend.generate).parameters
        self._thread = threading.Thread(target=self._loop, name="medlens-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Prompts waiting for the engine."""
        return self._queue.qsize()

    def lane(self, context: RunContext) -> LaneBackend:
        """A Backend for one run: its prompts go through this scheduler."""
        return LaneBackend(self, context)

    def submit(self, requests: Sequence[GenerationRequest], context: RunContext) -> list[Future]:
        items = []
        for request in requests:
            wanted = request.max_new_tokens or self.backend.default_max_new_tokens
            if self.max_new_tokens is not None:
                wanted = min(wanted, self.max_new_tokens)
            items.append(_Item(dataclasses.replace(request, max_new_tokens=wanted), context))
        for item in items:
            self._queue.put(item)
        return [item.future for item in items]

    def close(self) -> None:
        self._queue.put(None)

    def _take(self) -> list[_Item] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        until = time.monotonic() + self.batch_wait
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get(timeout=max(0.0, until - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            live = [
                i
                for i in batch
                if not i.context.cancel.is_set() and (i.future.running() or i.future.set_running_or_notify_cancel())
            ]
            if live:
                self._run(live)

    def _run(self, batch: list[_Item]) -> None:
        def delivered(index: int, output: GenerationOutput) -> None:
            item = batch[index]
            if not self._streams:
                item.context.on_text(output.text)
            if not item.future.done():
                item.future.set_result(output)

        extra = {}
        if self._streams:
            extra["on_text"] = lambda index, delta: batch[index].context.on_text(delta)
        try:
            outputs = self.backend.generate([i.request for i in batch], on_output=delivered, **extra)
            for item, output in zip(batch, outputs, strict=True):
                if not item.future.done():
                    if not self._streams:
                        item.context.on_text(output.text)
                    item.future.set_result(output)
            if self.on_batch is not None:
                self.on_batch(len(batch), outputs)
        except BaseException as exc:  # the engine thread lives on
            log.debug("engine batch failed", extra={"error_type": type(exc).__name__})
            failed = getattr(exc, "index", None)  # GenerationFailed names the request that failed
            for n, item in enumerate(batch):
                if item.future.done():
                    continue
                if len(batch) > 1 and not item.retried and n != failed:
                    item.retried = True  # another request's failure: run it again, once
                    self._queue.put(item)
                else:
                    item.future.set_exception(exc)


class LaneBackend(Backend):
    """The backend one run sees: the real one's identity, its prompts batched by the :class:`Scheduler`."""

    def __init__(self, scheduler: Scheduler, context: RunContext) -> None:
        real = scheduler.backend
        self.scheduler, self.context = scheduler, context
        self.engine, self.model_name = real.engine, real.model_name
        self.is_test_model, self.model_warning = real.is_test_model, real.model_warning
        self.default_max_new_tokens, self.fingerprint = real.default_max_new_tokens, real.fingerprint
        self.adapter = getattr(real, "adapter", None)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> list[GenerationOutput]:
        self.context.check()
        futures = self.scheduler.submit(requests, self.context)
        outputs: list[GenerationOutput] = []
        try:
            for index, future in enumerate(futures):
                while True:
                    try:
                        output = future.result(timeout=0.05)
                        break
                    except TimeoutError:
                        self.context.check()
                outputs.append(output)
                if on_output is not None:
                    on_output(index, output)
                if progress is not None:
                    progress(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return outputs

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self.generate([request])[0]
