"""Interrupting and resuming `medlens eval` for real: SIGTERM/SIGINT to a running CLI process give one line
and 130/143, every output finished before the signal is journaled, a rerun resumes; a rerun with everything
journaled never loads the model; the recipe is part of the journal key; the summary line flags test models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from eval_data import build_all
from scripted import ScriptedBackend

from medlens.errors import UnknownNameError
from medlens.eval import runner
from medlens.eval.runner import RESULTS, run_benchmark


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("eval-data"))


def _eval_args(out) -> list[str]:
    return [
        sys.executable, "-m", "medlens.cli", "eval", "--benchmark", "ct-rate", "--model", "test-tiny",
        "--batch-size", "8", "--resamples", "200", "--out", str(out),
    ]  # fmt: skip


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_says_what_was_saved_and_the_rerun_resumes(data_root, tmp_path, signum, code):
    env = {**os.environ, "MEDLENS_DATA": str(data_root)}
    run = tmp_path / "run"
    proc = subprocess.Popen(_eval_args(run), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = run / "journal.jsonl"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 1:  # one batch of 8 holds all 6
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    saved = len(journal.read_text().splitlines())
    assert proc.returncode == code, err
    assert 1 <= saved < 6, "outputs are journaled one at a time, before the batch ends"
    lines = [line for line in err.splitlines() if line.startswith("medlens:")]
    assert lines == [f"medlens: interrupted: {saved} of 6 outputs saved in {journal}; rerun the same command to resume"]
    assert "Traceback" not in err
    again = subprocess.run(_eval_args(run), env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert json.loads((run / RESULTS).read_text())["n_reused"] == saved


def test_a_fully_journaled_rerun_does_not_load_the_model(data_root, tmp_path, monkeypatch):
    first = run_benchmark("ct-rate", "test-tiny", out_dir=tmp_path, data=data_root, n_resamples=200)
    assert first["n_reused"] == 0

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded although every output is journaled")

    monkeypatch.setattr(runner, "load_backend", refuse)
    again = run_benchmark("ct-rate", "test-tiny", out_dir=tmp_path, data=data_root, n_resamples=200)
    assert again["n_reused"] == 6 and again["metrics"] == first["metrics"]


def test_the_recipe_is_part_of_the_key(data_root, tmp_path):
    default = ScriptedBackend("Final Answer: yes")
    run_benchmark("ct-rate", default, out_dir=tmp_path, data=data_root, n_resamples=200)
    notebook = ScriptedBackend("Final Answer: yes")
    results = run_benchmark(
        "ct-rate", notebook, out_dir=tmp_path, data=data_root, n_resamples=200, recipe="medgemma-1.5-notebook"
    )
    assert results["n_reused"] == 0 and len(notebook.requests) == 6
    with pytest.raises(UnknownNameError):
        run_benchmark("ct-rate", ScriptedBackend("x"), out_dir=tmp_path, data=data_root, recipe="medgemma-15")


def test_summary_line_counts_unparsed_outputs_and_flags_test_models(data_root, tmp_path, cli):
    code, out, err = cli(
        "eval", "--benchmark", "pubmedqa", "--data", data_root, "--out", tmp_path, "-q", "--resamples", "200"
    )
    assert code == 0, err
    results = json.loads((tmp_path / RESULTS).read_text())
    summary = out.strip().splitlines()[-1]
    assert f"{results['n_unparsed']} unparsed" in summary
    assert "test model test-tiny: scores mean nothing" in summary
