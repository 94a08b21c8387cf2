"""Any OpenAI-compatible chat server (vLLM, llama.cpp's llama-server, Ollama, TGI, a hosted endpoint) over HTTP.

Images travel as lossless PNG data URLs. Requests go out ``concurrency`` at a time from worker threads that
share one ``httpx.Client``; transient failures (connection errors, timeouts, 429, 5xx) are retried with
exponential backoff and full jitter, honouring ``Retry-After``. Nothing here starts a server; ``base_url``
points at one the user runs (``ENGINE:MODEL@URL``, ``--model-arg base_url=...`` or ``MEDLENS_OPENAI_BASE_URL``).
"""

from __future__ import annotations

import email.utils
import json
import math
import os
import queue
import random
import re
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from medlens.backends.base import (
    Backend,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    OutputCallback,
    ProgressCallback,
)
from medlens.backends.rendering import clean_completion, image_parts, openai_messages
from medlens.errors import BackendUnavailableError, MedlensError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
#: the longest wait between two attempts that exponential backoff reaches (seconds)
BACKOFF_CAP = 30.0
#: the longest ``Retry-After`` honoured (seconds); a longer one is cut to this
RETRY_AFTER_CAP = 300.0
#: how much of the server's error text goes into a message
SERVER_WORDS = 160


class ServerRefusedError(MedlensError):
    """The server answered a 4xx (other than 429) or a redirect: retrying the same request cannot help."""

    status: int = 0


class ContextTooLongError(ServerRefusedError):
    """The prompt (with ``max_tokens``) does not fit the served model's context. Token counts are ``None``
    where the server did not say them."""

    prompt_tokens: int | None = None
    context_tokens: int | None = None
    max_tokens: int | None = None


class _Abandoned(Exception):
    """A request given up on because another request of the same call failed for good."""


