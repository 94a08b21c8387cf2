"""medlens serve, secure by default: the key on every route but the open four, body caps answered before the
body is read, upload names and zip members checked, loopback unless a key is set."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from dicom_factory import write_series
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from medlens.serve.app import create_app
from medlens.serve.security import key_matches
from medlens.serve.settings import ServeSettings, ServeSettingsError, is_loopback
from medlens.serve.uploads import new_request_dir

KEY = "s3cret-key-for-tests"
AUTH = {"Authorization": f"Bearer {KEY}"}
OPEN = {("GET", "/health"), ("GET", "/ready"), ("GET", "/"), ("GET", "/static")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-security")


@pytest.fixture(scope="module")
def app(tiny_backend, data_dir):
    return create_app(
        ServeSettings(data_dir=data_dir, api_key=KEY, max_body_mb=1, max_files=5, max_new_tokens=8),
        backend=tiny_backend,
    )


@pytest.fixture(scope="module")
def client(app):
    with TestClient(app) as c:
        yield c


def temp_dirs(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def every_route(app) -> list[tuple[str, str]]:
    """(method, concrete path) of every route the app has, read from the app itself."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            found.append(("GET", route.path))
            continue
        path = re.sub(r"\{[^}]+\}", "0123abcd", route.path)
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                found.append((method, path))
    return found


