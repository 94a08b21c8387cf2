"""HTTP errors of the API: one JSON shape ``{"error": ..., "type": ...}`` and the status of each failure."""

from __future__ import annotations

from collections.abc import Mapping

from medlens.errors import MedlensError


class ApiError(Exception):
    """A failure answered with ``status`` and ``{"error": message, "type": kind}``."""

    status: int = 400
    kind: str = "BadRequest"

    def __init__(
        self,
        message: str,
        status: int | None = None,
        kind: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message.replace("\n", " ")
        self.status = status or type(self).status
        self.kind = kind or type(self).kind
        self.headers = dict(headers or {})

    def body(self) -> dict[str, str]:
        return {"error": self.message, "type": self.kind}


class Unauthorized(ApiError):
    status, kind = 401, "Unauthorized"

    def __init__(self) -> None:
        super().__init__("missing or wrong API key", headers={"WWW-Authenticate": "Bearer"})


class BodyTooLarge(ApiError):
    status, kind = 413, "RequestTooLarge"


class BadField(ApiError):
    """A form field that is missing, malformed or names an unknown option (422)."""

    status, kind = 422, "BadField"


class QueueFull(ApiError):
    status, kind = 429, "QueueFull"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


class NotReady(ApiError):
    status, kind = 503, "NotReady"


class TimedOut(ApiError):
    status, kind = 504, "Timeout"


class JobNotFound(ApiError):
    status, kind = 404, "NotFound"


class Cancelled(MedlensError):
    """A job was cancelled while it ran (raised at its next stage or batch boundary)."""


def from_medlens_error(exc: MedlensError, names: Mapping[str, str]) -> ApiError:
    """A 400 for a typed medlens error, server paths in its message replaced by the upload names
    (``names``: server path prefix -> what the client called it)."""
    return ApiError(redact_paths(str(exc), names), 400, type(exc).__name__.split("[")[0])


def redact_paths(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every server path prefix of ``names`` (longest first) replaced by its upload name."""
    for prefix in sorted(names, key=len, reverse=True):
        text = text.replace(prefix, names[prefix])
    return text