class OpenAIBackend(Backend):
    """Chat completions against ``{base_url}/chat/completions``; greedy by default (temperature 0).

    Options (the ``--model-arg KEY=VALUE`` keys of engine ``openai``):

    - ``base_url``: the server's OpenAI API root, e.g. ``http://127.0.0.1:8000/v1`` (default:
      ``MEDLENS_OPENAI_BASE_URL``, else that address). Redirects are not followed.
    - ``api_key``: sent as ``Authorization: Bearer ...`` (default: ``MEDLENS_OPENAI_API_KEY``, else
      ``OPENAI_API_KEY``, else none).
    - ``timeout``: seconds to wait for each step of one attempt (connecting, sending, and the whole wait for
      the answer, which a non-streaming server sends at once); default 600.
    - ``concurrency``: requests in flight at once, per backend (default 8); match the server's batch size
      (vLLM ``--max-num-seqs``, llama-server ``--parallel``).
    - ``max_retries``: retries of one request after a connection error, a timeout, HTTP 429 or a 5xx other than
      501 (default 5, so at most 6 attempts); 0 turns retrying off.
    - ``backoff``: base of the exponential backoff in seconds (default 0.5): before retry ``k`` (from 0) the
      request waits a random time in ``[0, min(30, backoff * 2**k)]``, or the server's ``Retry-After``
      (up to 300 s) plus up to ``backoff`` when it sends one.
    - ``extra_body``: fields added to every request, for servers with their own sampling options (e.g.
      ``--model-arg 'extra_body={"repeat_penalty": 1.0}'``: llama-cpp-python's server penalises repeats by
      default, so its answers are plain greedy only with this).
    - ``remote``: whether requests leave this machine (default: the host of ``base_url`` is not a loopback
      address, or ``MEDLENS_TREAT_AS_REMOTE=1``); medlens de-identifies the text it sends to remote servers.

    ``generate`` returns outputs in request order; when a request fails for good it stops starting new ones,
    lets those in flight finish, and raises :class:`~medlens.backends.base.GenerationFailed` with the outputs
    that completed.
    """

    engine = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 600.0,
        concurrency: int = 8,
        max_retries: int = 5,
        backoff: float = 0.5,
        extra_body: dict[str, Any] | None = None,
        remote: bool | None = None,
    ):
        self.model_name = model
        self.base_url = _check_base_url(base_url or os.environ.get("MEDLENS_OPENAI_BASE_URL") or DEFAULT_BASE_URL)
        if remote is not None and not isinstance(remote, bool):
            raise MedlensError(f"engine openai: remote must be true or false, not {remote!r}")
        self.remote = is_remote_url(self.base_url) if remote is None else remote
        self.api_key = api_key or os.environ.get("MEDLENS_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = _number("timeout", timeout, positive=True)
        self.concurrency = _whole("concurrency", concurrency, minimum=1)
        self.max_retries = _whole("max_retries", max_retries, minimum=0)
        self.backoff = _number("backoff", backoff, positive=False)
        if extra_body is not None and not isinstance(extra_body, dict):
            raise MedlensError(f"extra_body must be a JSON object, got {extra_body!r}")
        #: server-specific request fields, e.g. llama-cpp-python's ``{"repeat_penalty": 1.0}`` for plain greedy
        self.extra_body: dict[str, Any] = dict(extra_body or {})
        self._random = random.Random()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self._client = httpx.Client(
            headers=headers,
            # waiting for a free connection (another call on this backend holds them all) is queueing, not a timeout
            timeout=httpx.Timeout(self.timeout, pool=None),
            limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency),
            follow_redirects=False,
        )

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
    ) -> list[GenerationOutput]:
        """Complete every request, up to ``concurrency`` at once; outputs in request order, ``on_output(index,
        output)`` and ``progress(1)`` as each one finishes. A request that fails for good raises
        :class:`GenerationFailed`."""
        requests = list(requests)
        workers = min(self.concurrency, len(requests))
        if workers <= 1:
            outputs: dict[int, GenerationOutput] = {}
            for index, request in enumerate(requests):
                try:
                    outputs[index] = self.generate_one(request)
                except MedlensError as exc:
                    raise GenerationFailed.wrap(exc, index, outputs, len(requests)) from exc
                if on_output is not None:
                    on_output(index, outputs[index])
                if progress is not None:
                    progress(1)
            return [outputs[index] for index in range(len(requests))]
        return self._generate_concurrently(requests, workers, progress, on_output)

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self._complete(request, threading.Event())

    def close(self) -> None:
        self._client.close()

    def _generate_concurrently(
        self,
        requests: list[GenerationRequest],
        workers: int,
        progress: ProgressCallback | None,
        on_output: OutputCallback | None = None,
    ) -> list[GenerationOutput]:
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(requests)):
            todo.put(index)
        done: queue.SimpleQueue[tuple[int, GenerationOutput | BaseException] | None] = queue.SimpleQueue()
        stop = threading.Event()

        def work() -> None:
            try:
                while not stop.is_set():
                    try:
                        index = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        result: GenerationOutput | BaseException = self._complete(requests[index], stop)
                    except BaseException as exc:  # handed to the calling thread, which raises it
                        result = exc
                        stop.set()  # before this worker (or another) takes the next request
                    done.put((index, result))
            finally:
                done.put(None)

        # daemon threads: an interrupted call (Ctrl-C) must not keep the process alive for a slow answer
        for number in range(workers):
            threading.Thread(target=work, name=f"medlens-openai-{number}", daemon=True).start()
        outputs: dict[int, GenerationOutput] = {}
        failure: tuple[int, BaseException] | None = None
        try:
            running = workers
            while running:
                item = done.get()
                if item is None:
                    running -= 1
                    continue
                index, result = item
                if isinstance(result, GenerationOutput):
                    outputs[index] = result
                    if on_output is not None:
                        on_output(index, result)
                    if progress is not None:
                        progress(1)
                elif not isinstance(result, _Abandoned) and failure is None:
                    failure = (index, result)
                    stop.set()
        finally:
            stop.set()
        if failure is not None:
            index, exc = failure
            if isinstance(exc, MedlensError):
                raise GenerationFailed.wrap(exc, index, outputs, len(requests)) from exc
            raise exc
        return [outputs[index] for index in range(len(requests))]

    def _complete(self, request: GenerationRequest, stop: threading.Event) -> GenerationOutput:
        start = time.perf_counter()
        max_tokens = request.max_new_tokens or self.default_max_new_tokens
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": openai_messages(request.messages),
            "max_tokens": max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
            **self.extra_body,
        }
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        encoded = time.perf_counter()
        reply, attempts = self._post(payload, request, max_tokens, stop)
        try:
            choice = reply["choices"][0]
            text = clean_completion(choice["message"]["content"] or "")
            if not isinstance(text, str):
                raise TypeError
        except (KeyError, IndexError, TypeError):
            raise MedlensError(f"{self.base_url} answered without a completion: {_short(json.dumps(reply))}") from None
        usage = reply.get("usage") or {}
        return GenerationOutput(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            timings={
                "preprocess": encoded - start,
                "generate": time.perf_counter() - encoded,
                "attempts": float(attempts),
            },
        )

    def _post(
        self, payload: bytes, request: GenerationRequest, max_tokens: int, stop: threading.Event
    ) -> tuple[dict[str, Any], int]:
        """POST with retries; returns the JSON reply and the number of attempts it took."""
        url = self.base_url + "/chat/completions"
        first = time.monotonic()
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            try:
                response = self._client.post(url, content=payload)
            except httpx.TimeoutException as exc:
                last = (
                    f"the model server at {self.base_url} did not answer within {self.timeout:g} s "
                    f"({_timeout_kind(exc)}; a longer --model-arg timeout=... may help)"
                )
            except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
                last = f"cannot reach the model server at {self.base_url} ({exc or type(exc).__name__})"
            except httpx.HTTPError as exc:
                raise MedlensError(f"request to the model server at {self.base_url} failed ({exc})") from None
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return self._json(response), attempt + 1
                if status != 429 and not (500 <= status < 600 and status != 501):
                    raise self._refused(response, request, max_tokens, len(payload))
                words = _server_words(response)
                last = f"the model server at {self.base_url} answered HTTP {status}" + (f" ({words})" if words else "")
                retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            if attempt == self.max_retries:
                break
            if stop.wait(self._delay(attempt, retry_after)):
                raise _Abandoned()
        attempts = self.max_retries + 1
        raise BackendUnavailableError(
            f"{last} (after {attempts} attempt{'s' if attempts > 1 else ''} over {time.monotonic() - first:.1f} s)"
        )

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Full jitter: uniform in [0, min(cap, backoff * 2**attempt)]; Retry-After plus up to ``backoff``."""
        if retry_after is not None:
            return min(retry_after, RETRY_AFTER_CAP) + self._random.uniform(0.0, self.backoff)
        return self._random.uniform(0.0, min(BACKOFF_CAP, self.backoff * 2.0 ** min(attempt, 60)))

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            reply = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MedlensError(f"{self.base_url} did not answer with JSON: {_short(response.text)}") from None
        if not isinstance(reply, dict):
            raise MedlensError(f"{self.base_url} answered without a completion: {_short(response.text)}")
        return reply

    def _refused(
        self, response: httpx.Response, request: GenerationRequest, max_tokens: int, size: int
    ) -> ServerRefusedError:
        """The typed error for an answer that retrying cannot change (4xx other than 429, 3xx, 501)."""
        status = response.status_code
        words = _server_words(response)
        said = f" (server: {words})" if words else ""
        images = len(image_parts(request.messages))
        where = f"the model server at {self.base_url}"
        if 300 <= status < 400:
            target = response.headers.get("Location", "elsewhere")
            error = ServerRefusedError(
                f"{where} answered HTTP {status}, a redirect to {target}; redirects are not followed: "
                "point base_url at the final address"
            )
        elif (counts := _context_overflow(status, words, response)) is not None:
            error = _context_error(self.base_url, counts, max_tokens, images, said)
        elif (limit := _image_limit(words)) is not None:
            error = ServerRefusedError(
                f"{where} takes at most {limit} image(s) per prompt and this request has {images}; for vLLM "
                f"start it with --limit-mm-per-prompt '{{\"image\": {max(images, 85)}}}'{said}"
            )
        elif status in (401, 403):
            sent = "the API key sent was refused" if self.api_key else "no API key was sent"
            error = ServerRefusedError(
                f"{where} answered HTTP {status}: {sent} (set --model-arg api_key=..., MEDLENS_OPENAI_API_KEY or "
                f"OPENAI_API_KEY){said}"
            )
        elif status == 404:
            error = ServerRefusedError(
                f"{where} answered HTTP 404: is model {self.model_name!r} served there (GET {self.base_url}/models "
                f"lists them) and does base_url end in /v1?{said}"
            )
        elif status == 413:
            error = ServerRefusedError(
                f"{where} answered HTTP 413: the request ({size / 1e6:.1f} MB, {images} images) is larger than it "
                f"or a proxy in front of it accepts{said}"
            )
        else:
            error = ServerRefusedError(f"{where} answered HTTP {status}" + (f": {words}" if words else ""))
        error.status = status
        return error


#: set to 1 to treat every OpenAI-compatible server as remote (tests, or a loopback tunnel to another machine)
TREAT_AS_REMOTE_ENV = "MEDLENS_TREAT_AS_REMOTE"


def is_remote_url(url: str) -> bool:
    """True unless the URL's host is a loopback address (``localhost``, ``127.0.0.0/8``, ``::1``), or
    ``MEDLENS_TREAT_AS_REMOTE=1``."""
    import ipaddress

    if os.environ.get(TREAT_AS_REMOTE_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    host = httpx.URL(url).host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _check_base_url(url: str) -> str:
    url = url.rstrip("/")
    url = url.removesuffix("/chat/completions")
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise MedlensError(f"base_url {url!r} is not an http(s) address (e.g. {DEFAULT_BASE_URL})")
    return url


def _whole(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MedlensError(f"engine openai: {name} must be a whole number >= {minimum}, not {value!r}")
    return value


def _number(name: str, value: Any, positive: bool) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise MedlensError(
            f"engine openai: {name} must be a number of seconds {'> 0' if positive else '>= 0'}, not {value!r}"
        )
    return float(value)


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    kinds = {
        httpx.ConnectTimeout: "connecting",
        httpx.WriteTimeout: "sending the request",
        httpx.ReadTimeout: "waiting for the answer",
        httpx.PoolTimeout: "waiting for a connection",
    }
    return next((what for kind, what in kinds.items() if isinstance(exc, kind)), "timed out")


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delay-seconds (fractions accepted) or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return body if isinstance(body, dict) else {}


def _error_object(response: httpx.Response) -> dict[str, Any]:
    """The error object of a JSON error body (OpenAI, vLLM and llama.cpp nest it under ``error``), else the body."""
    body = _json_body(response)
    return body["error"] if isinstance(body.get("error"), dict) else body


def _server_words(response: httpx.Response) -> str:
    """The server's own explanation, shortened: the JSON error message where there is one, else the text."""
    body, error = _json_body(response), _error_object(response)
    for candidate in (
        error.get("message"),  # OpenAI, vLLM, llama.cpp
        body.get("error"),  # TGI: {"error": "...", "error_type": "validation"}
        error.get("detail"),  # FastAPI
    ):
        if isinstance(candidate, str) and candidate.strip():
            return _short(candidate)
    return _short(response.text)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= SERVER_WORDS else text[: SERVER_WORDS - 1].rstrip() + "…"


