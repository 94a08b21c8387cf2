"""A real ``medlens serve`` for the tests: :func:`medlens.serve.app.create_app` under uvicorn in a thread.

A pytest plugin: a test module asks for it with ``pytest_plugins = ["medlens_server"]`` and gets the
module-scoped fixtures ``medlens_server`` (a :class:`RunningServer` without an API key, on test-tiny whose
localize answers are fixed, see :class:`FixedLocalizeBackend`) and ``keyed_server`` (the same with
:data:`TEST_KEY`). :func:`serve` starts one with any backend and settings. Each server listens on a free
127.0.0.1 port and keeps its jobs under its own temporary data dir. Without fastapi/uvicorn (the ``serve``
extra) or torch the fixtures skip with the reason.
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import json
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, OutputCallback, ProgressCallback

#: the API key of ``keyed_server``
TEST_KEY = "test-key-0123456789abcdef"
#: a valid localize answer (box_2d is [y0, x0, y1, x1] on 0..1000 of the padded square)
LOCALIZE_ANSWER = json.dumps(
    [
        {"box_2d": [120, 90, 820, 470], "label": "right lung"},
        {"box_2d": [130, 530, 830, 910], "label": "left lung"},
        {"box_2d": [450, 380, 780, 700], "label": "heart"},
    ]
)
#: what the server needs besides medlens itself
SERVE_MODULES = ("fastapi", "uvicorn", "multipart", "httpx")


def serve_missing() -> str | None:
    """Why a real server cannot run here, else None."""
    absent = [name for name in (*SERVE_MODULES, "torch") if importlib.util.find_spec(name) is None]
    if absent:
        return f"missing {', '.join(absent)}: pip install -e '.[serve]'"
    if importlib.util.find_spec("medlens.serve.app") is None:
        return "medlens.serve.app is not there yet"
    return None


def free_port() -> int:
    """A TCP port nobody listens on at the moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _is_localize(request: GenerationRequest) -> bool:
    """The request is the localize task's prompt (it spells out the box_2d answer format)."""
    for message in request.messages:
        content = message.get("content")
        parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
        if any(p.get("type") == "text" and "box_2d" in str(p.get("text")) for p in parts):
            return True
    return False


class FixedLocalizeBackend(Backend):
    """test-tiny, except that a localize prompt gets :data:`LOCALIZE_ANSWER` (test-tiny is untrained, so its
    boxes would be noise); everything else the wrapped backend does and says (name, engine, test-model flag)."""

    def __init__(self, inner: Backend, answer: str = LOCALIZE_ANSWER) -> None:
        self.inner = inner
        self.answer = answer
        for name in ("engine", "model_name", "is_test_model", "model_warning", "default_max_new_tokens"):
            setattr(self, name, getattr(inner, name))
        self.fingerprint = inner.fingerprint

    def __getattr__(self, name: str) -> Any:  # anything else the server asks of a backend
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        on_text: Callable[[int, str], None] | None = None,
    ) -> list[GenerationOutput]:
        """As the wrapped backend; ``on_text(index, delta)`` gets each output's text (at once, unless the wrapped
        backend streams itself)."""
        fixed = any(_is_localize(r) for r in requests)
        streams = "on_text" in inspect.signature(self.inner.generate).parameters
        if not fixed and (on_text is None or streams):
            more = {"on_text": on_text} if on_text is not None else {}
            return self.inner.generate(requests, progress, on_output, **more)

        def delivered(index: int, output: GenerationOutput) -> None:
            if on_text is not None:
                on_text(index, output.text)
            if on_output is not None:
                on_output(index, output)

        if not fixed:
            return self.inner.generate(requests, progress, delivered)
        return super().generate(requests, progress, delivered)

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        if _is_localize(request):
            return GenerationOutput(self.answer, 300, 60, "stop")
        return self.inner.generate_one(request)


@dataclass
class RunningServer:
    """A server listening at :attr:`url`; ``api_key`` is its key (None: no key)."""

    url: str
    api_key: str | None
    data_dir: Path
    app: Any

    def client(self, api_key: str | None = None, **options: Any) -> Any:
        from medlens.client import Client

        return Client(self.url, api_key=api_key if api_key is not None else self.api_key, **options)


@contextlib.contextmanager
def serve(backend: Backend, api_key: str | None = None, **settings: Any) -> Iterator[RunningServer]:
    """Run ``create_app`` with ``backend`` on a free loopback port until the block ends."""
    import uvicorn

    from medlens.serve.app import create_app
    from medlens.serve.settings import ServeSettings

    with tempfile.TemporaryDirectory(prefix="medlens-serve-") as tmp:
        port = free_port()
        config = ServeSettings(
            model=backend.model_name, host="127.0.0.1", port=port, api_key=api_key, data_dir=Path(tmp), **settings
        )
        app = create_app(config, backend)
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, name=f"medlens-serve-{port}", daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the medlens test server did not start")
            time.sleep(0.02)
        try:
            yield RunningServer(f"http://127.0.0.1:{port}", api_key, Path(tmp), app)
        finally:
            server.should_exit = True
            thread.join(15)


@pytest.fixture(scope="module")
def serve_backend(tiny_backend: Backend) -> Backend:
    """test-tiny with fixed localize answers."""
    return FixedLocalizeBackend(tiny_backend)


@pytest.fixture(scope="module")
def medlens_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """A server without an API key."""
    reason = serve_missing()
    if reason:
        pytest.skip(reason)
    with serve(request.getfixturevalue("serve_backend")) as running:
        yield running


@pytest.fixture(scope="module")
def keyed_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """A server that needs :data:`TEST_KEY`."""
    reason = serve_missing()
    if reason:
        pytest.skip(reason)
    with serve(request.getfixturevalue("serve_backend"), api_key=TEST_KEY) as running:
        yield running
