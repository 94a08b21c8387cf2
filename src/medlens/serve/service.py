"""The server's running parts, shared by the routes: the loaded backend and its scheduler, the admission
limit, the worker threads, the job store, the metrics; and the three ways to run a request (answer now,
as a job, as a stream)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from medlens.backends import Backend
from medlens.serve.jobs import JobStore
from medlens.serve.observe import Metrics
from medlens.serve.problems import ApiError, Cancelled, JobNotFound, NotReady, TimedOut
from medlens.serve.runner import AnalyzeForm, read_form, run_analysis
from medlens.serve.scheduler import Admission, RunContext, Scheduler
from medlens.serve.settings import ServeSettings
from medlens.serve.uploads import StudyInput, Upload, receive_upload, study_inputs

log = logging.getLogger("medlens.serve")

INTERNAL = {"error": "internal server error", "type": "InternalError"}


class Service:
    """Everything one app instance runs with."""

    def __init__(self, settings: ServeSettings, backend: Backend | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.admission = Admission(settings.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=settings.max_queue, thread_name_prefix="medlens-run")
        self.jobs = JobStore(settings.jobs_db)
        self.interrupted = self.jobs.mark_interrupted()
        self.contexts: dict[str, RunContext] = {}
        self.running: set[RunContext] = set()
        self._loader: threading.Thread | None = None
        self.backend: Backend | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self._configured_adapter = _adapter_identity(settings.adapter)
        self.metrics.queue_depth.set_function(lambda: self.admission.active)
        self.metrics.engine_queue.set_function(lambda: self.scheduler.depth if self.scheduler else 0)
        if backend is not None:
            self.attach(backend)

    # ------------------------------------------------------------ model

    def attach(self, backend: Backend) -> None:
        """Serve ``backend`` (through a new scheduler)."""
        self.scheduler = Scheduler(
            backend,
            self.settings.batch_size,
            self.settings.batch_wait_ms,
            self.settings.max_new_tokens,
            on_batch=self._count_batch,
        )
        self.backend = backend

    def adapter_identity(self) -> dict[str, str] | None:
        """``{"name", "sha256"}`` of the adapter served: the loaded backend's, else the configured folder's
        (None without an adapter)."""
        if self.backend is not None:
            return self.backend.adapter.identity() if self.backend.adapter is not None else None
        return self._configured_adapter

    def start(self) -> None:
        """At app start-up (again after a stop): the decoding worker pool (kept warm for every request; a
        decoder crash fails only its upload), the engine thread for the given backend, else the model load."""
        from medlens.io import worker_pool

        worker_pool.shared_pool()
        if self.backend is not None:
            if self.scheduler is None:
                self.attach(self.backend)
        elif self._loader is None and self.load_error is None:
            self._loader = self.load_in_background()

    def stop(self) -> None:
        """At app shutdown: every run is cancelled, active jobs are marked interrupted, the engine thread ends.
        The app may start again (as test clients do)."""
        for context in [*self.running, *self.contexts.values()]:
            context.cancel.set()
        self.jobs.mark_interrupted()
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None

    def load_in_background(self) -> threading.Thread:
        """Load ``settings.model`` in a thread; ``/ready`` answers 503 until it is loaded."""

        def load() -> None:
            from medlens.backends import load_backend
            from medlens.errors import MedlensError

            try:
                self.attach(load_backend(self.settings.model, self.settings.engine, **self.settings.engine_options))
                log.info("model loaded")
            except MedlensError as exc:
                self.load_error = str(exc)
                log.error("model failed to load", extra={"error_type": type(exc).__name__})
            except Exception as exc:  # reported by /ready, never a crash of the server
                self.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("model failed to load")

        thread = threading.Thread(target=load, name="medlens-load", daemon=True)
        thread.start()
        return thread

    def require_ready(self) -> Scheduler:
        if self.scheduler is None:
            raise NotReady(
                f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            )
        return self.scheduler

    def close(self) -> None:
        """Stop and release the worker threads and the job database (the service is done for good)."""
        self.stop()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.jobs.close()

    def _count_batch(self, size: int, outputs: Any) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.tokens.inc(sum(o.completion_tokens for o in outputs))
        self.metrics.prompt_tokens.inc(sum(o.prompt_tokens for o in outputs))
        log.debug("engine batch", extra={"batch_size": size})

    # ------------------------------------------------------------ requests

    async def admit(self, request: Any) -> tuple[Upload, AnalyzeForm, list[StudyInput]]:
        """Take a queue slot (429 when full), then the upload and its checks; the caller hands the upload
        and the slot to a run (which frees both), or both are freed here on failure."""
        self.require_ready()
        self.admission.enter()
        try:
            upload = await receive_upload(request, self.settings)
            try:
                form = read_form(upload, self.settings)
                inputs = await asyncio.to_thread(study_inputs, upload, form.inputs, self.settings)
            except BaseException:
                upload.cleanup()
                raise
        except BaseException:
            self.admission.leave()
            raise
        note = request.state.log
        note |= {"task": form.task, "n_files": len(upload.files), "upload_bytes": upload.size}
        return upload, form, inputs

    def _run(self, form: AnalyzeForm, inputs: list[StudyInput], upload: Upload, context: RunContext) -> dict:
        """Run in a worker thread; always frees the upload and the queue slot."""
        start = time.monotonic()
        self.running.add(context)
        try:
            result = run_analysis(form, inputs, upload, self.require_ready().lane(context), context, self.settings)
            if result.get("adapter") is None and (adapter := self.adapter_identity()) is not None:
                result["adapter"] = adapter  # the engine's lanes do not carry the adapter itself
            return result
        finally:
            self.running.discard(context)
            upload.cleanup()
            self.admission.leave(time.monotonic() - start)

    async def analyze(self, request: Any) -> dict[str, Any]:
        """Run now; 504 past ``timeout_s`` (the run is then cancelled at its next stage or batch)."""
        upload, form, inputs = await self.admit(request)
        context = RunContext(deadline=time.monotonic() + self.settings.timeout_s)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, self._run, form, inputs, upload, context)
        try:
            result = await asyncio.wait_for(asyncio.shield(future), self.settings.timeout_s)
        except TimeoutError:
            context.timed_out = True
            context.cancel.set()
            raise TimedOut(f"the request took longer than {self.settings.timeout_s:g} s (timeout_s)") from None
        except asyncio.CancelledError:
            context.cancel.set()
            raise
        _note_result(request.state.log, result)
        result["request_id"] = request.state.request_id
        return result

    # ------------------------------------------------------------ jobs

    async def submit(self, request: Any) -> dict[str, Any]:
        upload, form, inputs = await self.admit(request)
        job_id = uuid.uuid4().hex
        context = RunContext()
        self.contexts[job_id] = context
        self.jobs.create(job_id, form.task)
        request.state.log["job_id"] = job_id
        self.executor.submit(self._run_job, job_id, form, inputs, upload, context, request.state.request_id)
        return {"id": job_id, "status": "queued", "url": f"/v1/jobs/{job_id}"}

    def _run_job(
        self,
        job_id: str,
        form: AnalyzeForm,
        inputs: list[StudyInput],
        upload: Upload,
        context: RunContext,
        request_id: str,
    ) -> None:
        note: dict[str, Any] = {"job_id": job_id, "task": form.task, "request_id": request_id}
        try:
            if context.cancel.is_set() or not self.jobs.start(job_id):
                upload.cleanup()
                self.admission.leave()
                note["job_status"] = "cancelled"
                return
            context.on_stage = lambda stage, done, total: self.jobs.progress(job_id, stage, done, total)
            result = self._run(form, inputs, upload, context)
            result["request_id"] = request_id
            _note_result(note, result)
            self.jobs.finish(job_id, "succeeded", result=result)
            note["job_status"] = "succeeded"
        except Cancelled:
            note["job_status"] = "cancelled"
        except ApiError as exc:
            self.jobs.finish(job_id, "failed", error=exc.body())
            note |= {"job_status": "failed", "error_type": exc.kind}
        except Exception as exc:
            self.jobs.finish(job_id, "failed", error=INTERNAL)
            note |= {"job_status": "failed", "error_type": type(exc).__name__}
        finally:
            self.contexts.pop(job_id, None)
            log.info("job", extra=note)

    def job(self, job_id: str) -> dict[str, Any]:
        found = self.jobs.get(job_id)
        if found is None:
            raise JobNotFound(f"no job {job_id[:64]!r}")
        return found

    def cancel(self, job_id: str) -> dict[str, str]:
        """Cancel an active job (it stops at its next stage or batch), or delete a finished one."""
        found = self.job(job_id)
        if found["status"] in ("queued", "running"):
            self.jobs.cancel(job_id)
            if (context := self.contexts.get(job_id)) is not None:
                context.cancel.set()
            return {"id": job_id, "status": "cancelled"}
        self.jobs.delete(job_id)
        return {"id": job_id, "status": "deleted"}

    # ------------------------------------------------------------ streaming

    async def stream(self, request: Any) -> AsyncIterator[str]:
        """Server-sent events: ``stage``, ``text`` deltas, then ``result`` or ``error``."""
        upload, form, inputs = await self.admit(request)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str, Any] | None] = asyncio.Queue()

        def emit(event: str, data: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (event, data))

        context = RunContext(
            deadline=time.monotonic() + self.settings.timeout_s,
            on_stage=lambda stage, done, total: emit("stage", {"stage": stage, "done": done, "total": total}),
            on_text=lambda delta: emit("text", {"delta": delta}),
        )
        request_id = request.state.request_id

        def run() -> None:
            try:
                result = self._run(form, inputs, upload, context)
                result["request_id"] = request_id
                emit("result", result)
            except ApiError as exc:
                emit("error", {**exc.body(), "status": exc.status})
            except Exception:
                emit("error", {**INTERNAL, "status": 500})
            finally:
                loop.call_soon_threadsafe(events.put_nowait, None)

        return self._events(loop.run_in_executor(self.executor, run), events, context)

    async def _events(self, future: asyncio.Future, events: asyncio.Queue, context: RunContext) -> AsyncIterator[str]:
        try:
            while True:
                remaining = (context.deadline or 0) - time.monotonic() + 1
                try:
                    item = await asyncio.wait_for(events.get(), max(remaining, 0.01))
                except TimeoutError:
                    context.timed_out = True
                    context.cancel.set()
                    error = TimedOut(f"the request took longer than {self.settings.timeout_s:g} s (timeout_s)")
                    yield sse("error", {**error.body(), "status": error.status})
                    return
                if item is None:
                    return
                event, data = item
                yield sse(event, data)
                if event in ("result", "error"):
                    return
        finally:
            context.cancel.set()


def _adapter_identity(folder: str | None) -> dict[str, str] | None:
    """The identity of the adapter in ``folder``; None without one, or when it cannot be read (the model
    load then fails and ``/ready`` says why)."""
    if folder is None:
        return None
    from medlens.errors import MedlensError
    from medlens.models.adapter import read_adapter

    try:
        return read_adapter(folder).identity()
    except MedlensError:
        return None


def sse(event: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _note_result(note: dict[str, Any], result: dict[str, Any]) -> None:
    """What the request's log line may say about a result: counts and the hashed series tag only."""
    details = result.get("details") or {}
    series = details.get("series")
    note |= {
        "n_images": result.get("n_images"),
        "prompt_tokens": result.get("prompt_tokens"),
        "completion_tokens": result.get("completion_tokens"),
    }
    if isinstance(series, str) and len(series) <= 16:
        note["series"] = series


def error_body(exc: Exception) -> tuple[int, dict[str, str], dict[str, str]]:
    """Status, body and headers of an error raised by a route."""
    if isinstance(exc, ApiError):
        return exc.status, exc.body(), exc.headers
    return 500, INTERNAL, {}