_CONTEXT_MARKERS = (
    "context length",  # vLLM, OpenAI: "This model's maximum context length is N tokens ..."
    "context_length_exceeded",  # OpenAI's error code
    "context size",  # llama.cpp: "request (N tokens) exceeds the available context size (M tokens)"
    "exceed_context_size",  # llama.cpp's error type
    "`inputs` tokens + `max_new_tokens`",  # TGI
    "context window",
)
_CONTEXT_TOKENS = (
    r"maximum context length is (\d+)",
    r"context size \((\d+) tokens\)",
    r"must be <= (\d+)",
    r"context window of (\d+)",  # llama-cpp-python's Llama: "Requested tokens (N) exceed context window of M"
)
_PROMPT_TOKENS = (
    r"request has (\d+) input tokens",  # vLLM >= 0.9
    r"\((\d+) in the messages",  # older vLLM
    r"messages resulted in (\d+) tokens",  # OpenAI
    r"request \((\d+) tokens\)",  # llama.cpp
    r"Given: (\d+) `inputs` tokens",  # TGI
    r"Requested tokens \((\d+)\)",  # llama-cpp-python's Llama
)


def _context_overflow(status: int, words: str, response: httpx.Response) -> tuple[int | None, int | None] | None:
    """``(prompt_tokens, context_tokens)`` when the answer says the request exceeds the context, else ``None``."""
    error = _error_object(response)
    text = f"{words} {error.get('type', '')} {error.get('code', '')} {response.text[:2000]}"
    if status not in (400, 413, 422) or not any(marker in text for marker in _CONTEXT_MARKERS):
        return None

    def first(patterns: tuple[str, ...], field: str) -> int | None:
        if isinstance(error.get(field), int):
            return int(error[field])
        for pattern in patterns:
            if match := re.search(pattern, text):
                return int(match.group(1))
        return None

    return first(_PROMPT_TOKENS, "n_prompt_tokens"), first(_CONTEXT_TOKENS, "n_ctx")


