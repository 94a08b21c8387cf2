"""medlens serve under load: concurrent requests batched into one engine call, a bounded queue (429 with
Retry-After), a per-request timeout (504) that frees the request's slot and upload."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
from medlens.backends import Backend, GenerationOutput, GenerationRequest
from medlens.serve.app import create_app
from medlens.serve.settings import ServeSettings


class FakeBackend(Backend):
    """Answers every prompt after ``delay`` seconds per engine call; records each call's size."""

    engine = "fake"
    model_name = "fake"
    is_test_model = True

    def __init__(self, delay: float = 0.0, real: Backend | None = None) -> None:
        self.delay = delay
        self.real = real
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def generate(self, requests, progress=None, on_output=None):
        with self.lock:
            self.calls.append(len(requests))
        if self.real is not None:
            return self.real.generate(requests, progress, on_output)
        time.sleep(self.delay)
        outputs = [GenerationOutput("Final Answer: yes", 10, 3, "stop") for _ in requests]
        for index, output in enumerate(outputs):
            if on_output is not None:
                on_output(index, output)
        return outputs

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self.generate([request])[0]


def png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 40), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


async def post_many(app, n: int, question: str = "Is it normal?") -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

        async def one(i: int) -> httpx.Response:
            files = [("files", (f"image{i}.png", png(i), "image/png"))]
            return await client.post("/v1/analyze", files=files, data={"question": question})

        return await asyncio.gather(*(one(i) for i in range(n)))


def wait_until(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def temp_dirs(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_concurrent_requests_share_one_engine_call(tiny_backend, tmp_path):
    spy = FakeBackend(real=tiny_backend)
    spy.default_max_new_tokens = 4
    app = create_app(ServeSettings(data_dir=tmp_path, batch_wait_ms=300, batch_size=8), backend=spy)
    responses = asyncio.run(post_many(app, 4))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert max(spy.calls) > 1 and sum(spy.calls) == 4
    assert {r.json()["inputs"][0]["file"] for r in responses} == {f"image{i}.png" for i in range(4)}
    assert all(0 < r.json()["completion_tokens"] <= 4 for r in responses)  # the real model answered


def test_one_request_over_the_queue_gets_429_with_retry_after(tmp_path):
    backend = FakeBackend(delay=0.8)
    app = create_app(ServeSettings(data_dir=tmp_path, max_queue=2, batch_wait_ms=0), backend=backend)
    responses = asyncio.run(post_many(app, 3))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["type"] == "QueueFull" and "max_queue 2" in refused.json()["error"]
    service = app.state.service
    assert service.admission.active == 0 and temp_dirs(tmp_path) == []
    # the slots are free again: the next request is served
    assert [r.status_code for r in asyncio.run(post_many(app, 2))] == [200, 200]


def test_a_request_past_the_timeout_gets_504_and_is_cleaned_up(tmp_path):
    backend = FakeBackend(delay=1.0)
    app = create_app(ServeSettings(data_dir=tmp_path, timeout_s=0.3, batch_wait_ms=0), backend=backend)
    started = time.monotonic()
    (response,) = asyncio.run(post_many(app, 1))
    assert response.status_code == 504 and response.json()["type"] == "Timeout"
    assert time.monotonic() - started < 0.9  # answered at the deadline, not when the engine finished
    service = app.state.service
    assert wait_until(lambda: service.admission.active == 0 and temp_dirs(tmp_path) == [])


def test_cancelled_prompts_never_reach_the_engine(tmp_path):
    backend = FakeBackend(delay=0.6)
    app = create_app(ServeSettings(data_dir=tmp_path, timeout_s=0.2, batch_size=1, batch_wait_ms=0), backend=backend)
    responses = asyncio.run(post_many(app, 3))
    assert [r.status_code for r in responses] == [504] * 3
    service = app.state.service
    assert wait_until(lambda: service.admission.active == 0)
    time.sleep(0.7)
    assert len(backend.calls) == 1  # the first was running; the two queued behind it were dropped


def test_transformers_streams_text_without_changing_the_outputs(tiny_backend):
    from medlens.backends.rendering import clean_completion

    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)

    def ask(question: str) -> GenerationRequest:
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
        return GenerationRequest([{"role": "user", "content": content}], max_new_tokens=12)

    requests = [ask(q) for q in ("What is it?", "Is it normal?", "Describe it.")]
    plain = tiny_backend.generate(requests)
    pieces: dict[int, list[str]] = {}
    streamed = tiny_backend.generate(requests, on_text=lambda i, delta: pieces.setdefault(i, []).append(delta))
    assert [o.text for o in streamed] == [o.text for o in plain]
    assert sorted(pieces) == [0, 1, 2] and max(len(p) for p in pieces.values()) > 1  # pieces as they came
    assert [clean_completion("".join(pieces[i])) for i in range(3)] == [o.text for o in plain]


class PoisonBackend(FakeBackend):
    """Fails a whole engine call whenever one of its prompts asks about poison."""

    def generate(self, requests, progress=None, on_output=None):
        from medlens.backends.base import GenerationFailed
        from medlens.errors import MedlensError

        with self.lock:
            self.calls.append(len(requests))
        time.sleep(self.delay)
        for index, request in enumerate(requests):
            if "poison" in str(request.messages):
                raise GenerationFailed.wrap(MedlensError("the engine choked"), index, {}, len(requests))
        return self._answer(requests, on_output)

    def _answer(self, requests, on_output):
        outputs = [GenerationOutput("Final Answer: yes", 10, 3, "stop") for _ in requests]
        for index, output in enumerate(outputs):
            if on_output is not None:
                on_output(index, output)
        return outputs


def test_one_failing_prompt_does_not_fail_the_others_in_its_batch(tmp_path):
    backend = PoisonBackend(delay=0.05)
    app = create_app(ServeSettings(data_dir=tmp_path, batch_wait_ms=300), backend=backend)

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:

            async def one(i: int, question: str) -> httpx.Response:
                files = [("files", (f"image{i}.png", png(i), "image/png"))]
                return await client.post("/v1/analyze", files=files, data={"question": question})

            return await asyncio.gather(one(0, "fine?"), one(1, "poison?"), one(2, "fine too?"))

    responses = asyncio.run(run())
    assert [r.status_code for r in responses] == [200, 400, 200], [r.text for r in responses]
    assert "the engine choked" in responses[1].json()["error"]
    assert backend.calls[0] == 3  # they were batched, and the two others ran again without the failing one
