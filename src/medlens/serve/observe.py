"""What the server tells its operators: Prometheus metrics (one registry per app) and one JSON log line per
request (request id, route, status, duration, sizes, hashed series tags), never names, IDs, dates of birth,
report text or answers."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from medlens.serve.security import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("medlens.serve")

#: the only record attributes the JSON formatter writes (a log call cannot smuggle other fields out)
LOG_FIELDS = (
    "request_id", "method", "route", "status", "duration_ms", "request_bytes", "response_bytes", "task",
    "n_files", "upload_bytes", "n_images", "series", "job_id", "job_status", "error_type", "batch_size",
    "prompt_tokens", "completion_tokens",
)  # fmt: skip


class JsonLines(logging.Formatter):
    """A log record as one JSON object: time, level, logger, message and the whitelisted extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line |= {k: getattr(record, k) for k in LOG_FIELDS if hasattr(record, k)}
        return json.dumps(line, default=str)


class Metrics:
    """The app's Prometheus registry: requests, latency, queue depth, batch sizes and generated tokens."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "medlens_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "medlens_request_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.queue_depth = Gauge("medlens_queue_depth", "Runs admitted (queued or running)", registry=self.registry)
        self.engine_queue = Gauge("medlens_engine_queue", "Prompts waiting for the engine", registry=self.registry)
        self.batch_size = Histogram(
            "medlens_batch_size", "Prompts per engine call", buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry
        )
        self.prompt_tokens = Counter("medlens_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.tokens = Counter("medlens_generated_tokens", "Generated tokens", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def route_of(scope: Scope) -> str:
    """The route template (``/v1/jobs/{job_id}``), so that metrics never carry ids; ``unmatched`` else."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path:
        return path
    return "/static" if scope.get("path", "").startswith("/static/") else "unmatched"


class ObserveMiddleware:
    """Gives each request an id (``X-Request-ID``), counts and times it, and logs one JSON-ready line."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["log"] = {}
        start = time.perf_counter()
        status = 500
        sent = 0
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            return message

        async def watched_send(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        finally:
            seconds = time.perf_counter() - start
            route = route_of(scope)
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(seconds)
            extra = {k: v for k, v in state.get("log", {}).items() if k in LOG_FIELDS}
            log.info(
                "request",
                extra={
                    "request_id": request_id,
                    "method": scope.get("method"),
                    "route": route,
                    "status": status,
                    "duration_ms": round(seconds * 1000, 1),
                    "request_bytes": received,
                    "response_bytes": sent,
                    **extra,
                },
            )


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stderr for the ``medlens.serve`` logger (the CLI calls this; tests capture records)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines())
    logger = logging.getLogger("medlens.serve")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
