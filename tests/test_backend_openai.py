"""The OpenAI-compatible HTTP backend against a small fake server on loopback."""

from __future__ import annotations

import base64
import io
import json
import pickle
import re
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from medlens.backends import GenerationOutput, GenerationRequest, load_backend
from medlens.backends.base import GenerationFailed
from medlens.backends.openai_backend import ContextTooLongError, ServerRefusedError, _retry_after_seconds
from medlens.errors import BackendUnavailableError, MedlensError

pytest_plugins = ["servers"]  # llamacpp_server: a real OpenAI-compatible server (skipped without llama-cpp-python)

Reply = tuple[int, dict, dict[str, str]]  # status, JSON body, extra headers
FAST = {"backoff": 0.001}  # retries without waiting


def completion(text: str, finish: str = "stop") -> dict:
    return {
        "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 42, "completion_tokens": 7},
    }


def echo(body: dict) -> Reply:
    return 200, completion("re: " + body["messages"][0]["content"]), {}


def ask(text: str) -> GenerationRequest:
    return GenerationRequest([{"role": "user", "content": text}])


class FakeServer:
    """Answers /v1/chat/completions with queued replies (or ``respond(body)``), after ``delay(body)`` seconds;
    keeps the request bodies and headers, and counts the requests it holds at once."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.respond: Callable[[dict], Reply] | None = None
        self.delay: Callable[[dict], float] = lambda body: 0.0
        self.bodies: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.finished: list[str] = []  # prompt texts, in the order their answers went out
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # else every answer waits ~40 ms for a delayed ACK

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = json.loads(self.rfile.read(length))
                with outer.lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    time.sleep(outer.delay(body))
                    with outer.lock:
                        status, reply, headers = outer.respond(body) if outer.respond else outer.replies.pop(0)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1
                        content = body["messages"][0]["content"]
                        outer.finished.append(content if isinstance(content, str) else "")
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client that timed out and left is expected here

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def reply(self, text: str, finish: str = "stop", status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.replies.append((status, completion(text, finish) if status == 200 else {"error": text}, headers or {}))


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_images_travel_as_lossless_png(server):
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3)).astype(np.uint8)
    server.reply("Final Answer: yes")
    backend = load_backend(f"openai:medgemma@{server.url}")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Q?"}]}]
    (out,) = backend.generate([GenerationRequest(messages, max_new_tokens=33)])
    assert (out.text, out.prompt_tokens, out.completion_tokens, out.finish_reason) == (
        "Final Answer: yes",
        42,
        7,
        "stop",
    )
    body = server.bodies[0]
    assert body["model"] == "medgemma" and body["max_tokens"] == 33 and body["temperature"] == 0.0
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "Q?"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(decoded, image)
    assert body["seed"] == 0 and set(out.timings) == {"preprocess", "generate", "attempts"}


def test_length_http_error_and_unreachable(server):
    backend = load_backend("m", engine="openai", base_url=server.url, **FAST)
    server.reply("cut", finish="length")
    assert backend.generate([GenerationRequest([{"role": "user", "content": "hi"}])])[0].finish_reason == "length"
    for _ in range(backend.max_retries + 1):
        server.reply("model not loaded", status=503)
    with pytest.raises(MedlensError, match="HTTP 503"):
        backend.generate([GenerationRequest([{"role": "user", "content": "hi"}])])
    dead = load_backend("m", engine="openai", base_url="http://127.0.0.1:9/v1", timeout=5, **FAST)
    with pytest.raises(BackendUnavailableError, match="cannot reach"):
        dead.generate([GenerationRequest([{"role": "user", "content": "hi"}])])


def test_differential_with_a_served_reasoner(server, tmp_path, cli):
    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    server.reply('[{"finding": "liver lesion", "location": "right lobe"}]')
    server.reply('[{"rank": 1, "diagnosis": "cyst", "likelihood": "high", "supporting_findings": [1]}]')
    model = f"openai:medgemma@{server.url}"
    code, out, err = cli("ask", tmp_path / "ct", "--task", "differential", "--model", model, "--reasoner", model, "-q")
    assert code == 0, err
    result = json.loads(out)
    assert result["payload"]["differential"][0]["diagnosis"] == "cyst" and result["final_answer"] == "cyst"
    assert [s["engine"] for s in result["details"]["stages"]] == ["openai", "openai"]
    assert len(server.bodies) == 2 and isinstance(server.bodies[1]["messages"][0]["content"], str)  # text only


def test_unreachable_server_is_exit_code_2(tmp_path, cli):
    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    model = "openai:m@http://127.0.0.1:9/v1"
    code, _, err = cli("ask", tmp_path / "ct", "Q?", "--model", model, "--model-arg", "backoff=0.001", "-q")
    assert code == 2 and "cannot reach the model server" in err and "after 6 attempts" in err


def test_requests_overlap_up_to_concurrency(server):
    server.respond, server.delay = echo, lambda body: 0.2
    backend = load_backend(f"openai:m@{server.url}", concurrency=8)
    requests = [ask(f"q{i}") for i in range(16)]
    ticks: list[int] = []
    start = time.perf_counter()
    outputs = backend.generate(requests, progress=ticks.append)
    elapsed = time.perf_counter() - start
    assert [o.text for o in outputs] == [f"re: q{i}" for i in range(16)]
    assert server.max_in_flight == 8  # the server held eight at once, never more
    assert elapsed < 16 * 0.2 / 2, elapsed  # two rounds of 0.2 s and some overhead, not sixteen
    assert ticks == [1] * 16


def test_concurrency_one_sends_one_at_a_time(server):
    server.respond, server.delay = echo, lambda body: 0.05
    backend = load_backend(f"openai:m@{server.url}", concurrency=1)
    assert [o.text for o in backend.generate([ask(f"q{i}") for i in range(4)])] == [f"re: q{i}" for i in range(4)]
    assert server.max_in_flight == 1


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.005)


def test_order_kept_when_answers_arrive_out_of_order(server):
    def delay(body: dict) -> float:  # all six arrive, then q5 answers first, q4 once q5 is out, ... q0 last
        i = int(body["messages"][0]["content"][1:])
        wait_until(lambda: len(server.bodies) == 6)
        wait_until(lambda: i == 5 or f"q{i + 1}" in server.finished)
        return 0.0

    server.respond, server.delay = echo, delay
    backend = load_backend(f"openai:m@{server.url}", concurrency=6)
    outputs = backend.generate([ask(f"q{i}") for i in range(6)])
    assert server.finished == [f"q{i}" for i in reversed(range(6))]
    assert [o.text for o in outputs] == [f"re: q{i}" for i in range(6)]


def test_503_and_429_are_retried_to_success(server):
    server.reply("loading", status=503, headers={"Retry-After": "0"})
    server.reply("slow down", status=429, headers={"Retry-After": "0"})
    server.reply("server error", status=500)
    server.reply("ok")
    backend = load_backend(f"openai:m@{server.url}", **FAST)
    (out,) = backend.generate([ask("hi")])
    assert out.text == "ok" and out.timings["attempts"] == 4.0
    assert len(server.bodies) == 4 and all(body == server.bodies[0] for body in server.bodies)


def test_retry_after_is_honoured(server):
    server.reply("slow down", status=429, headers={"Retry-After": "1"})
    server.reply("ok")
    backend = load_backend(f"openai:m@{server.url}", **FAST)
    start = time.perf_counter()
    assert backend.generate([ask("hi")])[0].text == "ok"
    assert time.perf_counter() - start >= 1.0


def test_retry_after_forms():
    assert _retry_after_seconds("2") == 2.0 and _retry_after_seconds("0.5") == 0.5
    assert _retry_after_seconds(None) is None and _retry_after_seconds("soon") is None
    assert _retry_after_seconds("-3") == 0.0
    assert _retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past: now
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 25 < _retry_after_seconds(later) <= 30


def test_unreachable_after_retries_says_what_was_tried():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    backend = load_backend(f"openai:m@{url}", max_retries=2, **FAST)
    with pytest.raises(BackendUnavailableError) as caught:
        backend.generate([ask("hi")])
    message = str(caught.value)
    assert f"cannot reach the model server at {url}" in message
    assert "after 3 attempts over" in message and message.endswith(" s)")
    assert isinstance(caught.value, GenerationFailed) and caught.value.outputs == {}


def test_timeout_per_request(server):
    server.respond, server.delay = echo, lambda body: 1.0
    backend = load_backend(f"openai:m@{server.url}", timeout=0.2, max_retries=1, **FAST)
    start = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match=r"did not answer within 0\.2 s .*after 2 attempts"):
        backend.generate([ask("hi")])
    assert time.perf_counter() - start < 1.0
    assert len(server.bodies) == 2


VLLM_INPUT = "This model's maximum context length is 32768 tokens. However, your request has 40123 input tokens."
VLLM_OLD = (
    "This model's maximum context length is 32768 tokens. However, you requested 41123 tokens "
    "(40123 in the messages, 1000 in the completion). Please reduce the length of the messages or completion."
)
VLLM_MAX_TOKENS = (
    "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's maximum context length is "
    "32768 tokens and your request has 30000 input tokens (8000 > 32768 - 30000). None"
)
LLAMA_CPP = {
    "code": 400,
    "message": "request (40123 tokens) exceeds the available context size (32768 tokens), try increasing it",
    "type": "exceed_context_size_error",
    "n_prompt_tokens": 40123,
    "n_ctx": 32768,
}
TGI = "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 32768. Given: 40123 `inputs` tokens"


@pytest.mark.parametrize(
    ("status", "body", "prompt", "context"),
    [
        (400, {"error": {"message": VLLM_INPUT, "type": "BadRequestError", "code": 400}}, 40123, 32768),
        (400, {"object": "error", "message": VLLM_OLD, "type": "BadRequestError", "code": 400}, 40123, 32768),
        (400, {"error": {"message": VLLM_MAX_TOKENS, "type": "BadRequestError", "code": 400}}, 30000, 32768),
        (400, {"error": LLAMA_CPP}, 40123, 32768),
        (422, {"error": TGI, "error_type": "validation"}, 40123, 32768),
        (400, {"error": {"message": "too long", "code": "context_length_exceeded"}}, None, None),
    ],
)
def test_context_length_errors_of_each_server(server, status, body, prompt, context):
    server.replies.append((status, body, {}))
    backend = load_backend(f"openai:m@{server.url}", **FAST)
    with pytest.raises(ContextTooLongError) as caught:
        backend.generate([GenerationRequest([{"role": "user", "content": "long"}], max_new_tokens=8000)])
    error = caught.value
    assert (error.prompt_tokens, error.context_tokens, error.max_tokens) == (prompt, context, 8000)
    assert len(server.bodies) == 1  # not retried
    message = str(error)
    assert server.url in message and (prompt is None or f"{prompt:,}" in message)
    assert len(message) < 600


def test_context_error_names_the_request_and_keeps_the_others(server):
    def respond(body: dict) -> Reply:
        if body["messages"][0]["content"] == "long":
            return 400, {"error": {"message": VLLM_INPUT, "type": "BadRequestError", "code": 400}}, {}
        return echo(body)

    def delay(body: dict) -> float:  # the refusal once all four are in flight; the others after it
        if body["messages"][0]["content"] == "long":
            wait_until(lambda: len(server.bodies) == 4)
        else:
            wait_until(lambda: "long" in server.finished)
        return 0.0

    server.respond, server.delay = respond, delay
    backend = load_backend(f"openai:m@{server.url}", concurrency=4)
    with pytest.raises(GenerationFailed) as caught:
        backend.generate([ask("a"), ask("long"), ask("b"), ask("c")])
    failed = caught.value
    assert isinstance(failed, ContextTooLongError) and isinstance(failed, MedlensError)
    assert failed.index == 1 and failed.total == 4 and isinstance(failed.error, ContextTooLongError)
    assert {i: o.text for i, o in failed.outputs.items()} == {0: "re: a", 2: "re: b", 3: "re: c"}
    message = str(failed)
    assert "request index 1 of 4 failed" in message
    assert "the prompt is 40,123 tokens, more than the 32,768-token context" in message
    assert failed.prompt_tokens == 40123 and failed.__cause__ is failed.error


def test_a_failure_stops_the_call_and_keeps_what_completed(server):
    server.respond = lambda body: (
        (404, {"error": {"message": "The model `m` does not exist."}}, {})
        if body["messages"][0]["content"] == "q2"
        else echo(body)
    )
    backend = load_backend(f"openai:m@{server.url}", concurrency=1)
    with pytest.raises(ServerRefusedError, match="is model 'm' served there") as caught:
        backend.generate([ask(f"q{i}") for i in range(4)])
    assert isinstance(caught.value, GenerationFailed) and caught.value.index == 2
    assert sorted(caught.value.outputs) == [0, 1]
    assert len(server.bodies) == 3  # q3 never sent


def test_requests_retrying_are_abandoned_when_another_fails_for_good(server):
    server.respond = lambda body: (
        (400, {"error": {"message": "bad request"}}, {})
        if body["messages"][0]["content"] == "bad"
        else (503, {"error": "busy"}, {})
    )
    server.delay = lambda body: 0.1 if body["messages"][0]["content"] == "bad" else 0.0
    backend = load_backend(f"openai:m@{server.url}", concurrency=2, backoff=5.0)
    start = time.perf_counter()
    with pytest.raises(ServerRefusedError, match="HTTP 400: bad request") as caught:
        backend.generate([ask("busy"), ask("bad"), ask("never")])
    assert time.perf_counter() - start < 2.0  # the busy one's backoff was cut short
    assert caught.value.index == 1 and caught.value.outputs == {}
    assert "never" not in [body["messages"][0]["content"] for body in server.bodies]


def test_refusals_are_explained_and_not_retried(server):
    backend = load_backend(f"openai:m@{server.url}", **FAST)
    server.replies.append((401, {"error": {"message": "Invalid API key"}}, {}))
    with pytest.raises(ServerRefusedError, match=r"no API key was sent.*MEDLENS_OPENAI_API_KEY"):
        backend.generate([ask("hi")])
    server.replies.append((307, {}, {"Location": "https://elsewhere.example/v1/chat/completions"}))
    with pytest.raises(ServerRefusedError, match=r"redirect to https://elsewhere\.example.*not followed"):
        backend.generate([ask("hi")])
    server.replies.append((400, {"error": {"message": "At most 1 image(s) may be provided in one prompt."}}, {}))
    with pytest.raises(ServerRefusedError, match=re.escape("""--limit-mm-per-prompt '{"image": 85}'""")):
        backend.generate([ask("hi")])
    assert len(server.bodies) == 3


def test_api_key_is_sent(server, monkeypatch):
    monkeypatch.setenv("MEDLENS_OPENAI_API_KEY", "sk-env")
    server.respond = echo
    load_backend(f"openai:m@{server.url}", api_key="sk-test").generate([ask("hi")])
    load_backend(f"openai:m@{server.url}").generate([ask("hi")])
    assert [h.get("Authorization") for h in server.headers] == ["Bearer sk-test", "Bearer sk-env"]


def test_options_are_checked():
    with pytest.raises(MedlensError, match="concurrency must be a whole number >= 1"):
        load_backend("openai:m@http://127.0.0.1:9/v1", concurrency=0)
    with pytest.raises(MedlensError, match="timeout must be a number of seconds > 0"):
        load_backend("openai:m@http://127.0.0.1:9/v1", timeout="fast")
    with pytest.raises(MedlensError, match="is not an http"):
        load_backend("m", engine="openai", base_url="127.0.0.1:8000/v1")
    with pytest.raises(MedlensError, match="did you mean 'concurrency'"):
        load_backend("openai:m@http://127.0.0.1:9/v1", concurency=4)
    backend = load_backend("m", engine="openai", base_url="http://h:1/v1/chat/completions/")
    assert backend.base_url == "http://h:1/v1"


def test_generation_failed_keeps_its_type_and_pickles():
    output = GenerationOutput("yes", 3, 1, "stop")
    failed = GenerationFailed.wrap(BackendUnavailableError("server gone"), 1, {0: output}, 2)
    assert isinstance(failed, BackendUnavailableError) and isinstance(failed, GenerationFailed)
    assert str(failed) == "request index 1 of 2 failed (1 completed): server gone"
    again = pickle.loads(pickle.dumps(failed))
    assert type(again) is type(failed) and again.outputs == {0: output} and again.index == 1
    plain = GenerationFailed.wrap(MedlensError("odd"), 0, {}, 1)
    assert type(plain) is GenerationFailed and str(plain) == "odd"


def test_against_llama_cpp_server(llamacpp_server):
    """A real OpenAI-compatible server (llama-cpp-python with gemma-3-270m, context 2048): concurrent answers
    equal sequential ones, and its context-length refusal becomes a ContextTooLongError with the counts."""
    requests = [GenerationRequest([{"role": "user", "content": f"Count to {i}."}], max_new_tokens=3) for i in range(2)]
    together = load_backend(f"openai:gemma-3-270m@{llamacpp_server}", concurrency=2).generate(requests)
    alone = load_backend(f"openai:gemma-3-270m@{llamacpp_server}", concurrency=1).generate(requests)
    assert [(o.text, o.prompt_tokens, o.completion_tokens) for o in together] == [
        (o.text, o.prompt_tokens, o.completion_tokens) for o in alone
    ]
    assert all(o.completion_tokens > 0 for o in together)
    too_long = GenerationRequest([{"role": "user", "content": "word " * 2100}], max_new_tokens=3)
    with pytest.raises(ContextTooLongError) as caught:
        load_backend(f"openai:gemma-3-270m@{llamacpp_server}").generate([requests[0], too_long])
    assert caught.value.index == 1 and sorted(caught.value.outputs) == [0]
    assert caught.value.context_tokens == 2048 and caught.value.prompt_tokens > 2048
