"""The streaming evaluation runner: keys without preparation, only missing items prepared, a batch at a time,
parser context journaled, partial batches kept when the engine fails."""

from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
from eval_data import write_benchmark, write_jsonl
from scripted import ScriptedBackend

import medlens.prep
import medlens.tasks.localize
from medlens.backends.base import GenerationFailed, GenerationOutput
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.errors import BackendUnavailableError
from medlens.eval.runner import run_benchmark, study_batches

CONDITION = 'Is there "{label}" in the {what}? Answer with "Final Answer: yes" or "Final Answer: no".'


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    """Ten small CT series, two questions each, as a condition benchmark under a data root."""
    root = tmp_path_factory.mktemp("streaming")
    for n in range(10):
        hu, _ = ct_phantom(n_slices=8, size=32, seed=n)
        write_ct_series(hu, root / "ct" / f"v{n}" / "ct", seed=n)
    rows = [
        {"id": f"v{n}-{label}", "image": f"v{n}/ct", "label": label, "target": "no"}
        for n in range(10)
        for label in ("ascites", "nodule")
    ]
    write_jsonl(root / "ct" / "test.jsonl", rows)
    write_benchmark(
        root,
        "ct",
        "condition",
        [{"name": "accuracy", "fn": "accuracy"}],
        prompt=CONDITION,
        options={"what": "CT volume"},
    )
    return root


class CountingPreparation:
    """Wraps ``prepare_study``: counts calls, and the most studies whose prepared images are alive at once
    (held by the kind's cache, by queries, by anything)."""

    def __init__(self, monkeypatch) -> None:
        self.inner, self.calls, self.alive, self.most_alive = medlens.prep.prepare_study, 0, 0, 0
        monkeypatch.setattr(medlens.prep, "prepare_study", self)

    def __call__(self, *args, **kwargs):
        prepared = self.inner(*args, **kwargs)
        self.calls += 1
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        weakref.finalize(prepared.images[0], self._gone)
        return prepared

    def _gone(self) -> None:
        self.alive -= 1


def _run(volumes: Path, out: Path, backend, **options):
    return run_benchmark(str(volumes / "ct.yaml"), backend, out_dir=out, data=volumes, n_resamples=100, **options)


def test_consecutive_questions_about_one_study_stay_in_one_batch():
    files = [[Path("a")], [Path("a")], [Path("a")], [Path("b")], [Path("c")], [Path("c")]]
    assert list(study_batches(list(range(6)), files, 2)) == [[0, 1, 2], [3, 4, 5]]
    assert list(study_batches([1, 3, 4], files, 1)) == [[1], [3], [4]]
    assert list(study_batches([], files, 4)) == []


class ForgetfulBackend(ScriptedBackend):
    """A scripted backend that keeps no request (so it holds no image)."""

    def generate_one(self, request):
        output = super().generate_one(request)
        self.requests[-1] = None
        return output


def test_memory_holds_a_batch_not_the_benchmark(volumes, tmp_path, monkeypatch):
    preparation = CountingPreparation(monkeypatch)
    backend = ForgetfulBackend("Final Answer: no")
    results = _run(volumes, tmp_path, backend, batch_size=2)
    assert results["metrics"]["accuracy"]["value"] == 1.0 and len(backend.requests) == 20
    assert preparation.calls == 10  # each study once: its two questions are consecutive, in one batch
    # the kind keeps the last 2 studies for reuse (3 alive while the 3rd is made); a runner that built every
    # query before generating would hold the images of all 10 in its queries
    assert preparation.most_alive <= 3


def test_a_resumed_run_prepares_nothing_that_is_journaled(volumes, tmp_path, monkeypatch):
    _run(volumes, tmp_path, ScriptedBackend("Final Answer: no"), limit=6)  # the first 3 studies
    preparation = CountingPreparation(monkeypatch)
    backend = ScriptedBackend("Final Answer: yes")
    results = _run(volumes, tmp_path, backend)
    assert results["n_reused"] == 6 and len(backend.requests) == 14
    assert preparation.calls == 7  # only the 7 studies not yet answered
    assert results["metrics"]["accuracy"]["value"] == 0.3  # 6 reused "no" (right) and 14 new "yes" (wrong)
    again = CountingPreparation(monkeypatch)
    _run(volumes, tmp_path, ScriptedBackend("unused"))
    assert again.calls == 0


class FailingBackend(ScriptedBackend):
    """Answers the first ``good`` requests; then a batch fails after its first request completed."""

    def __init__(self, good: int) -> None:
        super().__init__("Final Answer: no")
        self.good = good

    def generate(self, requests, progress=None):
        if len(self.requests) + len(requests) <= self.good:
            return super().generate(requests, progress)
        done = {0: GenerationOutput("Final Answer: no", 10, 5, "stop")}
        self.requests.append(requests[0])
        error = BackendUnavailableError("cannot reach the model server at http://127.0.0.1:9/v1")
        raise GenerationFailed.wrap(error, 1, done, len(requests))


def test_a_failing_engine_keeps_what_completed_and_the_rerun_resumes(volumes, tmp_path):
    with pytest.raises(BackendUnavailableError, match=r"item v2-nodule: cannot reach .* \(1 outputs of the batch"):
        _run(volumes, tmp_path, FailingBackend(good=4), batch_size=2)
    journaled = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert len(journaled) == 5  # two full batches and the completed first request of the third
    backend = ScriptedBackend("Final Answer: no")
    results = _run(volumes, tmp_path, backend, batch_size=2)
    assert results["n_reused"] == 5 and len(backend.requests) == 15


def test_parsing_context_is_journaled_so_scoring_needs_no_preparation(tmp_path, monkeypatch):
    """localize parses boxes against the padded size of the image: a rerun scores from the journal alone."""
    from PIL import Image

    root = tmp_path / "data"
    (root / "loc").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 80), np.uint8)).save(root / "loc" / "cxr.png")
    target = [{"label": "heart", "box_2d": [250, 0, 750, 1000]}]
    write_jsonl(root / "loc" / "test.jsonl", [{"id": "a", "image": "cxr.png", "question": "Heart?", "target": target}])
    spec = write_benchmark(
        root,
        "loc",
        "task",
        [{"name": "mean_iou", "fn": "mean_iou"}],
        options={"task": "localize", "prediction": "boxes"},
    )
    answer = '[{"box_2d": [250, 0, 750, 1000], "label": "heart"}]'
    first = run_benchmark(str(spec), ScriptedBackend(answer), out_dir=tmp_path / "run", data=root, n_resamples=100)
    assert first["metrics"]["mean_iou"]["value"] == 1.0

    def no_preparation(*args, **kwargs):
        raise AssertionError("a journaled item was prepared again")

    monkeypatch.setattr(medlens.prep, "prepare_study", no_preparation)
    monkeypatch.setattr(medlens.tasks.localize, "prepare_study", no_preparation)
    again = run_benchmark(str(spec), ScriptedBackend("unused"), out_dir=tmp_path / "run", data=root, n_resamples=100)
    assert again["n_reused"] == 1 and again["metrics"]["mean_iou"]["value"] == 1.0
