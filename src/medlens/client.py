"""A Python client for a running ``medlens serve``.

>>> client = Client("http://127.0.0.1:8080", api_key="...")          # doctest: +SKIP
>>> client.analyze("ct_folder", question="Any nodules?")["answer"]   # doctest: +SKIP

Every call returns the server's JSON (the task envelope for :meth:`Client.analyze`). A failure is a typed
error: :class:`ServerUnreachableError` (nothing answers at the URL), or a :class:`ServerError` carrying the
HTTP status and the server's one-line message. A 400 whose type is a medlens error (``CorruptFileError`` ...)
is also an instance of that class, so ``except CorruptFileError`` works against a server as it does locally.
httpx is imported only when a client is made.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from medlens import errors
from medlens.errors import MedlensError, NotFoundError

PathLike = str | Path
#: how the parts of one upload are given to httpx: (field, (filename, file, content type))
Part = tuple[str, tuple[str, "LazyFile", str]]


class ServerUnreachableError(MedlensError):
    """Nothing answers at the server's URL (refused, DNS, TLS, or it timed out)."""


class ServerError(MedlensError):
    """The server answered with an error status; ``status``, ``type`` and ``message`` are what it said."""

    def __init__(self, message: str, status: int, kind: str = "", url: str = "") -> None:
        self.status = status
        self.type = kind
        self.message = message
        self.url = url
        said = " from ".join(part for part in (f"HTTP {status}" if status else "", url) if part)
        super().__init__(f"{message} ({said})" if said else message)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _make_error, (self.message, self.status, self.type, self.url, _plain_base(type(self)))


class UnauthorizedError(ServerError):
    """401: the API key is missing or wrong."""


class JobNotFoundError(ServerError):
    """404: no job (or route) of that id."""


class RequestTooLargeError(ServerError):
    """413: the upload is larger than the server accepts."""


class ServerBusyError(ServerError):
    """429: the queue is full; ``retry_after`` (seconds) is when to try again, if the server said."""

    retry_after: float | None = None


class ModelNotReadyError(ServerError):
    """503: the server is still loading its model."""


class ServerTimeoutError(ServerError):
    """504: the request ran past the server's per-request time limit."""


class JobFailedError(ServerError):
    """A job ended ``failed`` or ``cancelled``; ``job`` is its last record."""

    job: dict[str, Any] | None = None


class WaitTimeoutError(MedlensError):
    """:meth:`Client.wait` gave up before the job finished (the job keeps running)."""


#: HTTP status -> the error raised for it (others: :class:`ServerError`)
STATUS_ERRORS: dict[int, type[ServerError]] = {
    401: UnauthorizedError,
    404: JobNotFoundError,
    413: RequestTooLargeError,
    429: ServerBusyError,
    503: ModelNotReadyError,
    504: ServerTimeoutError,
}


@functools.cache
def _error_class(base: type[ServerError], type_name: str) -> type[ServerError]:
    """``base``, or a subclass of it and of the medlens error named ``type_name`` when there is one."""
    local = getattr(errors, type_name, None) if type_name.isidentifier() else None
    if not (isinstance(local, type) and issubclass(local, MedlensError)) or issubclass(base, local):
        return base
    return type(f"{base.__name__}[{type_name}]", (base, local), {"__module__": __name__})


def _make_error(
    message: str, status: int, type_name: str = "", url: str = "", base: type[ServerError] | None = None
) -> ServerError:
    """The typed error: ``base`` (default: the class of ``status``), also the medlens error ``type_name``."""
    kind = _error_class(base or STATUS_ERRORS.get(status, ServerError), type_name)
    return kind(message, status, type_name, url)


def _plain_base(kind: type[ServerError]) -> type[ServerError]:
    """The client's own class under a combined error class (for pickling)."""
    return next(k for k in kind.__mro__ if k.__module__ == __name__ and not k.__name__.endswith("]"))


