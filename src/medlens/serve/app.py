"""The FastAPI app of ``medlens serve``: routes over :class:`~medlens.serve.service.Service`, wrapped in the
guards (API key, body size) and the request log. See docs/serve.md for the API."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from medlens import DISCLAIMER, __version__
from medlens.backends import Backend
from medlens.serve.observe import ObserveMiddleware
from medlens.serve.problems import ApiError
from medlens.serve.security import AuthMiddleware, BodyLimitMiddleware, SecurityHeadersMiddleware
from medlens.serve.service import INTERNAL, Service
from medlens.serve.settings import ServeSettings, check_settings

STATIC = Path(__file__).parent / "static"

#: the multipart form of analyze, jobs and stream, for the OpenAPI schema (the body is parsed as a stream)
FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                        "inputs": {"type": "string", "description": "JSON list, one item per task input"},
                        "task": {"type": "string", "default": "qa"},
                        "question": {"type": "string"},
                        "options": {"type": "string", "description": "JSON object of task options"},
                        "return_images": {"type": "boolean", "default": False},
                    },
                    "required": ["files"],
                }
            }
        },
    }
}


def create_app(settings: ServeSettings, backend: Backend | None = None) -> FastAPI:
    """The app. With ``backend`` (already loaded) it is ready at once; otherwise it loads ``settings.model``
    in a background thread at start-up and ``/ready`` answers 503 until then. Refuses unsafe settings
    (:class:`~medlens.serve.settings.ServeSettingsError`)."""
    check_settings(settings)
    service = Service(settings, backend)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="medlens",
        version=__version__,
        description=f"Study-level MedGemma API. {DISCLAIMER}",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.service = service
    _errors(app)
    _routes(app, service)
    # outermost first: the log sees every answer, the key is checked before the body size is looked at
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(AuthMiddleware, api_key=settings.api_key)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(ObserveMiddleware, metrics=service.metrics)
    return app


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}", "type": "BadField"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail), "type": "HTTPError"}, exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(INTERNAL, 500)


def _routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    def with_adapter(body: dict[str, Any]) -> dict[str, Any]:
        """``body`` plus ``adapter`` ({name, sha256}) when the model runs with one."""
        adapter = service.adapter_identity()
        return body if adapter is None else {**body, "adapter": adapter}

    @app.get("/health", tags=["status"])
    async def health() -> dict[str, Any]:
        """Liveness: the process answers (and names the adapter, when there is one)."""
        return with_adapter({"status": "ok"})

    @app.get("/ready", tags=["status"])
    async def ready() -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or when it failed to load)."""
        try:
            service.require_ready()
        except ApiError as exc:
            status = "failed" if service.load_error else "loading"
            return JSONResponse({**exc.body(), "status": status}, exc.status)
        return JSONResponse(with_adapter({"status": "ready", "model": settings.model}))

    @app.get("/v1/models", tags=["models"])
    async def models() -> dict[str, Any]:
        backend = service.backend
        model = {
            "id": settings.model if backend is None else backend.model_name or settings.model,
            "engine": settings.engine if backend is None else backend.engine,
            "untrained_test_model": bool(backend and backend.is_test_model),
        }
        return {"models": [with_adapter(model)]}

    @app.get("/v1/tasks", tags=["tasks"])
    async def tasks() -> dict[str, Any]:
        return {"tasks": task_listing()}

    @app.post("/v1/analyze", tags=["analyze"], openapi_extra=FORM_SCHEMA)
    async def analyze(request: Request) -> JSONResponse:
        """Run a task on the uploaded study now; the result envelope."""
        return JSONResponse(await service.analyze(request))

    @app.post("/v1/analyze/stream", tags=["analyze"], openapi_extra=FORM_SCHEMA)
    async def analyze_stream(request: Request) -> StreamingResponse:
        """The same run as server-sent events: stage, text deltas, then result or error."""
        events = await service.stream(request)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

    @app.post("/v1/jobs", tags=["jobs"], status_code=202, openapi_extra=FORM_SCHEMA)
    async def submit(request: Request) -> JSONResponse:
        """Queue a run; poll ``url`` for its progress and result."""
        return JSONResponse(await service.submit(request), 202)

    @app.get("/v1/jobs", tags=["jobs"])
    async def list_jobs() -> dict[str, Any]:
        return {"jobs": service.jobs.list()}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    async def get_job(job_id: str) -> dict[str, Any]:
        return service.job(job_id)

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    async def delete_job(job_id: str) -> dict[str, str]:
        """Cancel a queued or running job; delete a finished one."""
        return service.cancel(job_id)

    @app.get("/metrics", tags=["status"])
    async def metrics() -> Response:
        body, kind = service.metrics.render()
        return Response(body, media_type=kind)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        index = STATIC / "index.html"
        if not index.is_file():
            return JSONResponse({"error": "the web page is not installed", "type": "NotFound"}, 404)
        return FileResponse(index, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")


def task_listing() -> list[dict[str, Any]]:
    """Every task with its inputs, whether it needs a question, and the options it takes."""
    from medlens.serve.runner import SERVER_ONLY
    from medlens.tasks import TASKS, task_class

    listed = []
    for name in TASKS:
        cls = task_class(name)
        listed.append(
            {
                "name": name,
                "description": cls.description,
                "min_inputs": cls.min_inputs,
                "max_inputs": cls.max_inputs,
                "needs_question": cls.default_question is None,
                "options": [
                    {"name": o.name, "type": _type_name(o.type), "default": o.default, "help": o.help}
                    for o in cls.options
                    if o.name not in SERVER_ONLY
                ],
            }
        )
    return listed


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")
