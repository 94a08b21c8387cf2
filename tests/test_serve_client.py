"""``medlens.client.Client`` and ``medlens ask --server`` against a real ``medlens serve`` (test-tiny).

The parts that need no server (SSE parsing, upload names, typed errors, an unreachable URL) run everywhere;
the rest use the ``medlens_server`` plugin and skip without the serve extra.
"""

from __future__ import annotations

import json
import pickle
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
from dicom_factory import write_series

from medlens.client import (
    Client,
    JobFailedError,
    JobNotFoundError,
    ServerBusyError,
    ServerError,
    ServerUnreachableError,
    UnauthorizedError,
    error_from_response,
    parse_sse,
    upload_parts,
)
from medlens.errors import CorruptFileError, InputError, MedlensError, NoImagesFoundError, NotFoundError

pytest.register_assert_rewrite("medlens_server")  # the plugin below, imported here first
from medlens_server import TEST_KEY, FixedLocalizeBackend, free_port, serve, serve_missing  # noqa: E402

pytest_plugins = ["medlens_server"]
httpx = pytest.importorskip("httpx")


def ct_folder(root: Path, name: str = "ct", slices: int = 6, seed: int = 0) -> Path:
    """A small synthetic CT series (no patient data)."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 2000, (48, 48), dtype=np.int16) for _ in range(slices)]
    folder = root / name
    folder.mkdir(parents=True)
    write_series(folder, arrays, slice_thickness=2.5)
    return folder


def cxr_png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (96, 128), dtype=np.uint8)).save(path)
    return path


# ------------------------------------------------------------------ no server needed


def test_sse_parser_joins_data_lines_skips_comments_and_handles_crlf():
    stream = [
        ": keep-alive",
        "event: stage",
        'data: {"stage": "prepare", "done": 0, "total": 1}',
        "",
        "event: text\r",
        'data: {"delta":\r',
        'data:  "a b"}',
        "",
        "",
        'data: {"x": 1}',
    ]
    events = list(parse_sse(iter(stream)))
    assert events == [
        ("stage", {"stage": "prepare", "done": 0, "total": 1}),
        ("text", {"delta": "a b"}),
        ("message", {"x": 1}),
    ]


def test_upload_parts_name_folder_files_relatively_and_one_input_per_path(tmp_path):
    folder = ct_folder(tmp_path, slices=2)
    (folder / "sub").mkdir()
    (folder / "sub" / "extra.dcm").write_bytes(b"x")
    png = cxr_png(tmp_path / "cxr.png")
    import contextlib

    with contextlib.ExitStack() as stack:
        parts, inputs = upload_parts([folder, png], stack)
        assert [p[1][0] for p in parts] == ["ct/0001.dcm", "ct/0002.dcm", "ct/sub/extra.dcm", "cxr.png"]
        assert inputs == [{"files": ["ct/0001.dcm", "ct/0002.dcm", "ct/sub/extra.dcm"]}, {"files": ["cxr.png"]}]
        assert parts[-1][1][1].read() == png.read_bytes()


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc/self/fd")
def test_upload_parts_hold_no_descriptor_until_read(tmp_path):
    import contextlib

    folder = tmp_path / "many"
    folder.mkdir()
    for n in range(40):
        (folder / f"{n:03d}.dcm").write_bytes(bytes([n]) * (1000 + n))
    before = len(list(Path("/proc/self/fd").iterdir()))
    with contextlib.ExitStack() as stack:
        parts, _ = upload_parts(folder, stack)
        assert len(list(Path("/proc/self/fd").iterdir())) == before
        lazy = parts[7][1][1]
        assert lazy.seek(0, 2) == 1007 and lazy.tell() == 1007
        lazy.seek(0)
        assert lazy.read(10) == bytes([7]) * 10  # open while being read
        assert lazy.read(-1) == bytes([7]) * 997 and lazy.tell() == 1007
        assert len(list(Path("/proc/self/fd").iterdir())) == before  # closed at its end


def test_upload_parts_prefix_names_that_two_inputs_share(tmp_path):
    import contextlib

    a = cxr_png((tmp_path / "a").mkdir() or tmp_path / "a" / "image.png")
    b = cxr_png((tmp_path / "b").mkdir() or tmp_path / "b" / "image.png", seed=1)
    with contextlib.ExitStack() as stack:
        parts, inputs = upload_parts([a, b], stack)
    assert inputs == [{"files": ["input1/image.png"]}, {"files": ["input2/image.png"]}]
    assert len({p[1][0] for p in parts}) == 2


def test_upload_parts_reject_missing_and_empty_inputs(tmp_path):
    import contextlib

    (tmp_path / "empty").mkdir()
    with contextlib.ExitStack() as stack:
        with pytest.raises(NotFoundError, match=r"nope\.dcm"):
            upload_parts(tmp_path / "nope.dcm", stack)
        with pytest.raises(NoImagesFoundError, match="empty"):
            upload_parts(tmp_path / "empty", stack)


def response(status: int, body: object, headers: dict | None = None):
    request = httpx.Request("POST", "http://127.0.0.1:9/v1/analyze")
    return httpx.Response(status, json=body, headers=headers, request=request)


def test_error_responses_become_typed_medlens_errors():
    error = error_from_response(response(400, {"error": "x.dcm: truncated pixel data", "type": "CorruptFileError"}))
    assert isinstance(error, ServerError) and isinstance(error, CorruptFileError) and isinstance(error, InputError)
    assert error.status == 400 and error.type == "CorruptFileError"
    assert "x.dcm: truncated pixel data" in str(error) and "HTTP 400" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error) and str(again) == str(error)

    busy = error_from_response(response(429, {"error": "queue full", "type": "QueueFull"}, {"Retry-After": "3"}))
    assert isinstance(busy, ServerBusyError) and busy.retry_after == 3.0
    unknown_type = error_from_response(response(401, {"error": "missing or wrong API key", "type": "Unauthorized"}))
    assert type(unknown_type) is UnauthorizedError
    not_json = error_from_response(httpx.Response(502, text="Bad gateway\n<html>", request=busy_request()))
    assert type(not_json) is ServerError and not_json.message == "Bad gateway"


def busy_request():
    return httpx.Request("GET", "http://127.0.0.1:9/health")


def test_an_unreachable_server_is_one_clear_error_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url, timeout=5) as client, pytest.raises(ServerUnreachableError, match=url.replace(".", r"\.")):
        client.health()
    with pytest.raises(MedlensError, match="http://"):
        Client("127.0.0.1:8080")


def test_ask_server_unreachable_is_one_line_and_exit_2(cli, tmp_path):
    png = cxr_png(tmp_path / "cxr.png")
    url = f"http://127.0.0.1:{free_port()}"
    code, out, err = cli("ask", "--server", url, str(png), "-Q", "Is there an effusion?")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and url in err and "Traceback" not in err


def test_ask_server_refuses_options_that_write_files_here(cli, tmp_path):
    png = cxr_png(tmp_path / "cxr.png")
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli("ask", "--server", url, str(png), "--task", "localize", "--overlay", str(tmp_path / "o.png"))
    assert code == 2 and "--overlay" in err and "--server" in err
    code, _, err = cli("ask", "--server", url, str(png), "-Q", "What?", "--html", str(tmp_path / "p.html"))
    assert code == 2 and "--html" in err


def test_ask_server_reads_the_key_file(cli, tmp_path):
    png = cxr_png(tmp_path / "cxr.png")
    url = f"http://127.0.0.1:{free_port()}"
    code, _, err = cli("ask", "--server", url, "--api-key-file", str(tmp_path / "none"), str(png), "-Q", "What?")
    assert code == 2 and "no such API key file" in err
    code, _, err = cli("ask", "--api-key-file", str(tmp_path / "none"), str(png), "-Q", "What?")
    assert code == 2 and "--api-key-file goes with --server" in err
    (tmp_path / "empty").write_text("\n")
    code, _, err = cli("ask", "--server", url, "--api-key-file", str(tmp_path / "empty"), str(png), "-Q", "What?")
    assert code == 2 and "empty" in err


# ------------------------------------------------------------------ against a real server


def check_envelope(envelope: dict, task: str, n_inputs: int) -> None:
    assert envelope["task"] == task
    assert envelope["model"] == "test-tiny" and envelope["untrained_test_model"] is True
    assert envelope["n_images"] >= 1 and "Research use only" in envelope["disclaimer"]
    assert len(envelope["inputs"]) == n_inputs
    for ref in envelope["inputs"]:
        assert "medlens-serve-" not in ref["file"] and not Path(ref["file"]).is_absolute()
        assert len(ref["sha256"]) == 64


def test_analyze_a_ct_folder_with_the_images_it_saw(medlens_server, tmp_path):
    folder = ct_folder(tmp_path, slices=5)
    with medlens_server.client() as client:
        envelope = client.analyze(folder, question="Is there a nodule?", return_images=True, max_new_tokens=8)
    check_envelope(envelope, "qa", 1)
    assert envelope["inputs"][0]["file"].startswith("ct")
    assert envelope["completion_tokens"] <= 8
    images = envelope["images"]
    assert len(images) == envelope["n_images"]
    assert all(i["data_url"].startswith("data:image/jpeg;base64,") and i["width"] > 0 for i in images)


def test_analyze_a_zip_and_a_bad_file(medlens_server, tmp_path):
    folder = ct_folder(tmp_path, slices=4, seed=3)
    archive = tmp_path / "study.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, f"series/{path.name}")
    with medlens_server.client() as client:
        envelope = client.analyze(archive, question="Describe.", max_new_tokens=4)
        check_envelope(envelope, "qa", 1)
        assert envelope["inputs"][0]["file"] == "study.zip"
        bad = tmp_path / "broken.dcm"
        bad.write_bytes(b"DICM but not really" * 10)
        with pytest.raises(ServerError) as caught:
            client.analyze(bad, question="What?")
    assert caught.value.status == 400 and "broken.dcm" in caught.value.message
    assert isinstance(caught.value, InputError) and caught.value.type  # the server's medlens error class, here too


def test_compare_two_inputs(medlens_server, tmp_path):
    prior, current = cxr_png(tmp_path / "prior.png"), cxr_png(tmp_path / "current.png", seed=2)
    with medlens_server.client() as client:
        envelope = client.analyze([prior, current], task="compare", max_new_tokens=8)
    check_envelope(envelope, "compare", 2)
    assert [i["file"] for i in envelope["inputs"]] == ["prior.png", "current.png"]


def test_submit_and_wait_give_the_same_envelope_as_a_job(medlens_server, tmp_path):
    png = cxr_png(tmp_path / "cxr.png")
    with medlens_server.client() as client:
        job_id = client.submit(png, question="Any effusion?", max_new_tokens=6)
        envelope = client.wait(job_id, timeout=60, poll=0.1)
        record = client.job(job_id)
        listed = client.jobs()
    check_envelope(envelope, "qa", 1)
    assert record["status"] == "succeeded" and record["result"]["answer"] == envelope["answer"]
    assert record["progress"]["done"] == record["progress"]["total"]
    assert job_id in [j["id"] for j in listed] and all("result" not in j for j in listed)


class BlockingBackend(FixedLocalizeBackend):
    """Generation waits until :attr:`release` is set (so that a job is surely still running)."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.started = threading.Event()

    def generate(self, requests, progress=None, on_output=None, on_text=None):  # type: ignore[no-untyped-def]
        self.started.set()
        self.release.wait(30)
        return super().generate(requests, progress, on_output, on_text)


