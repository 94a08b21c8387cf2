"""What a remote backend receives: a recording OpenAI-compatible server on loopback, made "remote" with
``MEDLENS_TREAT_AS_REMOTE=1`` or ``--model-arg remote=true``, gets no PHI canary in any request body; a local
one (loopback, the default) gets the text as it is, unless ``--deid``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from test_text_deid import CANARIES, canary_hits, write_corpus

from medlens.backends import load_backend
from medlens.backends.openai_backend import is_remote_url
from medlens.tasks import TaskOptions, get_task
from medlens.tasks.runner import run_task

QUESTION = "Does Mr. Aurelio Quibbleston (MRN QX-77881234) still have diabetes as of 2023-04-11?"
#: no cue before the name: only the names found in the inputs (record fields, DICOM headers) catch it
BARE_QUESTION = "Is Aurelio Quibbleston's chest normal? Compare with 2023-04-11."


class Recorder:
    """Answers every chat completion with "yes" and keeps the raw request bodies."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                outer.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                data = json.dumps(
                    {
                        "choices": [{"message": {"role": "assistant", "content": "yes"}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 10, "completion_tokens": 1},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()

    def hits(self) -> list[str]:
        blob = b"".join(self.bodies).decode().lower()
        # request bodies are JSON: compare with the canaries as JSON strings write them
        return [k for k, v in CANARIES.items() if json.dumps(v)[1:-1].lower() in blob]


@pytest.fixture
def recorder():
    rec = Recorder()
    yield rec
    rec.httpd.shutdown()
    rec.httpd.server_close()


@pytest.mark.parametrize("source", ["bundle.json", "notes.txt", "."])
def test_remote_backend_gets_no_canary(recorder, tmp_path: Path, cli, monkeypatch, source: str) -> None:
    write_corpus(tmp_path / "record")
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    model = f"openai:medgemma@{recorder.url}"
    code, out, err = cli("ask", tmp_path / "record" / source, QUESTION, "--task", "ehr-qa", "--model", model, "-q")
    assert code == 0, err
    assert len(recorder.bodies) == 1
    assert recorder.hits() == []
    result = json.loads(out)
    assert any("de-identified" in w for w in result["warnings"])
    assert result["details"]["deid_replacements"] > 0


def test_local_backend_gets_the_text_unless_asked(recorder, tmp_path: Path, cli) -> None:
    bundle, _ = write_corpus(tmp_path)
    model = f"openai:medgemma@{recorder.url}"
    code, out, err = cli("ask", bundle, QUESTION, "--task", "ehr-qa", "--model", model, "-q")
    assert code == 0, err
    assert {"given", "family", "mrn", "visit"} <= set(recorder.hits())  # the canaries do reach a local server
    assert not any("de-identified" in w for w in json.loads(out)["warnings"])
    recorder.bodies.clear()
    code, _, err = cli("ask", bundle, QUESTION, "--task", "ehr-qa", "--model", model, "--deid", "-q")
    assert code == 0, err
    assert recorder.hits() == []


def test_no_deid_flag_sends_the_text_to_a_remote_backend(recorder, tmp_path: Path, cli, monkeypatch) -> None:
    bundle, _ = write_corpus(tmp_path)
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    model = f"openai:medgemma@{recorder.url}"
    code, _, err = cli("ask", bundle, QUESTION, "--task", "ehr-qa", "--model", model, "--no-deid", "-q")
    assert code == 0, err
    assert "given" in recorder.hits()  # the user's explicit choice


def test_remote_model_arg_and_explicit_off(recorder, tmp_path: Path) -> None:
    bundle, _ = write_corpus(tmp_path)
    task = get_task("ehr-qa")
    backend = load_backend(f"openai:medgemma@{recorder.url}", remote=True)
    assert backend.remote
    run_task(task, [bundle], QUESTION, backend)
    assert recorder.hits() == []
    recorder.bodies.clear()
    envelope = run_task(task, [bundle], QUESTION, backend, TaskOptions(deid=False))  # the caller's choice wins
    assert "given" in recorder.hits() and not any("de-identified" in w for w in envelope.warnings)


def test_image_task_question_scrubbed(recorder, tmp_path: Path, monkeypatch) -> None:
    """The patient's name from the DICOM header is removed from the question too."""
    import pydicom

    from medlens.demo.phantom import ct_phantom, write_ct_series

    hu, _ = ct_phantom(n_slices=4, size=32)
    write_ct_series(hu, tmp_path / "ct")
    for path in (tmp_path / "ct").rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.PatientName = f"{CANARIES['family']}^{CANARIES['given']}"
        ds.save_as(path, enforce_file_format=True)
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    backend = load_backend(f"openai:medgemma@{recorder.url}")
    envelope = run_task(get_task("qa"), [tmp_path / "ct"], BARE_QUESTION, backend)
    assert len(recorder.bodies) == 1 and recorder.hits() == []
    assert b"image_url" in recorder.bodies[0]  # the images still go
    assert any("de-identified" in w for w in envelope.warnings)


@pytest.mark.parametrize(
    ("url", "remote"),
    [
        ("http://127.0.0.1:8000/v1", False),
        ("http://127.0.0.2:9/v1", False),
        ("http://localhost:8000/v1", False),
        ("http://[::1]:8000/v1", False),
        ("http://10.1.2.3:8000/v1", True),
        ("https://api.example.org/v1", True),
    ],
)
def test_remote_means_not_loopback(url: str, remote: bool, monkeypatch) -> None:
    monkeypatch.delenv("MEDLENS_TREAT_AS_REMOTE", raising=False)
    assert is_remote_url(url) is remote
    monkeypatch.setenv("MEDLENS_TREAT_AS_REMOTE", "1")
    assert is_remote_url(url) is True


def test_eval_queries_for_a_remote_backend_are_scrubbed(tmp_path: Path) -> None:
    """``medlens eval`` builds its prompts itself: for a remote engine they are scrubbed before generating."""
    import warnings

    from medlens.eval.kinds import Query
    from medlens.eval.runner import _deidentify

    bundle, _ = write_corpus(tmp_path)
    text = f"Record of {CANARIES['given']} {CANARIES['family']}, MRN {CANARIES['mrn']}: is the HbA1c rising?"
    query = Query([{"role": "user", "content": [{"type": "text", "text": text}]}], [bundle])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _deidentify([query])
    sent = query.messages[0]["content"][0]["text"]
    assert canary_hits(sent) == [] and "HbA1c" in sent
    assert any("de-identified" in str(w.message) for w in caught)