def _context_error(
    base_url: str, counts: tuple[int | None, int | None], max_tokens: int, images: int, said: str
) -> ContextTooLongError:
    prompt, context = counts
    model = f"the model at {base_url}"
    window = f"{context:,}-token context" if context else "context"
    with_images = f" with {images} image{'s' if images != 1 else ''}" if images else ""
    longer = "give the server a longer context (vLLM --max-model-len, llama-server -c)"
    if prompt is not None and context is not None and prompt < context:
        reason = (
            f"the prompt{with_images} is {prompt:,} tokens and max_tokens {max_tokens:,}: together more than the "
            f"{window} of {model}; lower max_new_tokens or {longer}"
        )
    elif prompt is not None:
        reason = f"the prompt{with_images} is {prompt:,} tokens, more than the {window} of {model}; {longer}" + (
            " or send fewer images" if images else ""
        )
    else:
        reason = f"the prompt{with_images} (with max_tokens {max_tokens:,}) does not fit the {window} of {model}"
    error = ContextTooLongError(reason + said)
    error.prompt_tokens, error.context_tokens, error.max_tokens = prompt, context, max_tokens
    return error


def _image_limit(words: str) -> int | None:
    """vLLM's ``--limit-mm-per-prompt`` refusal: "At most N image(s) may be provided in one prompt"."""
    match = re.search(r"At most (\d+) image\(s\) may be provided", words)
    return int(match.group(1)) if match else None
