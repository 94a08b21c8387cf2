"""ASGI middleware that guards every request before any route runs: the API key and the body size cap."""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from medlens.serve.problems import ApiError, BodyTooLarge, Unauthorized

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: the only paths served without the key (they hold no data); everything else, unknown paths included, needs it
OPEN_PATHS = frozenset({"/health", "/ready", "/"})
OPEN_PREFIXES = ("/static/",)


def needs_key(path: str) -> bool:
    """Whether a request for ``path`` must carry the API key (when one is configured)."""
    return path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES)


def key_matches(header: str | None, key: str) -> bool:
    """``Authorization: Bearer <key>`` compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    ok_scheme = hmac.compare_digest(scheme.lower().encode(), b"bearer")
    ok_key = hmac.compare_digest(given.strip().encode("utf-8"), key.encode("utf-8"))
    return ok_scheme and ok_key


async def send_error(send: Send, error: ApiError) -> None:
    """Answer ``error`` as the API's JSON error body."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class AuthMiddleware:
    """401 for a request without the right key, before the body is read or a route runs."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.api_key is not None
            and needs_key(scope.get("path", ""))
            and not key_matches(_header(scope, b"authorization"), self.api_key)
        ):
            await send_error(send, Unauthorized())
            return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 when the body is larger than ``limit`` bytes: at once from ``Content-Length``, else as soon as the
    streamed (chunked) bytes pass the limit; the rest of the body is never read."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _error(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body is larger than the {self.limit / 2**20:g} MB limit (max_body_mb)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            await send_error(send, self._error())
            return
        seen = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._error()
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge as exc:
            if not started:
                await send_error(send, exc)


#: the page's policy: everything from this server, previews as data: URLs, no inline script or style
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class SecurityHeadersMiddleware:
    """``nosniff`` and ``no-referrer`` on every answer; the content security policy on the page and its files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
        if not needs_key(scope.get("path", "")):
            extra += [(b"content-security-policy", PAGE_POLICY.encode()), (b"x-frame-options", b"DENY")]

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)
