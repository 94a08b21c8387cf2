"""Any OpenAI-compatible chat server (vLLM, llama.cpp's server, TGI, a hosted endpoint) over HTTP.

Images travel as lossless PNG data URLs. Only the standard library is used. Nothing here starts a
server; ``base_url`` points at one the user runs (``--base-url`` or ``MEDLENS_OPENAI_BASE_URL``).
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest
from medlens.chat import Messages
from medlens.errors import BackendUnavailableError, MedlensError

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


class OpenAIBackend(Backend):
    """Chat completions against ``{base_url}/chat/completions``; one request at a time, greedy by default."""

    engine = "openai"

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 600.0):
        self.model_name = model
        self.base_url = (base_url or os.environ.get("MEDLENS_OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("MEDLENS_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.timeout = timeout

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": to_openai_messages(request.messages),
            "max_tokens": request.max_new_tokens or self.default_max_new_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        start = time.perf_counter()
        reply = self._post("/chat/completions", body)
        try:
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise MedlensError(f"{self.base_url} answered without a completion: {json.dumps(reply)[:200]}") from None
        usage = reply.get("usage") or {}
        return GenerationOutput(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
            timings={"generate": time.perf_counter() - start},
        )

    def _post(self, route: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.base_url + route, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise MedlensError(f"{self.base_url} answered HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendUnavailableError(f"cannot reach the model server at {self.base_url} ({reason})") from None
        except json.JSONDecodeError:
            raise MedlensError(f"{self.base_url} did not answer with JSON") from None


def to_openai_messages(messages: Messages) -> list[dict[str, Any]]:
    """medlens chat messages -> OpenAI format; image arrays become PNG data URLs (lossless)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content or []:
            if part.get("type") == "image":
                parts.append({"type": "image_url", "image_url": {"url": png_data_url(part["image"])}})
            else:
                parts.append({"type": "text", "text": part.get("text", "")})
        out.append({"role": message["role"], "content": parts})
    return out


def png_data_url(image: Any) -> str:
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buffer = io.BytesIO()
    pil.save(buffer, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
