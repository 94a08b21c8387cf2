"""A bounded load run on loopback: 200 analyze requests at concurrency 16 on test-tiny, no errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from serve_load import run_load

pytest_plugins = ["medlens_server"]


def _radiograph(path: Path) -> Path:
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256]
    Image.fromarray(((x * 3 + y * 5) % 256).astype(np.uint8)).save(path)
    return path


def test_200_requests_at_concurrency_16_without_errors(medlens_server, tmp_path: Path) -> None:
    result = run_load(medlens_server.url, _radiograph(tmp_path / "cxr.png"), n=200, concurrency=16, deadline_s=400)
    assert not result.errors, result.errors[:3]
    assert len(result.latencies) == 200
    assert result.quantile(0.5) <= result.quantile(0.95) <= max(result.latencies)
    (tmp_path / "latency.json").write_text(json.dumps({"summary": result.summary(), "latencies": result.latencies}))
    print(result.summary())