def error_from_response(response: Any) -> ServerError:
    """The typed error of an httpx response with an error status (its body ``{"error", "type"}``)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        message, kind = body["error"], str(body.get("type") or "")
    elif isinstance(body, dict) and body.get("detail") is not None:  # FastAPI's own 404/405/422 bodies
        message, kind = str(body["detail"]), ""
    else:
        message, kind = (response.text.strip().splitlines() or [response.reason_phrase])[0][:300], ""
    error = _make_error(message, response.status_code, kind, str(response.request.url))
    if isinstance(error, ServerBusyError):
        with contextlib.suppress(TypeError, ValueError):
            error.retry_after = float(response.headers.get("retry-after"))
    return error


class LazyFile:
    """A file opened only while it is read (and closed at its end): a 2,000-file series uploads without holding
    2,000 descriptors. Enough of a binary file for httpx's multipart encoder: ``read``, ``seek``, ``tell``."""

    mode = "rb"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._pos = 0

    def read(self, size: int = -1) -> bytes:
        if self._file is None:
            self._file = self.path.open("rb")
            self._file.seek(self._pos)
        chunk = self._file.read(size)
        self._pos += len(chunk)
        if not chunk or size is None or size < 0:
            self.close()
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        self.close()
        start = {0: 0, 1: self._pos, 2: self.path.stat().st_size}[whence]
        self._pos = start + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def upload_parts(paths: PathLike | Sequence[PathLike], stack: contextlib.ExitStack) -> tuple[list[Part], list[dict]]:
    """The file parts of ``paths`` and the ``inputs`` list naming them, one input per path.

    A file is one part named by its file name; a folder is every file under it, named ``FOLDER/relative/path``.
    Names are prefixed with ``inputN/`` when two inputs would otherwise share one. Files are opened only while
    httpx reads them; ``stack`` closes any left open.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise MedlensError("no input given: name at least one file or folder")
    listed: list[list[tuple[str, Path]]] = []
    for item in items:
        path = Path(item)
        if path.is_file():
            listed.append([(path.name, path)])
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            if not files:
                raise errors.NoImagesFoundError("the folder holds no files", str(path))
            top = path.resolve().name or "input"
            listed.append([(f"{top}/{p.relative_to(path).as_posix()}", p) for p in files])
        else:
            raise NotFoundError("no such file or folder", str(path))
    names = [name for files in listed for name, _ in files]
    clash = len(set(names)) != len(names)
    parts: list[Part] = []
    inputs: list[dict] = []
    for number, files in enumerate(listed, start=1):
        own = []
        for name, path in files:
            sent = f"input{number}/{name}" if clash else name
            lazy = LazyFile(path)
            stack.callback(lazy.close)
            parts.append(("files", (sent, lazy, "application/octet-stream")))
            own.append(sent)
        inputs.append({"files": own})
    return parts, inputs


def form_fields(
    inputs: list[dict], task: str, question: str | None, return_images: bool, options: dict[str, Any]
) -> dict[str, str]:
    """The text fields of an analyze/jobs/stream form (unset options left out)."""
    given = {k: v for k, v in options.items() if v is not None}
    fields = {"task": task, "inputs": json.dumps(inputs), "return_images": "true" if return_images else "false"}
    if question is not None:
        fields["question"] = question
    if given:
        fields["options"] = json.dumps(given, default=str)
    return fields


def parse_sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(event, data)`` pairs of a text/event-stream; ``data`` lines of one event are joined (JSON)."""
    event, data = "message", []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    value = json.loads(text)
                except ValueError:
                    value = {"data": text}
                yield event, value if isinstance(value, dict) else {"data": value}
            event, data = "message", []
        elif line.startswith(":"):
            continue  # a comment (keep-alive)
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
    if data:
        yield event, json.loads("\n".join(data))


