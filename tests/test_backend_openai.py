"""The OpenAI-compatible HTTP backend against a small fake server on loopback."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from medlens.backends import GenerationRequest, load_backend
from medlens.errors import BackendUnavailableError, MedlensError


class FakeServer:
    """Answers /v1/chat/completions with queued replies; keeps the request bodies."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, dict]] = []
        self.bodies: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                outer.bodies.append(json.loads(self.rfile.read(length)))
                status, reply = outer.replies.pop(0)
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def reply(self, text: str, finish: str = "stop", status: int = 200) -> None:
        body = {
            "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 42, "completion_tokens": 7},
        }
        self.replies.append((status, body if status == 200 else {"error": text}))


@pytest.fixture
def server():
    fake = FakeServer()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


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


def test_length_http_error_and_unreachable(server):
    backend = load_backend("m", engine="openai", base_url=server.url)
    server.reply("cut", finish="length")
    assert backend.generate([GenerationRequest([{"role": "user", "content": "hi"}])])[0].finish_reason == "length"
    server.reply("model not loaded", status=503)
    with pytest.raises(MedlensError, match="HTTP 503"):
        backend.generate([GenerationRequest([{"role": "user", "content": "hi"}])])
    dead = load_backend("m", engine="openai", base_url="http://127.0.0.1:9/v1", timeout=5)
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
    assert len(server.bodies) == 2 and server.bodies[1]["messages"][0]["content"][0]["type"] == "text"


def test_unreachable_server_is_exit_code_2(tmp_path, cli):
    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=6, size=32)
    write_ct_series(hu, tmp_path / "ct")
    code, _, err = cli("ask", tmp_path / "ct", "Q?", "--model", "openai:m@http://127.0.0.1:9/v1", "-q")
    assert code == 2 and "cannot reach the model server" in err