def test_cancel_a_running_job_then_delete_it(tiny_backend, tmp_path):
    if reason := serve_missing():
        pytest.skip(reason)
    backend = BlockingBackend(tiny_backend)
    png = cxr_png(tmp_path / "cxr.png")
    with serve(backend) as running, running.client() as client:
        job_id = client.submit(png, question="Any effusion?", max_new_tokens=4)
        assert backend.started.wait(30)
        assert client.cancel(job_id) == {"id": job_id, "status": "cancelled"}
        backend.release.set()
        with pytest.raises(JobFailedError, match="cancelled") as caught:
            client.wait(job_id, timeout=30, poll=0.1)
        assert caught.value.job["status"] == "cancelled" and caught.value.job["result"] is None
        assert client.cancel(job_id)["status"] == "deleted"
        with pytest.raises(JobNotFoundError):
            client.job(job_id)


def test_stream_sends_stages_text_then_the_result(medlens_server, tmp_path):
    folder = ct_folder(tmp_path, slices=3, seed=5)
    with medlens_server.client() as client:
        events = list(client.stream(folder, question="Is there a nodule?", max_new_tokens=8))
    names = [name for name, _ in events]
    assert names[-1] == "result" and "stage" in names
    assert names.index("stage") < names.index("result")
    envelope = events[-1][1]
    check_envelope(envelope, "qa", 1)
    deltas = "".join(data["delta"] for name, data in events if name == "text")
    assert deltas and deltas.startswith("".join(envelope["raw_output"]))  # pieces may end with a stop marker

    seen: list[str] = []
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not DICOM at all" * 8)
    with medlens_server.client() as client:
        again = client.analyze(
            folder, question="Is there a nodule?", max_new_tokens=8, on_event=lambda n, d: seen.append(n)
        )
        with pytest.raises(InputError, match=r"broken\.dcm") as caught:
            client.analyze(bad, question="What?", on_event=lambda n, d: None)
    assert again["answer"] == envelope["answer"]  # greedy: the same answer over the stream
    assert set(seen) == {"stage", "text"}
    assert isinstance(caught.value, ServerError) and caught.value.status == 400


