"""DICOMweb input (dicomweb://SERVER/STUDY[/SERIES]) against a real Orthanc on loopback, and the config rules
that need no server: unconfigured names, inline secrets, malformed references."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_non_image, write_series
from orthanc import Orthanc, config, orthanc  # noqa: F401  (the fixtures)

from medlens.io import dicomweb
from medlens.io.dicomweb_config import (
    ENV,
    DicomwebConfigError,
    DicomwebError,
    ServerRefusedError,
    ServerUnavailableError,
    UnknownServerError,
    load_servers,
)

N_SLICES = 300
SAMPLED = 85  # medgemma-1.5 samples at most 85 slices


class Counter:
    """Counts the HTTP requests medlens's DICOMweb sessions send, by kind (wraps ``new_session``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, after_instance: object = None) -> None:
        self.urls: list[str] = []
        self.lock = threading.Lock()
        self.after_instance = after_instance
        original = dicomweb.new_session

        def counting(server):
            session = original(server)
            session.hooks["response"].append(self.hook)
            return session

        monkeypatch.setattr(dicomweb, "new_session", counting)

    def hook(self, response, *args, **kwargs):
        with self.lock:
            self.urls.append(response.request.url)
        if self.after_instance is not None and "/instances/" in response.request.url:
            self.after_instance(self.instances)  # type: ignore[operator]
        return response

    @property
    def instances(self) -> int:
        return sum("/instances/" in u and not u.endswith("/metadata") for u in self.urls)

    @property
    def metadata(self) -> int:
        return sum(u.endswith("/metadata") for u in self.urls)


@pytest.fixture(scope="module")
def ct_study(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """A synthetic 300-slice CT (plus an SR in the same study) stored in Orthanc; the local copy too."""
    folder = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(13)
    arrays = [rng.integers(0, 2000, (48, 40), dtype=np.uint16) for _ in range(N_SLICES)]
    order = rng.permutation(N_SLICES)  # files stored in shuffled order: geometry must come from metadata
    positions = [(0.0, 0.0, 2.5 * i) for i in range(N_SLICES)]
    files = write_series(
        folder / "ct",
        [arrays[i] for i in order],
        positions=[positions[i] for i in order],
        instance_numbers=[int(i) + 1 for i in order],
        slice_thickness=2.5,
    )
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    sr = write_non_image(folder / "sr.dcm", "SR")
    ds = pydicom.dcmread(sr)
    ds.StudyInstanceUID = first.StudyInstanceUID
    ds.save_as(sr)
    orthanc.upload([*files, sr])
    return folder / "ct", str(first.StudyInstanceUID), str(first.SeriesInstanceUID)


def test_prepare_retrieves_only_sampled_instances_and_matches_local(ct_study, config, monkeypatch, tmp_path):
    from medlens.prep import prepare_study

    local_dir, study, series = ct_study
    counter = Counter(monkeypatch)
    remote = prepare_study(f"dicomweb://orthanc/{study}")
    assert counter.instances == SAMPLED  # 85 of the 300 instances, each once
    assert counter.metadata == 1  # the SR series is listed by QIDO but never asked for metadata
    local = prepare_study(local_dir)
    assert len(remote.images) == len(local.images) == SAMPLED
    for a, b in zip(remote.images, local.images, strict=True):
        np.testing.assert_array_equal(a, b)
    assert [s.sop_instance_uid for s in remote.slices] == [s.sop_instance_uid for s in local.slices]
    assert remote.series_uid == series
    assert (remote.identity, remote.acquired, remote.modality) == (local.identity, local.acquired, local.modality)


def cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    from medlens.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out + captured.err


def test_cli_prepare_and_inspect(ct_study, config, tmp_path, monkeypatch, capsys):
    _, study, series = ct_study
    out = tmp_path / "out"
    other = tmp_path / "other.toml"
    other.write_text(config.read_text())
    monkeypatch.delenv(ENV)
    args = ["prepare", f"dicomweb://orthanc/{study}/{series}", "--out", str(out), "--dicomweb-config", str(other)]
    code, output = cli(args, capsys)
    assert code == 0, output
    assert len(list(out.glob("*.png"))) == SAMPLED
    code, output = cli(["inspect", f"dicomweb://orthanc/{study}"], capsys)
    assert code == 0, output
    assert "300 image(s) axial" in output and "[ok]" in output
    assert "not an image series" in output  # the SR
    assert study not in output and series not in output  # UIDs only as hashes


def test_unconfigured_server_is_refused_without_connecting(config, monkeypatch):
    def no_connection(*args, **kwargs):
        raise AssertionError("a connection was attempted")

    monkeypatch.setattr(socket, "create_connection", no_connection)
    monkeypatch.setattr(dicomweb, "new_session", no_connection)
    with pytest.raises(UnknownServerError, match=r"'pacs\.example\.org' is not configured.*orthanc"):
        dicomweb.read_dicomweb("dicomweb://pacs.example.org/1.2.3")


def test_cli_unconfigured_server_exits_2(config, capsys, tmp_path):
    code, output = cli(["prepare", "dicomweb://elsewhere/1.2.3", "--out", str(tmp_path / "x")], capsys)
    assert code == 2
    assert "not configured" in output and "Traceback" not in output and len(output.strip().splitlines()) == 1


def test_wrong_password_is_a_typed_error(ct_study, orthanc, tmp_path, monkeypatch):
    _, study, _ = ct_study
    path = tmp_path / "bad.toml"
    text = orthanc.config_toml("orthanc", password_file=tmp_path / "pw")
    (tmp_path / "pw").write_text("not-the-password\n")
    path.write_text(text)
    monkeypatch.setenv(ENV, str(path))
    with pytest.raises(ServerRefusedError, match=r"'orthanc' refused.*HTTP 401") as info:
        dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}")
    assert "not-the-password" not in str(info.value) and orthanc.password not in str(info.value)


