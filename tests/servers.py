"""Real model servers for the tests: llama-cpp-python's OpenAI-compatible server on loopback.

A pytest plugin: a test module asks for it with ``pytest_plugins = ["servers"]`` and gets the module-scoped
fixture ``llamacpp_server`` (the base URL, ``http://127.0.0.1:PORT/v1``, of ``python -m llama_cpp.server``
serving the built-in gemma-3-270m GGUF, started once per module; ``templated_server`` serves a copy with a
chat template). Without llama-cpp-python the fixtures skip with the reason. :class:`LlamaServer` works outside
pytest too (``bench/llamacpp_speed.py`` uses it).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

#: why tests that need llama.cpp are skipped
LLAMACPP_MISSING = "llama-cpp-python not installed: run make llamacpp"
#: what ``python -m llama_cpp.server`` imports besides ``llama_cpp`` (its ``[server]`` extra)
SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def llamacpp_missing(server: bool = False) -> str | None:
    """Why llama-cpp-python (with its server extra when ``server``) cannot be used here, else None."""
    modules = ("llama_cpp", *SERVER_MODULES) if server else ("llama_cpp",)
    absent = [name for name in modules if importlib.util.find_spec(name) is None]
    if not absent:
        return None
    return LLAMACPP_MISSING + ("" if absent == ["llama_cpp"] else f" (missing: {', '.join(absent)})")


def free_port() -> int:
    """A TCP port nobody listens on at the moment (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def gemma_270m_gguf() -> Path:
    """The built-in gemma-3-270m's GGUF file, built into ``$MEDLENS_CACHE`` on first use."""
    from medlens.models import resolve_model

    source = resolve_model("gemma-3-270m")
    assert source.gguf_file is not None
    return source.gguf_file


#: Gemma's turns as a jinja2 chat template: what ``medlens.backends.rendering.gemma_chat_prompt``
#: renders (a system message opens the first user turn, text parts trimmed and joined), in a GGUF file the way a
#: MedGemma GGUF carries its own template
GEMMA_TURNS_TEMPLATE = (
    "{%- macro text(message) -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] | trim }}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{{- bos_token -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = text(messages[0]) ~ '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{{ '<start_of_turn>' ~ ('model' if message['role'] == 'assistant' else message['role']) ~ '\\n' }}"
    "{{- (system if loop.first else '') ~ text(message) ~ '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)
_GGUF_STRING = 8


def with_chat_template(source: Path, target: Path, template: str = GEMMA_TURNS_TEMPLATE) -> Path:
    """A copy of the GGUF file ``source`` (without a chat template) that has ``tokenizer.chat_template``: the
    header, metadata and tensor table rewritten, the tensor data copied as they are. Seconds, where the
    ``gguf`` package's own rewriter parses the 262k-entry vocabulary for about a minute."""
    import mmap
    import shutil
    import struct

    from medlens.models.gguf import _Reader

    with source.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        reader = _Reader(buffer)
        magic, version, n_tensors, n_metadata = reader.unpack("4sIQQ")
        metadata_start = reader.pos
        keys = []
        for _ in range(n_metadata):
            keys.append(reader.string())
            (kind,) = reader.unpack("I")
            reader.value(kind)
        metadata_end = reader.pos
        for _ in range(n_tensors):
            reader.string()
            (n_dims,) = reader.unpack("I")
            reader.unpack(f"{n_dims}Q")
            reader.unpack("IQ")
        table_end = reader.pos
        if "tokenizer.chat_template" in keys or "general.alignment" in keys:
            raise ValueError(f"{source} already has a chat template or its own alignment")
        alignment = 32  # GGUF's default
        key, value = b"tokenizer.chat_template", template.encode()
        entry = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", _GGUF_STRING, len(value)) + value
        head = b"".join(
            (
                struct.pack("<4sIQQ", magic, version, n_tensors, n_metadata + 1),
                buffer[metadata_start:metadata_end],
                entry,
                buffer[metadata_end:table_end],
            )
        )
        data_start = -(-table_end // alignment) * alignment
        with target.open("wb") as out:
            out.write(head + bytes(-len(head) % alignment))
            with source.open("rb") as data:
                data.seek(data_start)
                shutil.copyfileobj(data, out, 16 << 20)
    return target


def _die_with_parent() -> None:
    """In the server's process (Linux): SIGTERM when the process that started it dies, so that a killed test
    run leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LlamaServer:
    """``python -m llama_cpp.server`` for one GGUF file on a free loopback port, as a context manager.

    ``chat_format="gemma"``: llama-cpp-python's Gemma turns. The gemma-3-270m GGUF (a base model) carries no
    chat template, and without one the server falls back to Llama 2's ``[INST]`` format. ``chat_format=None``:
    the server renders with the file's chat template (:func:`with_chat_template`).
    """

    def __init__(
        self,
        gguf: str | os.PathLike[str],
        alias: str = "gemma-3-270m",
        n_ctx: int = 2048,
        n_threads: int | None = None,
        chat_format: str | None = "gemma",
        startup_timeout: float = 120.0,
    ) -> None:
        self.gguf, self.alias, self.startup_timeout = Path(gguf), alias, startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        threads = str(n_threads or os.cpu_count() or 1)
        self.command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.gguf),
            "--model_alias",
            alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(n_ctx),
            "--n_threads",
            threads,
            "--n_threads_batch",
            threads,
            *(["--chat_format", chat_format] if chat_format else []),
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> str:
        """Start the server and wait until ``/v1/models`` answers; returns the base URL."""
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs; closed in close()
        self.process = subprocess.Popen(
            self.command, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}: {self.log_tail()}")
            if self.models() is not None:
                return self.url
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"llama_cpp.server did not answer within {self.startup_timeout:.0f} s: {self.log_tail()}")

    def models(self) -> dict[str, Any] | None:
        """The ``/v1/models`` answer, or None while the server does not answer."""
        try:
            with urllib.request.urlopen(self.url + "/models", timeout=2) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
            return None

    def post(self, route: str, body: dict[str, Any], timeout: float = 300.0) -> dict[str, Any]:
        """POST ``body`` as JSON to ``{url}{route}``: for requests with fields the OpenAI backend does not send."""
        request = urllib.request.Request(
            self.url + route, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def log_tail(self, size: int = 2000) -> str:
        """The last ``size`` characters of the server's output."""
        if self._log is None or self._log.closed:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")[-size:]

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def close(self) -> None:
        """Stop the server and drop its log."""
        self.stop()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="module")
def templated_gguf() -> Iterator[Path]:
    """gemma-3-270m's GGUF with :data:`GEMMA_TURNS_TEMPLATE` as its chat template (as MedGemma GGUFs carry one);
    the 250 MB copy is deleted after the module."""
    with tempfile.TemporaryDirectory(prefix="medlens-templated-") as folder:
        yield with_chat_template(gemma_270m_gguf(), Path(folder) / "gemma-3-270m-chat.gguf")


@pytest.fixture(scope="module")
def llamacpp_server_process() -> Iterator[LlamaServer]:
    """The running :class:`LlamaServer` for gemma-3-270m (started once per test module that uses it)."""
    reason = llamacpp_missing(server=True)
    if reason:
        pytest.skip(reason)
    with LlamaServer(gemma_270m_gguf()) as server:
        yield server


@pytest.fixture(scope="module")
def llamacpp_server(llamacpp_server_process: LlamaServer) -> str:
    """Base URL (``http://127.0.0.1:PORT/v1``) of llama.cpp's server with gemma-3-270m."""
    return llamacpp_server_process.url


@pytest.fixture(scope="module")
def templated_server(templated_gguf: Path) -> Iterator[LlamaServer]:
    """llama.cpp's server with :func:`templated_gguf`, rendering prompts from the file's chat template."""
    reason = llamacpp_missing(server=True)
    if reason:
        pytest.skip(reason)
    with LlamaServer(templated_gguf, chat_format=None) as server:
        yield server
