"""medlens serve: the routes of the API contract, in process, with test-tiny (docs/serve.md)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
from dicom_factory import write_series
from fastapi.testclient import TestClient

from medlens.serve.app import create_app
from medlens.serve.settings import ServeSettings


def ct_parts(folder: Path, n: int = 4, prefix: str = "series1") -> list[tuple[str, tuple[str, bytes, str]]]:
    """A synthetic CT series as multipart file parts named ``prefix/0001.dcm`` ..."""
    arrays = [np.full((48, 48), 40 * i, np.int16) + np.arange(48, dtype=np.int16) for i in range(n)]
    paths = write_series(folder, arrays)
    return [("files", (f"{prefix}/{p.name}", p.read_bytes(), "application/dicom")) for p in paths]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-api")


@pytest.fixture(scope="module")
def client(tiny_backend, data_dir):
    app = create_app(ServeSettings(data_dir=data_dir, max_new_tokens=64), backend=tiny_backend)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    return ct_parts(tmp_path_factory.mktemp("ct"))


def temp_dirs(data_dir: Path) -> list[Path]:
    tmp = data_dir / "tmp"
    return list(tmp.iterdir()) if tmp.exists() else []


def test_health_ready_models_tasks(client):
    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").json() == {"status": "ready", "model": "test-tiny"}
    models = client.get("/v1/models").json()["models"]
    assert models == [{"id": "test-tiny", "engine": "transformers", "untrained_test_model": True}]
    tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
    assert tasks["qa"]["needs_question"] is True and tasks["report"]["needs_question"] is False
    assert tasks["compare"]["min_inputs"] == 2
    assert [o["name"] for o in tasks["lab-extract"]["options"]] == ["dpi"]
    assert tasks["localize"]["options"] == []  # overlay writes a server path: not offered over HTTP


def test_analyze_returns_the_envelope_with_upload_names_and_images(client, ct, data_dir):
    form = {"question": "Is there a fracture?", "return_images": "true", "options": json.dumps({"max_new_tokens": 5})}
    response = client.post("/v1/analyze", files=ct, data=form)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["task"] == "qa" and result["untrained_test_model"] is True
    assert result["inputs"][0]["file"] == "series1"
    assert len(result["inputs"][0]["sha256"]) == 64
    assert result["completion_tokens"] <= 5 and result["disclaimer"].startswith("Research use only")
    assert result["request_id"] == response.headers["x-request-id"]
    assert str(data_dir) not in response.text
    images = result["images"]
    assert len(images) == result["n_images"] == 4
    assert [i["label"] for i in images] == [f"slice {n} of 4" for n in range(1, 5)]
    from PIL import Image

    head, data = images[0]["data_url"].split(",", 1)
    assert head == "data:image/jpeg;base64"
    picture = Image.open(io.BytesIO(base64.b64decode(data)))
    assert picture.format == "JPEG" and picture.size == (images[0]["width"], images[0]["height"])
    assert temp_dirs(data_dir) == []


def test_analyze_without_images_and_a_single_file(client, ct):
    response = client.post("/v1/analyze", files=ct[:1], data={"question": "What is this?"})
    assert response.status_code == 200, response.text
    result = response.json()
    assert "images" not in result
    assert result["inputs"][0]["file"] == "series1/0001.dcm"


def png_part(name: str, seed: int) -> tuple[str, tuple[str, bytes, str]]:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return ("files", (name, buffer.getvalue(), "image/png"))


def test_inputs_name_uploaded_files_one_input_each(client):
    files = [png_part("old/prior.png", 1), png_part("new/current.png", 2)]
    inputs = [{"files": ["old/prior.png"]}, {"files": ["new/current.png"]}]
    form = {"task": "compare", "inputs": json.dumps(inputs), "options": json.dumps({"allow_different_patients": True})}
    response = client.post("/v1/analyze", files=files, data=form)
    assert response.status_code == 200, response.text
    assert [i["file"] for i in response.json()["inputs"]] == ["old/prior.png", "new/current.png"]


def test_an_input_of_several_names_is_a_folder_of_them(client, tmp_path):
    first = ct_parts(tmp_path / "a", n=3, prefix="one")
    second = ct_parts(tmp_path / "b", n=5, prefix="two")
    inputs = [{"files": [p[1][0] for p in second]}]
    form = {"question": "q", "inputs": json.dumps(inputs), "options": json.dumps({"max_new_tokens": 2})}
    response = client.post("/v1/analyze", files=first + second, data=form)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["inputs"][0]["file"] == "two" and result["n_images"] == 5


@pytest.mark.parametrize(
    ("form", "status", "needle"),
    [
        ({"options": json.dumps({"max_new_tokenz": 3})}, 422, "did you mean 'max_new_tokens'"),
        ({"options": json.dumps({"overlay": "/etc/x.png"})}, 422, "'overlay' cannot be set over HTTP"),
        ({"options": json.dumps({"max_new_tokens": 100000})}, 422, "server's cap"),
        ({"options": json.dumps({"thinking": "maybe"})}, 422, "'thinking'"),
        ({"options": "[1]"}, 422, "JSON object"),
        ({"options": json.dumps({"slide": {"workers": 64}})}, 422, "'workers' cannot be set over HTTP"),
        ({"options": json.dumps({"slide": {"max_patchez": 3}})}, 422, "did you mean 'max_patches'"),
        ({"options": json.dumps({"slide": {"max_patches": "many"}})}, 422, "option 'slide'"),
        ({"task": "qaa"}, 422, "qa"),
        ({"return_images": "perhaps"}, 422, "return_images"),
        ({"inputs": json.dumps([{"files": ["nope.dcm"]}])}, 400, "'nope.dcm', which was not uploaded"),
        ({"inputs": json.dumps([{"files": ["a"], "dicomweb": {}}])}, 422, "exactly one source"),
        ({"inputs": json.dumps([{"dicomweb": {"server": "pacs", "study": "1", "series": "2"}}])}, 400, "pacs"),
    ],
)
def test_bad_fields_name_the_problem(client, ct, form, status, needle):
    response = client.post("/v1/analyze", files=ct[:1], data={"question": "q", **form})
    assert response.status_code == status, response.text
    body = response.json()
    assert needle in body["error"] and set(body) == {"error", "type"}


def test_unknown_form_field_and_missing_question(client, ct):
    response = client.post("/v1/analyze", files=ct[:1], data={"questoin": "q"})
    assert response.status_code == 422 and "did you mean 'question'" in response.json()["error"]
    response = client.post("/v1/analyze", files=ct[:1])
    assert response.status_code == 400 and "needs a question" in response.json()["error"]
    response = client.post("/v1/analyze", files=[("question", ("q.txt", b"x", "text/plain"))])
    assert response.status_code == 422 and "cannot hold a file" in response.json()["error"]


def test_unreadable_file_is_a_400_naming_the_upload_not_the_server_path(client, data_dir):
    files = [("files", ("study/broken.dcm", b"not a dicom file at all", "application/dicom"))]
    response = client.post("/v1/analyze", files=files, data={"question": "q"})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "UnsupportedInputError" and "broken.dcm" in body["error"]
    assert str(data_dir) not in body["error"] and "/tmp" not in body["error"]
    assert temp_dirs(data_dir) == []


@pytest.mark.parametrize("name", ["../up.dcm", "/etc/passwd", "a\\b.dcm", "x/../../y.dcm"])
def test_bad_part_names_are_refused(client, name, data_dir):
    response = client.post("/v1/analyze", files=[("files", (name, b"x", "application/dicom"))], data={"question": "q"})
    assert response.status_code == 400 and response.json()["type"] == "UploadError"
    assert temp_dirs(data_dir) == []


def test_stream_events_in_order(client, ct):
    form = {"question": "Describe it.", "options": json.dumps({"max_new_tokens": 4})}
    with client.stream("POST", "/v1/analyze/stream", files=ct, data=form) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join(response.iter_text())
    events = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    names = [e for e, _ in events]
    assert names[-1] == "result" and names.count("result") == 1
    assert "stage" in names and names.index("stage") < names.index("text") < names.index("result")
    result = events[-1][1]
    from medlens.backends.rendering import clean_completion

    assert clean_completion("".join(d["delta"] for e, d in events if e == "text")) == result["raw_output"][0]
    assert result["inputs"][0]["file"] == "series1"


def test_stream_error_event(client):
    files = [("files", ("bad.dcm", b"garbage", "application/dicom"))]
    with client.stream("POST", "/v1/analyze/stream", files=files, data={"question": "q"}) as response:
        text = "".join(response.iter_text())
    assert text.startswith("event: ")
    last = text.strip().split("\n\n")[-1]
    assert last.startswith("event: error")
    data = json.loads(last.split("data: ", 1)[1])
    assert data["status"] == 400 and "bad.dcm" in data["error"]


def test_metrics_count_requests_tokens_and_batches(client, ct):
    client.post("/v1/analyze", files=ct[:1], data={"question": "q", "options": json.dumps({"max_new_tokens": 3})})
    text = client.get("/metrics").text
    assert 'medlens_requests_total{route="/v1/analyze",status="200"}' in text
    assert "medlens_request_seconds_bucket" in text and "medlens_queue_depth 0.0" in text
    tokens = next(line for line in text.splitlines() if line.startswith("medlens_generated_tokens_total"))
    assert float(tokens.split()[-1]) > 0


def test_openapi_documents_the_multipart_form(client):
    schema = client.get("/openapi.json").json()
    form = schema["paths"]["/v1/analyze"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert {"files", "inputs", "task", "question", "options", "return_images"} <= set(form["properties"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/analyze/stream", "/metrics"} <= set(schema["paths"])


def test_not_ready_until_the_model_is_loaded(tmp_path):
    app = create_app(ServeSettings(data_dir=tmp_path))  # no lifespan here: nothing loads
    c = TestClient(app)
    assert c.get("/ready").status_code == 503
    response = c.post("/v1/analyze", files=[("files", ("a.dcm", b"x", "x"))], data={"question": "q"})
    assert response.status_code == 503 and response.json()["type"] == "NotReady"
    assert c.get("/health").status_code == 200


def test_the_app_loads_its_model_at_start_up_and_can_start_again(tmp_path, ct):
    import time

    app = create_app(ServeSettings(data_dir=tmp_path, max_new_tokens=4))
    for _ in range(2):  # start-up, shutdown, start-up (test clients and reloaders do this)
        with TestClient(app) as c:
            end = time.monotonic() + 60
            while c.get("/ready").status_code == 503:
                assert time.monotonic() < end, c.get("/ready").json()
                time.sleep(0.1)
            assert c.get("/ready").json() == {"status": "ready", "model": "test-tiny"}
            response = c.post("/v1/analyze", files=ct[:1], data={"question": "q"})
            assert response.status_code == 200, response.text
    app.state.service.close()
