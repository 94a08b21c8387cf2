"""The Ray runner on a private two-CPU Ray (fixture ``ray_local``): one run of test-tiny over rows that fail
in every stage, one whose preparation and one whose replica are killed with SIGKILL mid-run, and one whose
preparation aborts its process every time. Its outcomes equal the local runner's, row for row."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_stages import ToyStages, toy_units
from ray_cluster import ray_local  # noqa: F401

from medlens.pipeline import BackendSpec, Outcome, RaySettings, Unit, run_pipeline

pytest.importorskip("torch")

FAULTS = {
    "corrupt": {"fault": "corrupt", "path": "series/0001.dcm"},
    "bad_image": {"fault": "bad_image"},
    "parser": {"fault": "finish_fails"},
}


def _units(markers: Path, aborting: bool) -> list[Unit]:
    kills = {
        "killed_prepare": {"fault": "kill_once", "marker": str(markers / "prepare")},
        "killed_replica": {"fault": "kill_replica_once", "marker": str(markers / "replica")},
    }
    return toy_units(**FAULTS, **kills, **({"aborts": {"fault": "abort"}} if aborting else {}))


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory) -> dict[str, object]:
    """The local run (kill markers already there: nothing is killed), then the Ray run."""
    done = tmp_path_factory.mktemp("done")
    (done / "prepare").write_text("")
    (done / "replica").write_text("")
    local: list[Outcome] = []
    run_pipeline(_units(done, False), ToyStages(), BackendSpec("test-tiny"), on_outcome=local.append, batch_size=4)
    markers = tmp_path_factory.mktemp("markers")
    on_ray: list[Outcome] = []
    start = time.perf_counter()
    summary = run_pipeline(
        _units(markers, True),
        ToyStages(),
        BackendSpec("test-tiny"),
        on_outcome=on_ray.append,
        batch_size=3,
        ray=RaySettings(),
    )
    return {
        "local": local,
        "ray": on_ray,
        "summary": summary,
        "seconds": time.perf_counter() - start,
        "markers": markers,
    }


def test_ray_outcomes_equal_the_local_run(runs) -> None:
    """Batches of 3 on one replica against batches of 4 in-process: the same answers and the same errors."""
    local = {o.key: (o.result, o.error) for o in runs["local"]}
    on_ray = {o.key: (o.result, o.error) for o in runs["ray"] if o.key != "aborts"}
    assert on_ray == local
    assert sorted(key for key, (_, error) in local.items() if error) == ["bad_image", "corrupt", "parser"]


def test_killed_workers_are_retried_without_duplicates(runs) -> None:
    keys = [o.key for o in runs["ray"]]
    assert len(keys) == len(set(keys)) == 14
    assert (runs["markers"] / "prepare").exists() and (runs["markers"] / "replica").exists()  # both were killed
    assert runs["summary"] == {**runs["summary"], "rows": 14, "done": 14, "failed": 4}


def test_a_preparation_that_aborts_every_time_fails_only_its_row(runs) -> None:
    aborted = next(o for o in runs["ray"] if o.key == "aborts")
    assert aborted.error == {
        "error": "WorkerCrashedError",
        "reason": "the worker process died 2 times while preparing this row (a native crash, an abort or "
        "running out of memory); it was not tried again",
        "stage": "prepare",
    }
    assert runs["seconds"] < 90


def test_an_unreachable_cluster_is_one_typed_error() -> None:
    """In a fresh process (this one runs the test Ray), at once: nothing listens on port 9."""
    code = (
        "from medlens.pipeline import BackendSpec, RaySettings, Unit, run_pipeline\n"
        "from medlens.errors import MedlensError\n"
        "try:\n"
        "    run_pipeline([Unit('a', {})], None, BackendSpec('test-tiny'), on_outcome=print,"
        " ray=RaySettings(address='127.0.0.1:9'))\n"
        "except MedlensError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        "refused: cannot reach the Ray cluster at 127.0.0.1:9: Connection refused (is `ray start --head` running?)\n"
    )
