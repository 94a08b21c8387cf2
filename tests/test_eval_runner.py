"""The evaluation engine end to end: every built-in benchmark on synthetic data with test-tiny, the journal,
crash-resume after kill -9, cache invalidation, missing data messages, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_data import build_all
from scripted import ScriptedBackend

from medlens.eval.registry import benchmark_files, get_benchmark
from medlens.eval.runner import RESULTS, SAMPLES, run_benchmark
from medlens.journal import Journal

BUILTIN = sorted(benchmark_files())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture
def tiny(tiny_backend):
    return tiny_backend


@pytest.mark.parametrize("name", BUILTIN)
def test_every_builtin_benchmark_runs_with_test_tiny(name, data_root, tiny, tmp_path):
    limit = 4 if name == "iu-cxr-findings" else None
    results = run_benchmark(name, tiny, out_dir=tmp_path, data=data_root, limit=limit, n_resamples=200)
    spec, _ = get_benchmark(name)
    samples = [json.loads(line) for line in (tmp_path / SAMPLES).read_text().splitlines()]
    assert results["n_items"] == len(samples) > 0
    assert set(results["metrics"]) == {m.name for m in spec.metrics}
    for metric in results["metrics"].values():
        assert 0.0 <= metric["ci_low"] <= metric["value"] <= metric["ci_high"] <= 1.0
    assert results["untrained_test_model"] and json.loads((tmp_path / RESULTS).read_text())["benchmark"] == name
    for sample in samples:
        assert {"id", "inputs", "prompt", "raw_output", "prediction", "target", "scores"} <= set(sample)


def test_list_shows_metrics_and_published_numbers(cli):
    code, out, _ = cli("eval", "--list")
    assert code == 0
    line = next(x for x in out.splitlines() if x.startswith("medqa "))
    assert "accuracy" in line and "69.1" in line
    assert len(out.splitlines()) == len(BUILTIN) >= 20


def test_missing_data_says_what_to_put_where(tmp_path, cli):
    code, _, err = cli("eval", "--benchmark", "medqa", "--data", tmp_path, "--out", tmp_path / "run", "-q")
    assert code == 2
    assert str(tmp_path / "medqa" / "test.jsonl") in err and "MedQA" in err and "JSONL" in err


def test_unknown_benchmark(cli):
    code, _, err = cli("eval", "--benchmark", "medqaa")
    assert code == 2 and "did you mean 'medqa'" in err


def test_journal_reuses_greedy_outputs_and_invalidates_on_prompt_change(data_root, tmp_path):
    first = ScriptedBackend("Final Answer: B")
    run_benchmark("medqa", first, out_dir=tmp_path, data=data_root, n_resamples=200)
    assert len(first.requests) == 3
    again = ScriptedBackend("Final Answer: A")
    results = run_benchmark("medqa", again, out_dir=tmp_path, data=data_root, n_resamples=200)
    assert len(again.requests) == 0 and results["n_reused"] == 3 and results["metrics"]["accuracy"]["value"] == 1.0
    spec_file = tmp_path / "medqa-changed.yaml"
    text = get_benchmark("medqa")[1].read_text().replace("Answer with the letter", "Reply with the letter")
    spec_file.write_text(text)
    changed = ScriptedBackend("Final Answer: A")
    results = run_benchmark(str(spec_file), changed, out_dir=tmp_path, data=data_root, n_resamples=200)
    assert len(changed.requests) == 3 and results["metrics"]["accuracy"]["value"] == 0.0


def test_sampled_outputs_are_not_reused(data_root, tmp_path):
    spec_file = tmp_path / "medqa-sampled.yaml"
    text = (
        get_benchmark("medqa")[1]
        .read_text()
        .replace("generation: {max_new_tokens: 512}", "generation: {max_new_tokens: 512, temperature: 0.7}")
    )
    spec_file.write_text(text)
    for _ in range(2):
        backend = ScriptedBackend("Final Answer: B")
        run_benchmark(str(spec_file), backend, out_dir=tmp_path / "run", data=data_root, n_resamples=200)
        assert len(backend.requests) == 3


def test_journal_survives_a_cut_last_line(tmp_path):
    with Journal(tmp_path) as journal:
        journal.add({"key": "a", "raw_output": "x"})
    with open(tmp_path / "journal.jsonl", "a") as fh:
        fh.write('{"key": "b", "raw_out')  # what kill -9 can leave
    (tmp_path / "journal.sqlite").unlink()
    with Journal(tmp_path) as journal:
        assert journal.get("a")["raw_output"] == "x" and journal.get("b") is None
        journal.add({"key": "c", "raw_output": "y"})
    lines = (tmp_path / "journal.jsonl").read_text().splitlines()
    assert [json.loads(line)["key"] for line in lines] == ["a", "c"]


def test_crash_resume_after_kill_9_gives_the_same_results(data_root, tmp_path):
    """Kill a run mid-way with SIGKILL, rerun the same command: nothing journaled is redone and the results
    equal an uninterrupted run's."""
    env = {**os.environ, "MEDLENS_DATA": str(data_root)}
    args = [
        sys.executable,
        "-m",
        "medlens.cli",
        "eval",
        "--benchmark",
        "ct-rate",
        "--model",
        "test-tiny",
        "--batch-size",
        "1",
        "--resamples",
        "200",
        "-q",
    ]
    crashed, clean = tmp_path / "crashed", tmp_path / "clean"
    proc = subprocess.Popen(
        [*args, "--out", str(crashed)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    journal = crashed / "journal.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(journal.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done_before = len(journal.read_text().splitlines())
    assert 2 <= done_before < 6, "the run was killed part-way"
    subprocess.run([*args, "--out", str(crashed)], env=env, check=True, timeout=300, capture_output=True)
    subprocess.run([*args, "--out", str(clean)], env=env, check=True, timeout=300, capture_output=True)
    resumed = json.loads((crashed / RESULTS).read_text())
    reference = json.loads((clean / RESULTS).read_text())
    assert resumed["n_reused"] == done_before
    assert resumed["metrics"] == reference["metrics"]
    assert (crashed / SAMPLES).read_text() == (clean / SAMPLES).read_text()
    assert len((crashed / "journal.jsonl").read_text().splitlines()) == 6


def test_eval_cli_prints_metrics_with_intervals(data_root, tmp_path, cli):
    code, out, err = cli(
        "eval", "--benchmark", "pubmedqa", "--data", data_root, "--out", tmp_path, "-q", "--resamples", "200"
    )
    assert code == 0, err
    assert "pubmedqa accuracy:" in out and "95% CI" in out and "published MedGemma 1.5 4B: 68.2" in out
    assert Path(tmp_path / RESULTS).exists()


def test_llm_judge_grades_free_text_answers(data_root, tmp_path):
    model = ScriptedBackend("Final Answer: a meningeal tumour of the falx")
    judge = ScriptedBackend("The candidate names the same entity. Final Answer: yes", name="judge")
    results = run_benchmark("medpix-diagnosis", model, out_dir=tmp_path, data=data_root, judge=judge, n_resamples=200)
    assert results["metrics"]["judge_match"]["value"] == 1.0 and results["metrics"]["judge_match"]["judge"] == "judge"
    assert results["metrics"]["match"]["value"] == 1.0  # the synonym "meningeal tumour" matched too
    (request,) = judge.requests
    text = request.messages[0]["content"][0]["text"]
    assert "Reference diagnosis: meningioma / meningeal tumour" in text and "falx" in text
    again = ScriptedBackend("Final Answer: no", name="judge")
    run_benchmark("medpix-diagnosis", model, out_dir=tmp_path, data=data_root, judge=again, n_resamples=200)
    assert again.requests == []  # verdicts are journaled like outputs


def test_judge_is_refused_where_answers_are_not_free_text(data_root, tmp_path, cli):
    code, _, err = cli(
        "eval", "--benchmark", "medqa", "--data", data_root, "--out", tmp_path, "--judge", "test-tiny", "-q"
    )
    assert code == 2 and "no free-text answers" in err


def test_compare_cli_on_two_runs(data_root, tmp_path, cli):
    run_benchmark("medqa", ScriptedBackend("Final Answer: B"), out_dir=tmp_path / "a", data=data_root, n_resamples=200)
    run_benchmark("medqa", ScriptedBackend("Final Answer: C"), out_dir=tmp_path / "b", data=data_root, n_resamples=200)
    code, out, err = cli("compare", tmp_path / "a", tmp_path / "b", "--json", "--resamples", "200")
    assert code == 0, err
    (row,) = json.loads(out)["metrics"]
    assert (row["name"], row["value_a"], row["value_b"], row["diff"]) == ("accuracy", 1.0, 0.0, 1.0)
    assert row["mcnemar"]["b"] == 3 and row["mcnemar"]["c"] == 0
    code, out, _ = cli("compare", tmp_path / "a", tmp_path / "b", "--resamples", "200")
    assert code == 0 and "accuracy" in out and "McNemar" in out


#: what the real gemma-3-270m (base) answers, greedily, to the first two IU reports (recorded 2026-12): it
#: repeats the instruction, whose example list ["finding A", "finding B"] names no label
GEMMA_270M_PREDICTIONS = [[], []]
GEMMA_270M_ECHO = 'Reply with a JSON list of the present findings, written exactly as above, for example ["finding A"'


def _label_f1(predictions: list[list[str]], targets: list[list[str]], labels: list[str]) -> tuple[float, float]:
    """Macro and micro F1 over ``labels``, counted by hand (an F1 of nothing positive is 0)."""
    per_label, pooled = [], [0, 0, 0]
    for label in labels:
        tp = sum(label in p and label in t for p, t in zip(predictions, targets, strict=True))
        fp = sum(label in p and label not in t for p, t in zip(predictions, targets, strict=True))
        fn = sum(label not in p and label in t for p, t in zip(predictions, targets, strict=True))
        per_label.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
        pooled = [pooled[0] + tp, pooled[1] + fp, pooled[2] + fn]
    tp, fp, fn = pooled
    return sum(per_label) / len(labels), (2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)


def test_iu_cxr_findings_runs_for_real_with_gemma_270m(tmp_path):
    """The offline benchmark with the real Gemma 3 270M weights (two reports, to stay quick): greedy outputs
    are deterministic, so the predictions are pinned and the F1s must be those of the pinned predictions."""
    results = run_benchmark("iu-cxr-findings", "gemma-3-270m", out_dir=tmp_path, limit=2, n_resamples=200)
    assert results["model"] == "gemma-3-270m" and not results["untrained_test_model"]
    assert "base" in results["model_warning"]
    samples = [json.loads(line) for line in (tmp_path / SAMPLES).read_text().splitlines()]
    assert [s["id"] for s in samples] == ["iu-1", "iu-2"]
    assert [s["target"] for s in samples] == [["normal"], ["cardiomegaly"]]
    assert all(s["raw_output"].startswith(GEMMA_270M_ECHO) for s in samples)
    assert [s["prediction"] for s in samples] == GEMMA_270M_PREDICTIONS and results["n_unparsed"] == 0
    labels = get_benchmark("iu-cxr-findings")[0].options["labels"]
    # nothing predicted, two targets (normal, cardiomegaly): every label has tp 0, so every F1 is 0
    macro, micro = _label_f1(GEMMA_270M_PREDICTIONS, [s["target"] for s in samples], labels)
    for name, expected in (("macro_f1", macro), ("micro_f1", micro)):
        metric = results["metrics"][name]
        assert metric["value"] == pytest.approx(expected) and metric["n"] == 2
        assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
