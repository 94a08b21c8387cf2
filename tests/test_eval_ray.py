"""``medlens eval --ray``: the missing items through medlens.pipeline, one study per unit, journaled by the
driver under the local run's keys. Without Ray, the pipeline path runs on the local pipeline runner (a
stand-in for the Ray runner that takes a loaded backend) to pin journaling, failures and equality with the
streaming path; with the session's local Ray (``ray_local``), test-tiny greedy runs equal local ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from eval_data import write_benchmark, write_jsonl
from ray_cluster import ray_local  # noqa: F401
from scripted import ScriptedBackend

import medlens.pipeline.run
from medlens.backends.base import GenerationFailed
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.errors import BackendUnavailableError, InputError, MedlensError
from medlens.eval.pipelined import ItemsFailedError, failed_items, study_units
from medlens.eval.runner import RESULTS, SAMPLES, run_benchmark
from medlens.pipeline import RaySettings
from medlens.pipeline.local import run_local
from medlens.registry import Registry

CONDITION = 'Is there "{label}" in the {what}? Answer with "Final Answer: yes" or "Final Answer: no".'
LABELS = ("ascites", "nodule", "effusion")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Six small CT series as a condition benchmark: three questions about each of the first three, one about
        each of the others, of another length each (so a run has shared-prefix groups, and requests of their own
    that a batch left-pads), six new tokens each."""
    root = tmp_path_factory.mktemp("eval-ray")
    for n in range(6):
        hu, _ = ct_phantom(n_slices=6, size=32, seed=n)
        write_ct_series(hu, root / "ct" / f"v{n}", seed=n)
    rows = [
        {"id": f"v{n}-{label}", "image": f"v{n}", "label": label, "target": "no"}
        for n in range(6)
        for label in (LABELS if n < 3 else LABELS[n - 3 : n - 2])
    ]
    write_jsonl(root / "ct" / "test.jsonl", rows)
    write_benchmark(
        root,
        "ct",
        "condition",
        [{"name": "accuracy", "fn": "accuracy"}],
        prompt=CONDITION,
        options={"what": "CT volume"},
        generation={"max_new_tokens": 6},
    )
    return root


def local_runner(units, stages, backend, *, batch_size, on_outcome, settings):
    """The local pipeline runner in the Ray runner's place (it takes a loaded backend, as Ray's does not)."""
    run_local(units, stages, backend, batch_size=batch_size, on_outcome=on_outcome)


@pytest.fixture
def pipeline_here(monkeypatch):
    """``ray=RaySettings()`` runs the pipeline path in this process."""
    runners: Registry[str] = Registry("pipeline runner")
    runners.add("local", "medlens.pipeline.local:run_local")
    runners.add("ray", f"{__name__}:local_runner")
    monkeypatch.setattr(medlens.pipeline.run, "RUNNERS", runners)


def _run(volumes: Path, out: Path, backend, **options):
    return run_benchmark(str(volumes / "ct.yaml"), backend, out_dir=out, data=volumes, n_resamples=100, **options)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in ("timings", "warnings", "n_reused")}


def test_a_unit_is_a_study_and_text_items_are_units_of_their_own():
    files = [[Path("a")], [Path("a")], [Path("b")], [], [], [Path("a")]]
    items = [{"id": str(i)} for i in range(6)]
    keys = [f"k{i}" for i in range(6)]
    units = study_units([0, 1, 2, 3, 4, 5], items, files, keys)
    assert [u.row["keys"] for u in units] == [["k0", "k1"], ["k2"], ["k3"], ["k4"], ["k5"]]
    assert len({u.key for u in units}) == 5
    assert [u.row["keys"] for u in study_units([1, 2], items, files, keys)] == [["k1"], ["k2"]]


def test_the_pipeline_path_equals_the_streaming_path_on_test_tiny(volumes, tiny_backend, tmp_path, pipeline_here):
    """Greedy test-tiny: same journal records, samples and metrics, whatever the batch composition (the
    streaming path sends the three one-question studies to the engine together, left-padded in one batch;
    the pipeline, at 2 requests a batch, one study at a time)."""
    local = _run(volumes, tmp_path / "local", tiny_backend, batch_size=8)
    piped = _run(volumes, tmp_path / "piped", tiny_backend, batch_size=2, ray=RaySettings())
    assert _comparable(piped) == _comparable(local)
    assert (tmp_path / "piped" / SAMPLES).read_text() == (tmp_path / "local" / SAMPLES).read_text()
    by_key = {r["key"]: r for r in _lines(tmp_path / "local" / "journal.jsonl")}
    journaled = _lines(tmp_path / "piped" / "journal.jsonl")
    assert len(journaled) == 12 and {r["key"]: r for r in journaled} == by_key
    assert len({r["raw_output"] for r in journaled}) > 3  # the answers differ: their equality says something


def _with_a_broken_study(volumes: Path, tmp_path: Path) -> Path:
    """The benchmark with study v1 replaced by a folder holding no DICOM file (``ct/gone``)."""
    data = tmp_path / "data"
    (data / "ct").mkdir(parents=True)
    (data / "ct.yaml").write_text((volumes / "ct.yaml").read_text())
    for n in range(6):
        (data / "ct" / f"v{n}").symlink_to(volumes / "ct" / f"v{n}")
    (data / "ct" / "test.jsonl").write_text((volumes / "ct" / "test.jsonl").read_text().replace('"v1"', '"gone"'))
    (data / "ct" / "gone").mkdir()
    (data / "ct" / "gone" / "0001.dcm").write_bytes(b"not a DICOM file" * 64)
    return data