def test_unknown_study_and_bad_reference(config):
    with pytest.raises(DicomwebError, match="orthanc"):
        dicomweb.read_dicomweb("dicomweb://orthanc/1.2.3.4.5.6.7")
    for bad in ("dicomweb://orthanc", "dicomweb://orthanc/not-a-uid", "dicomweb://orthanc/1.2/3.4/5.6"):
        with pytest.raises(DicomwebError, match="expected dicomweb://SERVER/STUDY_UID"):
            dicomweb.parse_ref(bad)
    assert dicomweb.parse_ref(Path("dicomweb://orthanc/1.2/3.4")) == dicomweb.DicomwebRef("orthanc", "1.2", "3.4")


def test_server_down_is_a_typed_error(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path / "down.toml"
    path.write_text(f'[servers.down]\nurl = "http://127.0.0.1:{port}/dicom-web"\n')
    monkeypatch.setenv(ENV, str(path))
    with pytest.raises(ServerUnavailableError, match="cannot reach DICOMweb server 'down'"):
        dicomweb.read_dicomweb("dicomweb://down/1.2.3")


def test_orthanc_stopped_mid_retrieval(ct_study, tmp_path, monkeypatch):
    """A second Orthanc holding the study, stopped after 20 instances: a typed error, no partial files in
    the cache, no output folder."""
    from medlens.prep import prepare_study, write_prepared

    local_dir, study, _ = ct_study
    server = Orthanc(tmp_path / "orthanc2").start()
    try:
        server.upload(sorted(local_dir.glob("*.dcm")))
        cache = tmp_path / "cache"
        path = tmp_path / "c.toml"
        path.write_text(server.config_toml("second", cache_dir=str(cache), parallel=4))
        monkeypatch.setenv(ENV, str(path))
        Counter(monkeypatch, after_instance=lambda n: server.stop() if n == 20 else None)
        out = tmp_path / "out"
        with pytest.raises(ServerUnavailableError, match="'second'"):
            write_prepared(prepare_study(f"dicomweb://second/{study}"), out)
    finally:
        server.stop()
    assert not out.exists()
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    names = [p.name for p in cache.iterdir()]
    assert 0 < len(names) < SAMPLED and all(n.endswith(".dcm") and not n.startswith(".") for n in names)
    import pydicom

    for p in cache.iterdir():  # every file left is a complete instance
        pydicom.dcmread(p).pixel_array  # noqa: B018


def test_store_round_trip(config, tmp_path, orthanc):
    import pydicom

    files = write_series(tmp_path / "s", [np.full((16, 16), v, np.uint16) for v in (10, 20, 30)])
    datasets = [pydicom.dcmread(f) for f in files]
    answer = dicomweb.store("orthanc", datasets)
    assert len(answer.ReferencedSOPSequence) == 3 and not answer.get("FailedSOPSequence")
    study = str(datasets[0].StudyInstanceUID)
    stack = dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}")
    assert len(stack) == 3
    np.testing.assert_array_equal(stack.load([2])[0], datasets[2].pixel_array.astype(np.float32) - 1024)