def test_wrong_key_is_401_and_the_right_one_works(keyed_server, tmp_path):
    with keyed_server.client(api_key="wrong-key") as client:
        assert client.health() == {"status": "ok"}  # no auth on /health
        with pytest.raises(UnauthorizedError) as caught:
            client.tasks()
        assert caught.value.status == 401 and "API key" in caught.value.message
    with Client(keyed_server.url) as anonymous, pytest.raises(UnauthorizedError):
        anonymous.models()
    with keyed_server.client() as client:
        assert "qa" in [t["name"] for t in client.tasks()]
        assert client.models()[0]["untrained_test_model"] is True


def test_ask_server_prints_the_envelope(cli, medlens_server, tmp_path):
    folder = ct_folder(tmp_path, slices=3, seed=7)
    code, out, err = cli(
        "ask", "--server", medlens_server.url, str(folder), "-Q", "Any nodule?", "--max-new-tokens", "5"
    )
    assert code == 0, err
    envelope = json.loads(out)
    check_envelope(envelope, "qa", 1)
    assert envelope["completion_tokens"] <= 5
    assert "medlens: Generating 1/1" in err.splitlines()  # the server's stages, streamed to stderr


def test_ask_server_with_a_key(cli, keyed_server, tmp_path, monkeypatch):
    png = cxr_png(tmp_path / "cxr.png")
    args = ("ask", "--server", keyed_server.url, str(png), "-Q", "Any effusion?", "--max-new-tokens", "4")
    monkeypatch.delenv("MEDLENS_API_KEY", raising=False)
    code, out, err = cli(*args)
    assert code == 2 and out == "" and "401" in err and err.count("\n") == 1
    key_file = tmp_path / "key"
    key_file.write_text(f"{TEST_KEY}\n# the first line is the key\n")
    code, out, err = cli(*args, "--api-key-file", str(key_file), "--quiet")  # quiet: no stream, one request
    assert code == 0 and err == "", err
    assert json.loads(out)["inputs"][0]["file"] == "cxr.png"
    monkeypatch.setenv("MEDLENS_API_KEY", TEST_KEY)
    code, out, err = cli(*args, "--task", "localize")
    assert code == 0, err
    assert [b["label"] for b in json.loads(out)["payload"]["boxes"]] == ["right lung", "left lung", "heart"]


