"""medlens serve jobs: submit, poll, succeed; cancel; delete; a restarted server keeps finished jobs and marks
the interrupted ones failed (SQLite under the data dir)."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from medlens.backends import Backend, GenerationOutput, GenerationRequest
from medlens.serve.app import create_app
from medlens.serve.jobs import INTERRUPTED
from medlens.serve.settings import ServeSettings


class GatedBackend(Backend):
    """Waits for ``gate`` (or ``limit`` seconds) before answering: a job stays running as long as a test wants."""

    engine = "fake"
    model_name = "gated"

    def __init__(self, limit: float = 10.0) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.limit = limit

    def generate(self, requests, progress=None, on_output=None):
        self.entered.set()
        self.gate.wait(self.limit)
        outputs = [GenerationOutput("Final Answer: no", 5, 2, "stop") for _ in requests]
        for index, output in enumerate(outputs):
            if on_output is not None:
                on_output(index, output)
        return outputs

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self.generate([request])[0]


def png_files(name: str = "cxr.png") -> list[tuple[str, tuple[str, bytes, str]]]:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48), dtype=np.uint8)).save(buffer, "PNG")
    return [("files", (name, buffer.getvalue(), "image/png"))]


def wait_for(client: TestClient, job_id: str, statuses: tuple[str, ...], seconds: float = 20.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']}")


def temp_dirs(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_submit_poll_succeed_list_and_delete(tiny_backend, tmp_path):
    app = create_app(ServeSettings(data_dir=tmp_path), backend=tiny_backend)
    with TestClient(app) as client:
        form = {"question": "Any effusion?", "return_images": "true", "options": json.dumps({"max_new_tokens": 3})}
        response = client.post("/v1/jobs", files=png_files(), data=form)
        assert response.status_code == 202, response.text
        made = response.json()
        assert made["status"] == "queued" and made["url"] == f"/v1/jobs/{made['id']}" and len(made["id"]) == 32
        job = wait_for(client, made["id"], ("succeeded", "failed"))
        assert job["status"] == "succeeded", job
        assert job["task"] == "qa" and job["error"] is None
        assert job["created"].endswith("Z") and job["started"] and job["finished"]
        assert job["progress"]["stage"] == "Generating" and job["progress"]["done"] == job["progress"]["total"] == 1
        result = job["result"]
        assert result["inputs"][0]["file"] == "cxr.png" and len(result["images"]) == 1
        assert result["images"][0]["label"] == "image 1" and result["completion_tokens"] <= 3
        second = client.post("/v1/jobs", files=png_files("b.png"), data={"question": "q"}).json()
        wait_for(client, second["id"], ("succeeded",))
        listed = client.get("/v1/jobs").json()["jobs"]
        assert [j["id"] for j in listed][:2] == [second["id"], made["id"]]
        assert all("result" not in j for j in listed)
        assert client.delete(f"/v1/jobs/{made['id']}").json() == {"id": made["id"], "status": "deleted"}
        assert client.get(f"/v1/jobs/{made['id']}").status_code == 404
        assert client.delete(f"/v1/jobs/{made['id']}").status_code == 404
        assert temp_dirs(tmp_path) == []


def test_a_failing_job_records_the_error_by_upload_name(tiny_backend, tmp_path):
    app = create_app(ServeSettings(data_dir=tmp_path), backend=tiny_backend)
    with TestClient(app) as client:
        files = [("files", ("scan/broken.dcm", b"not dicom", "application/dicom"))]
        job_id = client.post("/v1/jobs", files=files, data={"question": "q"}).json()["id"]
        job = wait_for(client, job_id, ("failed", "succeeded"))
        assert job["status"] == "failed" and job["result"] is None
        assert "scan/broken.dcm" in job["error"]["error"] and str(tmp_path) not in job["error"]["error"]
        assert job["error"]["type"] == "UnsupportedInputError"


def test_bad_form_is_refused_at_submit(tiny_backend, tmp_path):
    app = create_app(ServeSettings(data_dir=tmp_path), backend=tiny_backend)
    with TestClient(app) as client:
        response = client.post("/v1/jobs", files=png_files(), data={"question": "q", "options": '{"recipee": 1}'})
        assert response.status_code == 422 and "recipe" in response.json()["error"]
        assert client.get("/v1/jobs").json() == {"jobs": []}
        assert client.get("/v1/jobs/0123").status_code == 404


def test_cancel_a_running_job(tmp_path):
    backend = GatedBackend()
    app = create_app(ServeSettings(data_dir=tmp_path), backend=backend)
    with TestClient(app) as client:
        job_id = client.post("/v1/jobs", files=png_files(), data={"question": "q"}).json()["id"]
        assert backend.entered.wait(10)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert client.delete(f"/v1/jobs/{job_id}").json() == {"id": job_id, "status": "cancelled"}
        backend.gate.set()
        service = app.state.service
        assert _eventually(lambda: service.admission.active == 0 and temp_dirs(tmp_path) == [])
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "cancelled" and job["result"] is None and job["finished"]


def test_restart_keeps_finished_jobs_and_fails_interrupted_ones(tmp_path):
    backend = GatedBackend(limit=3.0)
    first = create_app(ServeSettings(data_dir=tmp_path), backend=backend)
    client = TestClient(first)
    backend.gate.set()
    done_id = client.post("/v1/jobs", files=png_files(), data={"question": "q"}).json()["id"]
    wait_for(client, done_id, ("succeeded",))
    backend.gate.clear()
    backend.entered.clear()
    running_id = client.post("/v1/jobs", files=png_files(), data={"question": "q"}).json()["id"]
    assert backend.entered.wait(10)
    # the server "stops"; a new one starts on the same data dir
    second = create_app(ServeSettings(data_dir=tmp_path), backend=GatedBackend())
    with TestClient(second) as again:
        interrupted = again.get(f"/v1/jobs/{running_id}").json()
        assert interrupted["status"] == "failed"
        assert interrupted["error"] == {"error": INTERRUPTED, "type": "Interrupted"}
        kept = again.get(f"/v1/jobs/{done_id}").json()
        assert kept["status"] == "succeeded" and kept["result"]["inputs"][0]["file"] == "cxr.png"
        backend.gate.set()  # the old server's run ends: it must not overwrite the record
        assert _eventually(lambda: first.state.service.admission.active == 0)
        assert again.get(f"/v1/jobs/{running_id}").json()["status"] == "failed"
    first.state.service.close()


def _eventually(condition, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return condition()