def test_config_rules(tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text('[servers.a]\nurl = "http://h/dw"\nauth = "basic"\nusername = "u"\npassword = "inline"\n')
    with pytest.raises(DicomwebConfigError, match="no secrets inline"):
        load_servers(path)
    path.write_text('[servers.a]\nurl = "http://u:p@h/dw"\n')
    with pytest.raises(DicomwebConfigError, match="credentials"):
        load_servers(path)
    path.write_text('[servers.a]\nurl = "http://h/dw"\nauth = "bearer"\ntoken_env = "MEDLENS_TEST_TOKEN"\n')
    monkeypatch.delenv("MEDLENS_TEST_TOKEN", raising=False)
    with pytest.raises(DicomwebConfigError, match="MEDLENS_TEST_TOKEN"):
        load_servers(path)
    monkeypatch.setenv("MEDLENS_TEST_TOKEN", "s3cret")
    server = load_servers(path)["a"]
    assert server.secret == "s3cret" and "s3cret" not in repr(server)
    session = dicomweb.new_session(server)
    assert session.headers["Authorization"] == "Bearer s3cret" and session.max_redirects == 0
    monkeypatch.setenv(ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(DicomwebConfigError, match="not found"):
        dicomweb.read_dicomweb("dicomweb://a/1.2")


def test_redirect_is_not_followed(tmp_path, monkeypatch):
    """A server answering with a redirect (to anywhere) is refused, the target never contacted."""
    import http.server

    hits: list[str] = []

    class Redirect(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/elsewhere")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        path = tmp_path / "r.toml"
        path.write_text(f'[servers.r]\nurl = "http://127.0.0.1:{httpd.server_port}/dicom-web"\n')
        monkeypatch.setenv(ENV, str(path))
        with pytest.raises(ServerRefusedError, match="redirect"):
            dicomweb.read_dicomweb("dicomweb://r/1.2.3")
    finally:
        httpd.shutdown()
    assert hits and not any(h.startswith("/elsewhere") for h in hits)


def test_garbage_answer_is_a_typed_error(tmp_path, monkeypatch):
    import http.server

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<html>not json</html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        path = tmp_path / "g.toml"
        path.write_text(f'[servers.g]\nurl = "http://127.0.0.1:{httpd.server_port}/dicom-web"\n')
        monkeypatch.setenv(ENV, str(path))
        with pytest.raises(DicomwebError, match=r"'g' sent an answer .* not valid DICOMweb"):
            dicomweb.read_dicomweb("dicomweb://g/1.2.3")
    finally:
        httpd.shutdown()


def test_private_temporary_cache(ct_study, config):
    _, study, _ = ct_study
    stack = dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}")
    stack.load([0, 1])
    folder = stack.keepalive.folder
    assert oct(folder.stat().st_mode & 0o777) == "0o700"
    assert len(list(folder.iterdir())) == 2
    assert all((p.stat().st_mode & 0o077) == 0 for p in folder.iterdir())
    assert os.access(folder, os.R_OK)


def test_ask_accepts_dicomweb(ct_study, config, monkeypatch, cli):
    """ask prepares a dicomweb:// input like a path (only the sampled instances fetched); the envelope names the
    reference, hashed as text; the CLI takes it as an input, never as a missing file or the question."""
    import json

    from medlens.api import ask

    _, study, _ = ct_study
    counter = Counter(monkeypatch)
    result = ask(f"dicomweb://orthanc/{study}", "What is shown?", "test-tiny")
    assert counter.instances == SAMPLED
    assert result["inputs"][0]["file"] == f"dicomweb://orthanc/{study}"
    assert len(result["inputs"][0]["sha256"]) == 64
    monkeypatch.delenv(ENV)
    code, out, err = cli("ask", f"dicomweb://orthanc/{study}", "What is shown?", "--dicomweb-config", config, "-q")
    assert code == 0, err
    assert json.loads(out)["n_images"] == SAMPLED


def test_whole_slide_series_goes_to_the_slide_reader(config, orthanc, tmp_path):
    """An SM series is not read as an image stack: the stack reader names the way (the slide recipe), the
    slide finder takes it, and an SM series without a pyramid is a typed error (tests/test_dicomweb_slide.py
    reads a real one)."""
    import pydicom

    from medlens.errors import CorruptFileError, UnsupportedInputError
    from medlens.io.slide import find_slide
    from medlens.prep import prepare_study

    files = write_series(tmp_path / "sm", [np.zeros((16, 16), np.uint16)], modality="SM")
    orthanc.upload(files)
    study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with pytest.raises(UnsupportedInputError, match="is a whole slide, read by the slide recipe"):
        dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}")
    assert find_slide(f"dicomweb://orthanc/{study}") is not None
    with pytest.raises(CorruptFileError, match=r"wsidicom cannot open it.*No level instances"):
        prepare_study(f"dicomweb://orthanc/{study}")


def test_persistent_cache_is_reused(ct_study, orthanc, tmp_path, monkeypatch):
    _, study, _ = ct_study
    path = tmp_path / "p.toml"
    path.write_text(orthanc.config_toml("orthanc", cache_dir=str(tmp_path / "cache")))
    monkeypatch.setenv(ENV, str(path))
    first = dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}").load([0, 150, 299])
    counter = Counter(monkeypatch)
    again = dicomweb.read_dicomweb(f"dicomweb://orthanc/{study}").load([0, 150, 299])
    assert counter.instances == 0 and counter.metadata == 1
    np.testing.assert_array_equal(first, again)


