"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis): no input gets a 5xx.

Every operation in ``/openapi.json`` gets a bounded number of generated requests (random form fields, files,
job ids, ...), sent in-process to the app with a valid API key, so that the requests reach the handlers instead
of stopping at the 401. A 5xx is a failure, and so is an error answered without medlens's error body.
(schemathesis's own pytest plugin does not run under pytest 9 yet, so its strategies are driven by hypothesis
directly, one test per operation.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
from hypothesis import HealthCheck, given, settings  # noqa: E402

KEY = "schema-key-0123456789"
#: generated requests per operation (bounded: the suite runs on 2 cores)
EXAMPLES = 12


@pytest.fixture(scope="module")
def api_schema(tiny_backend, tmp_path_factory: pytest.TempPathFactory):
    from medlens.serve.app import create_app
    from medlens.serve.settings import ServeSettings

    data_dir: Path = tmp_path_factory.mktemp("schema-serve")
    app = create_app(ServeSettings(model=tiny_backend.model_name, api_key=KEY, data_dir=data_dir), tiny_backend)
    return schemathesis.openapi.from_asgi("/openapi.json", app, headers={"Authorization": f"Bearer {KEY}"})


def test_the_schema_lists_the_api(api_schema) -> None:
    labels = {op.ok().label for op in api_schema.get_all_operations()}
    for expected in ("POST /v1/analyze", "POST /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/jobs/{job_id}"):
        assert any(label.split("{")[0] == expected.split("{")[0] for label in labels), (expected, labels)


def test_no_generated_request_gets_a_server_error(api_schema) -> None:
    checked = []
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def run(case) -> None:
            response = case.call(headers={"Authorization": f"Bearer {KEY}"})
            where = (case.method, case.formatted_path, response.status_code, response.text[:300])
            assert response.status_code < 500, where
            if response.status_code >= 400 and "json" in response.headers.get("content-type", ""):
                body = response.json()
                assert "error" in body or "detail" in body, where

        run()
        checked.append(operation.label)
    assert len(checked) >= 8, checked