def _check_broken_study_failed(error: MedlensError, data: Path, journal: Path) -> None:
    assert isinstance(error, ItemsFailedError) and isinstance(error, InputError)
    assert sorted(error.failures) == ["v1-ascites", "v1-effusion", "v1-nodule"]
    assert error.reason.startswith("3 items failed (9 outputs journaled; rerun the same command")
    assert "item v1-ascites: NoImagesFoundError: " in error.reason and str(data / "ct" / "gone") in error.reason
    assert len(_lines(journal)) == 9


def test_a_study_that_fails_to_prepare_fails_only_its_items(volumes, tmp_path, pipeline_here):
    """The others are journaled, then one typed error names the failed items; the rerun (the study mended)
    generates only those."""
    data = _with_a_broken_study(volumes, tmp_path)
    backend = ScriptedBackend("Final Answer: no")
    with pytest.raises(InputError) as raised:
        _run(data, tmp_path / "run", backend, ray=RaySettings())
    _check_broken_study_failed(raised.value, data, tmp_path / "run" / "journal.jsonl")
    assert len(backend.requests) == 9
    (data / "ct" / "gone" / "0001.dcm").unlink()
    (data / "ct" / "gone").rmdir()
    (data / "ct" / "gone").symlink_to(volumes / "ct" / "v1")
    again = ScriptedBackend("Final Answer: no")
    results = _run(data, tmp_path / "run", again, ray=RaySettings())
    assert len(again.requests) == 3 and results["n_reused"] == 9 and results["metrics"]["accuracy"]["value"] == 1.0


class FailingStudyBackend(ScriptedBackend):
    """Answers every request except those about ``label``, which fail as an unreachable server does."""

    def __init__(self, label: str) -> None:
        super().__init__("Final Answer: no")
        self.label = label

    def generate(self, requests, progress=None, on_output=None, on_text=None):
        for index, request in enumerate(requests):
            if self.label in request.messages[-1]["content"][-1]["text"]:
                error = BackendUnavailableError("cannot reach the model server at http://127.0.0.1:9/v1")
                raise GenerationFailed.wrap(error, index, {}, len(requests))
        return super().generate(requests, progress)


def test_an_engine_failure_fails_only_its_studies_and_keeps_its_type(volumes, tmp_path, pipeline_here):
    """A study whose request the engine fails fails with all its items (the study is the unit); the batch's
    other studies are answered again on their own and journaled; the error keeps the engine error's type."""
    with pytest.raises(BackendUnavailableError, match=r"^10 items failed \(2 outputs journaled") as raised:
        _run(volumes, tmp_path, FailingStudyBackend("nodule"), batch_size=10, ray=RaySettings())
    failed = [f"v{n}-{label}" for n in range(3) for label in LABELS] + ["v4-nodule"]
    assert sorted(raised.value.failures) == sorted(failed)
    assert "item v0-ascites: GenerationFailed[BackendUnavailableError]: " in raised.value.reason
    assert [r["id"] for r in _lines(tmp_path / "journal.jsonl")] == ["v3-ascites", "v5-effusion"]
    again = ScriptedBackend("Final Answer: no")
    assert _run(volumes, tmp_path, again, ray=RaySettings())["n_reused"] == 2 and len(again.requests) == 10


def test_failures_of_several_types_are_one_medlens_error_naming_the_first_five():
    failures = {f"i{n}": {"error": "CorruptFileError", "reason": "bad", "stage": "prepare"} for n in range(6)}
    failures["i6"] = {"error": "ValueError", "reason": "a bug", "stage": "answer", "untyped": True}
    error = failed_items(failures, 3)
    assert type(error) is ItemsFailedError and isinstance(error, MedlensError)
    assert error.reason.endswith("item i4: CorruptFileError: bad; and 2 more")
    assert isinstance(failed_items({"a": failures["i0"]}, 0), InputError)


def test_replicas_without_ray_are_refused(cli, tmp_path):
    code, _, err = cli("eval", "--benchmark", "medqa", "--replicas", "2", "--out", tmp_path, "-q")
    assert code == 2 and err.count("\n") == 1 and "--replicas and --gpus-per-replica need --ray" in err


def test_on_ray_a_run_journaled_halfway_locally_completes_with_only_the_missing_items(
    volumes, tiny_backend, tmp_path, cli, ray_local
):
    """``medlens eval --ray local`` after a local run of the first two studies: the six journaled items are
    reused, the six others are prepared and answered on Ray (each once: no duplicate journal line), and the
    run ends with the samples and metrics of an uninterrupted local run."""
    reference = _run(volumes, tmp_path / "local", tiny_backend)
    _run(volumes, tmp_path / "run", tiny_backend, limit=6)
    code, out, err = cli(
        "eval", "--benchmark", volumes / "ct.yaml", "--data", volumes, "--out", tmp_path / "run", "--ray", "local",
        "--batch-size", "2", "--resamples", "100", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert "ct: 12 outputs, 12 unparsed, 6 reused from the journal" in out
    results = json.loads((tmp_path / "run" / RESULTS).read_text())
    assert results["n_reused"] == 6 and _comparable(results) == _comparable(reference)
    assert (tmp_path / "run" / SAMPLES).read_text() == (tmp_path / "local" / SAMPLES).read_text()
    keys = [r["key"] for r in _lines(tmp_path / "run" / "journal.jsonl")]
    assert len(keys) == len(set(keys)) == 12


def test_on_ray_a_broken_study_fails_only_its_items(volumes, tmp_path, ray_local):
    """The same contract on Ray: the other studies are answered and journaled, then one typed error."""
    data = _with_a_broken_study(volumes, tmp_path)
    with pytest.raises(InputError) as raised:
        _run(data, tmp_path / "run", "test-tiny", ray=RaySettings(), batch_size=4)
    _check_broken_study_failed(raised.value, data, tmp_path / "run" / "journal.jsonl")