def test_ask_server_de_identifies_dicom_before_it_leaves_the_machine(cli, medlens_server, tmp_path, monkeypatch):
    """A server on another machine (here: MEDLENS_TREAT_AS_REMOTE=1) gets the DICOM files de-identified
    (PS3.15 Basic Profile), documents are refused with the way out, and --no-deid sends the files as they are."""
    import pydicom

    import medlens.client

    study = ct_folder(tmp_path)
    for file in study.iterdir():
        ds = pydicom.dcmread(file)
        ds.PatientName, ds.PatientID = "Quibbleston^Aurelio", "QX-77881234"
        ds.save_as(file)
    sent: list[list[str]] = []
    analyze = medlens.client.Client.analyze

    def recording(self, paths, *args, **kwargs):
        sent.append([str(f) for p in paths for f in ([Path(p)] if Path(p).is_file() else Path(p).rglob("*.dcm"))])
        sent[-1] = [pydicom.dcmread(f, stop_before_pixels=True).PatientName for f in sent[-1]]
        return analyze(self, paths, *args, **kwargs)

    monkeypatch.setattr(medlens.client.Client, "analyze", recording)
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    code, _, err = cli("ask", "--server", medlens_server.url, study, "-Q", "Is there a nodule?")
    assert code == 0, err
    assert "de-identified the DICOM inputs" in err
    assert sent[-1] and all("Quibbleston" not in str(name) for name in sent[-1])
    code, _, err = cli("ask", "--server", medlens_server.url, study, "-Q", "Is there a nodule?", "--no-deid", "-q")
    assert code == 0, err
    assert all("Quibbleston" in str(name) for name in sent[-1])
    notes = tmp_path / "notes.txt"
    notes.write_text("Aurelio Quibbleston, MRN QX-77881234, has a cough.\n")
    code, _, err = cli("ask", "--server", medlens_server.url, notes, "--task", "ehr-qa", "-Q", "Why the cough?")
    assert code == 2 and "notes.txt" in err and "--no-deid" in err and err.count("\n") == 1, err