class Client:
    """Calls a ``medlens serve`` at ``base_url`` (``http://host:port``), with ``api_key`` as a Bearer token.

    ``timeout`` (seconds) bounds each request, a long synchronous analysis included. Use it as a context
    manager, or call :meth:`close`, to release its connections.
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        if not self.base_url.startswith(("http://", "https://")):
            raise MedlensError(f"the server URL must start with http:// or https://, got {base_url!r}")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    # ------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _connection(self) -> Iterator[None]:
        """httpx's transport failures as :class:`ServerUnreachableError` naming the URL."""
        import httpx

        try:
            yield
        except httpx.TimeoutException as exc:
            reason = f"the medlens server at {self.base_url} did not answer in time ({exc})"
            raise ServerUnreachableError(reason) from None
        except httpx.TransportError as exc:
            raise ServerUnreachableError(f"cannot reach the medlens server at {self.base_url} ({exc})") from None

    def _call(self, method: str, route: str, **kwargs: Any) -> Any:
        """The JSON of ``method route``; an error status is raised as its typed error."""
        with self._connection():
            response = self._http.request(method, route, **kwargs)
        if response.status_code >= 400:
            raise error_from_response(response)
        return response.json()

    def _form_call(
        self,
        route: str,
        paths: PathLike | Sequence[PathLike],
        task: str,
        question: str | None,
        return_images: bool,
        options: dict[str, Any],
    ) -> Any:
        with contextlib.ExitStack() as stack:
            parts, inputs = upload_parts(paths, stack)
            data = form_fields(inputs, task, question, return_images, options)
            return self._call("POST", route, data=data, files=parts)

    # ------------------------------------------------------------ routes

    def health(self) -> dict[str, Any]:
        """``GET /health``: ``{"status": "ok"}`` when the server runs."""
        return self._call("GET", "/health")

    def ready(self) -> dict[str, Any]:
        """``GET /ready``: ``{"status": "ready", "model": M}``; :class:`ModelNotReadyError` while loading."""
        return self._call("GET", "/ready")

    def tasks(self) -> list[dict[str, Any]]:
        """The tasks the server runs, with their options."""
        return self._call("GET", "/v1/tasks")["tasks"]

    def models(self) -> list[dict[str, Any]]:
        """The model(s) the server has loaded."""
        return self._call("GET", "/v1/models")["models"]

    def analyze(
        self,
        paths: PathLike | Sequence[PathLike],
        task: str = "qa",
        question: str | None = None,
        return_images: bool = False,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Run ``task`` on ``paths`` (a file, a folder, or several inputs for e.g. ``compare``) and return the
        envelope; ``options`` are task options (recipe, series, modality, thinking, max_new_tokens ...).

        With ``on_event`` the work goes over the event stream and ``on_event(name, data)`` sees each ``stage``
        and ``text`` event as it comes; a failure is raised as the same typed error either way."""
        if on_event is None:
            return self._form_call("/v1/analyze", paths, task, question, return_images, options)
        for name, data in self.stream(paths, task, question, return_images, **options):
            if name == "result":
                return data
            if name == "error":
                status = int(data.get("status") or 500)
                kind = str(data.get("type") or "")
                raise _make_error(str(data.get("error")), status, kind, f"{self.base_url}/v1/analyze/stream")
            on_event(name, data)
        raise ServerError("the event stream ended without a result", 0, "", f"{self.base_url}/v1/analyze/stream")

    def submit(
        self,
        paths: PathLike | Sequence[PathLike],
        task: str = "qa",
        question: str | None = None,
        return_images: bool = False,
        **options: Any,
    ) -> str:
        """Queue the same work as :meth:`analyze` as a job; returns its id (see :meth:`wait`)."""
        return str(self._form_call("/v1/jobs", paths, task, question, return_images, options)["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        """The job's record: status, progress, result (the envelope once succeeded), error."""
        return self._call("GET", f"/v1/jobs/{job_id}")

    def jobs(self) -> list[dict[str, Any]]:
        """Every job the server knows, newest first (without results)."""
        return self._call("GET", "/v1/jobs")["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job (or delete a finished one's record)."""
        return self._call("DELETE", f"/v1/jobs/{job_id}")

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> dict[str, Any]:
        """The envelope of the job once it succeeded; :class:`JobFailedError` if it failed or was cancelled,
        :class:`WaitTimeoutError` after ``timeout`` seconds (None: no limit)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            status = record.get("status")
            if status == "succeeded":
                return record["result"]
            if status in ("failed", "cancelled"):
                problem = record.get("error") or {}
                message = problem.get("error") or f"the job was {status}"
                kind = str(problem.get("type") or "")
                where = f"{self.base_url}/v1/jobs/{job_id}"
                failed = _make_error(f"job {job_id} {status}: {message}", 0, kind, where, JobFailedError)
                failed.job = record  # type: ignore[attr-defined]
                raise failed
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(f"job {job_id} is still {status} after {timeout:g} s")
            time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))

    def stream(
        self,
        paths: PathLike | Sequence[PathLike],
        task: str = "qa",
        question: str | None = None,
        return_images: bool = False,
        **options: Any,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Run as :meth:`analyze` and yield the server-sent events as they come: ``("stage", {...})``,
        ``("text", {"delta": ...})``, then ``("result", envelope)`` or ``("error", {...})``."""
        with contextlib.ExitStack() as stack:
            parts, inputs = upload_parts(paths, stack)
            data = form_fields(inputs, task, question, return_images, options)
            with self._connection():
                response = stack.enter_context(self._http.stream("POST", "/v1/analyze/stream", data=data, files=parts))
            if response.status_code >= 400:
                response.read()
                raise error_from_response(response)
            with self._connection():
                for event, value in parse_sse(response.iter_lines()):
                    yield event, value
                    if event in ("result", "error"):
                        return
