"""``medlens batch`` on a local two-CPU Ray: the twelve-study manifest gives, row for row, the envelopes a local
run gives (timings aside) and the same two typed errors; a rerun on Ray reuses the journal."""

from __future__ import annotations

import pytest
from batch_data import FAILING, FaultyDecoderStages, read_jsonl, without_timings, write_manifest
from ray_cluster import ray_local  # noqa: F401

from medlens.batch import run_batch
from medlens.pipeline import RaySettings


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("batch-ray"))


def test_ray_results_equal_local_results_row_for_row(ray_local, manifest):
    root = manifest.parent
    common = {"model": "test-tiny", "task": "qa", "stages_type": FaultyDecoderStages}
    local = run_batch(manifest, out_dir=root / "local", **common)
    on_ray = run_batch(manifest, out_dir=root / "ray", ray=RaySettings(), fmt="parquet", **common)
    assert (on_ray["runner"], on_ray["ok"], on_ray["failed"]) == ("ray", 10, 2)
    assert (local["ok"], local["failed"]) == (10, 2)
    here = read_jsonl(root / "local" / "results.jsonl")
    there = read_jsonl(root / "ray" / "results.jsonl")
    assert [r["row_id"] for r in there] == [r["row_id"] for r in here]
    for a, b in zip(here, there, strict=True):
        assert without_timings(b) == without_timings(a), a["row_id"]
    errors_here = {e["row_id"]: e for e in read_jsonl(root / "local" / "errors.jsonl")}
    errors_there = {e["row_id"]: e for e in read_jsonl(root / "ray" / "errors.jsonl")}
    assert sorted(errors_there) == sorted(errors_here) == sorted(FAILING)
    for row_id, error in errors_there.items():
        assert {k: error[k] for k in ("error", "stage", "path")} == {
            k: errors_here[row_id][k] for k in ("error", "stage", "path")
        }
    again = run_batch(manifest, out_dir=root / "ray", ray=RaySettings(), **common)
    assert (again["reused"], again["done"]) == (10, 0)
    assert read_jsonl(root / "ray" / "results.jsonl") == there