def test_every_route_but_the_open_four_needs_the_key(app, client):
    routes = every_route(app)
    assert any(isinstance(r, APIRoute) and r.path == "/v1/analyze" for r in app.routes)
    assert set(routes) >= OPEN
    for method, path in routes:
        target = path + "/index.html" if path == "/static" else path
        response = client.request(method, target)
        if (method, path) in OPEN:
            assert response.status_code != 401, (method, path)
        else:
            assert response.status_code == 401, (method, path)
            assert response.json() == {"error": "missing or wrong API key", "type": "Unauthorized"}
            assert response.headers["www-authenticate"] == "Bearer"
            wrong = client.request(method, target, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, (method, path)
            assert client.request(method, target, headers=AUTH).status_code != 401, (method, path)
    assert client.get("/not/a/route").status_code == 401  # unknown paths too: nothing is open by accident


def test_key_matching():
    assert key_matches(f"Bearer {KEY}", KEY) and key_matches(f"bearer {KEY}", KEY)
    for header in (None, "", KEY, f"Basic {KEY}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer "):
        assert not key_matches(header, KEY)


def asgi_call(app, headers: dict[str, str], chunks, limit_calls: int = 100_000) -> tuple[int, bytes, int]:
    """Call the app directly; ``chunks`` is an iterator of body chunks (more_body until it ends). Returns
    the status, the body and how many times the app called ``receive``."""
    calls = 0
    sent: list[dict] = []

    async def receive():
        nonlocal calls
        calls += 1
        assert calls < limit_calls, "the app kept reading an oversized body"
        chunk = next(chunks, None)
        return {"type": "http.request", "body": chunk or b"", "more_body": chunk is not None}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/analyze",
        "raw_path": b"/v1/analyze",
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, calls


def test_content_length_over_the_cap_is_413_before_any_byte_is_read(app):
    def endless():
        while True:
            yield b"x" * 65536

    headers = {**AUTH, "content-type": "multipart/form-data; boundary=b", "content-length": str(10**12)}
    status, body, calls = asgi_call(app, headers, endless())
    assert status == 413 and json.loads(body)["type"] == "RequestTooLarge"
    assert calls == 0


def test_a_chunked_body_is_cut_off_once_past_the_cap(app, data_dir):
    boundary = "b0undary"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="big.dcm"\r\n\r\n').encode()

    def endless():
        yield head
        while True:
            yield b"\0" * 65536

    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    status, body, calls = asgi_call(app, headers, endless(), limit_calls=200)
    assert status == 413 and "1 MB" in json.loads(body)["error"]
    assert calls <= 2**20 // 65536 + 3  # stopped right after the limit, not at the end of the stream
    assert temp_dirs(data_dir) == []


def test_an_unauthenticated_body_is_never_read(app):
    status, _, calls = asgi_call(app, {"content-type": "multipart/form-data; boundary=b"}, iter([b"x"] * 10))
    assert status == 401 and calls == 0


def test_too_many_files(client, data_dir):
    files = [("files", (f"f{i}.dcm", b"x", "application/dicom")) for i in range(6)]
    response = client.post("/v1/analyze", files=files, data={"question": "q"}, headers=AUTH)
    assert response.status_code == 400 and "max_files" in response.json()["error"]
    assert temp_dirs(data_dir) == []


def zip_bytes(members: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for info, data in members:
            zf.writestr(info, data)
    return buffer.getvalue()


def post_zip(client, archive: bytes):
    files = [("files", ("study.zip", archive, "application/zip"))]
    return client.post("/v1/analyze", files=files, data={"question": "q"}, headers=AUTH)


def symlink_member(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


@pytest.fixture(scope="module")
def slice_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("slice")
    return write_series(folder, [np.zeros((32, 32), np.int16)])[0].read_bytes()


@pytest.mark.parametrize(
    ("member", "data", "reason"),
    [
        ("../escaped.dcm", b"x", "a path leaving the archive (..)"),
        ("/tmp/medlens-escaped-absolute.dcm", b"x", "an absolute path"),
        (symlink_member("link.dcm"), b"/etc/passwd", "a symbolic link"),
        ("bomb.dcm", b"\0" * (20 * 2**20), "expands"),
    ],
    ids=["dotdot", "absolute", "symlink", "bomb"],
)
def test_hostile_zip_members_are_refused_before_extraction(client, data_dir, slice_bytes, member, data, reason):
    archive = zip_bytes([("ok/0001.dcm", slice_bytes), (member, data)])
    assert len(archive) < 2**20  # the bomb is ~1000:1
    before = set(Path("/tmp").glob("medlens-escaped*")) | set(data_dir.parent.glob("escaped*"))
    response = client.post(
        "/v1/analyze",
        files=[("files", ("study.zip", archive, "application/zip"))],
        data={"question": "q"},
        headers=AUTH,
    )
    assert response.status_code == 400, response.text
    message = response.json()["error"]
    name = member.filename if isinstance(member, zipfile.ZipInfo) else member
    assert reason in message and repr(name) in message and message.startswith("study.zip:")
    after = set(Path("/tmp").glob("medlens-escaped*")) | set(data_dir.parent.glob("escaped*"))
    assert after == before
    assert temp_dirs(data_dir) == []


def test_a_safe_zip_is_analysed_and_named_by_its_upload(client, data_dir, slice_bytes):
    archive = zip_bytes([("series/0001.dcm", slice_bytes)])
    response = client.post(
        "/v1/analyze",
        files=[("files", ("study.zip", archive, "application/zip"))],
        data={"question": "q"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    assert response.json()["inputs"][0]["file"] == "study.zip"
    assert temp_dirs(data_dir) == []


def test_request_folders_are_private(tmp_path):
    settings = ServeSettings(data_dir=tmp_path / "d")
    folder = new_request_dir(settings)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(settings.tmp_dir).st_mode) == 0o700
    assert folder.parent == settings.tmp_dir


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.org", False)],
)  # fmt: skip
def test_loopback_detection(host, loopback):
    assert is_loopback(host) is loopback


def test_non_loopback_without_key_refuses_to_start(tmp_path):
    with pytest.raises(ServeSettingsError, match="without an API key"):
        create_app(ServeSettings(host="0.0.0.0", data_dir=tmp_path))
    create_app(ServeSettings(host="0.0.0.0", api_key="k", data_dir=tmp_path))  # with a key it may


def test_cli_serve_on_a_public_address_without_key_exits_2(cli, monkeypatch, tmp_path):
    monkeypatch.delenv("MEDLENS_API_KEY", raising=False)
    code, out, err = cli("serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "refusing to listen on 0.0.0.0 without an API key" in err
    empty = tmp_path / "key"
    empty.write_text("\n")
    code, _, err = cli("serve", "--host", "0.0.0.0", "--api-key-file", str(empty))
    assert code == 2 and "API key file is empty" in err


def test_the_decoded_pixel_budget_is_per_server(tiny_backend, tmp_path, slice_bytes):
    from medlens.io.limits import max_decoded_bytes

    app = create_app(ServeSettings(data_dir=tmp_path, max_decoded_mb=0.001), backend=tiny_backend)
    files = [("files", ("ct/0001.dcm", slice_bytes, "application/dicom"))]
    response = TestClient(app).post("/v1/analyze", files=files, data={"question": "q"})
    assert response.status_code == 400, response.text
    assert response.json()["type"] == "TooLargeError" and "ct/0001.dcm" in response.json()["error"]
    assert max_decoded_bytes() > 2**20  # the process-wide budget is untouched