def test_single_part_framing():
    body = b"preamble\r\n--b1\r\nContent-Type: application/dicom\r\n\r\nDICOMBYTES\r\n--b1--\r\n"
    assert dicomweb.single_part(body, 'multipart/related; type="application/dicom"; boundary=b1') == b"DICOMBYTES"
    assert dicomweb.single_part(b"RAW", "application/dicom") == b"RAW"
    two = b"--b1\r\n\r\nA\r\n--b1\r\n\r\nB\r\n--b1--"
    for bad, ctype in ((two, "multipart/related; boundary=b1"), (body, "multipart/related"), (b"x", "text/html")):
        with pytest.raises(ValueError):
            dicomweb.single_part(bad, ctype)


def test_server_analyzes_a_dicomweb_study_by_server_name(ct_study, config, monkeypatch, tiny_backend, tmp_path):
    """POST /v1/analyze with a ``dicomweb`` source: no upload, only the sampled instances fetched; a name this
    machine does not configure (or a URL in its place) is a 400 before any connection."""
    import json

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from medlens.serve.app import create_app
    from medlens.serve.settings import ServeSettings

    _, study, _ = ct_study
    app = create_app(ServeSettings(model="test-tiny", data_dir=tmp_path / "serve"), tiny_backend)
    counter = Counter(monkeypatch)
    with TestClient(app) as client:
        source = {"dicomweb": {"server": "orthanc", "study": study}}
        fields = {"inputs": (None, json.dumps([source])), "question": (None, "What is shown?")}  # multipart, no file
        response = client.post("/v1/analyze", files=fields)
        assert response.status_code == 200, response.text
        assert response.json()["n_images"] == SAMPLED and counter.instances == SAMPLED
        assert response.json()["inputs"][0]["file"] == f"dicomweb://orthanc/{study}"
        for server in ("pacs", "http://127.0.0.1:1"):
            bad = {"dicomweb": {"server": server, "study": study}}
            response = client.post("/v1/analyze", files={"inputs": (None, json.dumps([bad]))})
            assert response.status_code == 400 and "not configured" in response.json()["error"], response.text
    assert counter.instances == SAMPLED  # the refused ones fetched nothing


def _text_values(dataset) -> list[str]:
    found = []
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            found.append(str(item.TextValue))
        found += _text_values(item)
    return found


COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_ask_stores_the_sr_back_in_the_study(ct_study, config, cli):
    """``ask dicomweb://... --store-sr orthanc``: the SR (built from the study's WADO-RS headers) is stored by
    STOW-RS in the same study, found again by QIDO, retrieved, and holds the question and the answer."""
    import json

    from medlens.io.dicomweb import connect
    from medlens.io.dicomweb_config import get_server

    _, study, _ = ct_study
    question = "Is there a pleural effusion?"
    code, out, err = cli("ask", f"dicomweb://orthanc/{study}", "-Q", question, "--store-sr", "orthanc", "-q")
    assert code == 0, err
    envelope = json.loads(out)
    client = connect(get_server("orthanc"))
    found = client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SR"})
    found = [f for f in found if f["00080016"]["Value"][0] == COMPREHENSIVE_3D_SR]  # the study has a text SR too
    assert len(found) == 1, found
    sop = found[0]["00080018"]["Value"][0]
    series = found[0]["0020000E"]["Value"][0]
    sr = client.retrieve_instance(study, series, sop)
    assert sr.StudyInstanceUID == study and sr.Modality == "SR"
    texts = _text_values(sr)
    assert question in texts and envelope["answer"] in texts
    assert any("research use only" in t.lower() for t in texts)
