"""Bootstrap intervals, paired differences, McNemar's test, sample sizes and run comparison."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from medlens.errors import MedlensError
from medlens.eval.compare import compare_runs, format_comparison
from medlens.metrics.functions import accuracy, binary_f1_macro_by_group, macro_accuracy, rouge_l, tokenized_f1
from medlens.metrics.stats import (
    bootstrap_ci,
    bootstrap_values,
    items_needed_paired,
    mcnemar_exact,
    paired_bootstrap_diff,
    resample_indices,
)

R = 500


def _answers(n: int, p_right: float, seed: int):
    rng = np.random.default_rng(seed)
    targets = rng.choice(["yes", "no"], n).tolist()
    flip = {"yes": "no", "no": "yes"}
    predictions = [t if rng.random() < p_right else flip[t] for t in targets]
    return predictions, targets


def _unregistered(fn):
    """The same metric hidden behind a plain function: the bootstrap must call it once per resample."""
    return lambda predictions, targets, groups=None, **options: fn(predictions, targets, groups, **options)


def test_interval_contains_value_and_narrows_with_n():
    small = bootstrap_ci(accuracy, *_answers(100, 0.7, 0), n_resamples=R)
    large = bootstrap_ci(accuracy, *_answers(2000, 0.7, 0), n_resamples=R)
    for interval in (small, large):
        assert interval.low <= interval.value <= interval.high
    assert small.n == 100 and large.n == 2000
    assert large.high - large.low < (small.high - small.low) / 2


def test_bootstrap_is_deterministic_per_seed():
    predictions, targets = _answers(200, 0.6, 1)
    first = bootstrap_ci(accuracy, predictions, targets, n_resamples=R, seed=3)
    assert bootstrap_ci(accuracy, predictions, targets, n_resamples=R, seed=3) == first
    assert bootstrap_ci(accuracy, predictions, targets, n_resamples=R, seed=4) != first


def test_resample_indices_do_not_depend_on_chunking(monkeypatch):
    whole = np.concatenate(list(resample_indices(50, 30, seed=2)))
    monkeypatch.setattr("medlens.metrics.stats.CHUNK_ELEMENTS", 7 * 50)
    chunks = list(resample_indices(50, 30, seed=2))
    assert len(chunks) == 5
    np.testing.assert_array_equal(np.concatenate(chunks), whole)


@pytest.mark.parametrize("fn", [accuracy, macro_accuracy, binary_f1_macro_by_group])
def test_vectorised_bootstrap_equals_calling_the_metric_per_resample(fn):
    predictions, targets = _answers(150, 0.7, 2)
    predictions[::9] = [None] * len(predictions[::9])
    groups = [f"c{i % 4}" for i in range(150)]
    fast = bootstrap_values(fn, predictions, targets, groups, n_resamples=200, seed=5)
    slow = bootstrap_values(_unregistered(fn), predictions, targets, groups, n_resamples=200, seed=5)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12)


def test_vectorised_bootstrap_of_text_metrics_equals_direct_recomputation():
    predictions = ["left lung", "the right lobe", "no", "yes", None, "heart is enlarged"] * 5
    targets = ["left lung", "right lower lobe", "yes", "yes", "liver", "enlarged heart"] * 5
    for fn in (tokenized_f1, rouge_l):
        fast = bootstrap_values(fn, predictions, targets, n_resamples=100, seed=1)
        slow = bootstrap_values(_unregistered(fn), predictions, targets, n_resamples=100, seed=1)
        np.testing.assert_allclose(fast, slow, rtol=1e-12)


def test_macro_metric_is_recomputed_on_each_resample():
    # 90 items of one condition all right, 10 of another all wrong: macro 0.5, mean of item scores 0.9
    predictions = ["yes"] * 90 + ["no"] * 10
    targets = ["yes"] * 100
    groups = ["effusion"] * 90 + ["nodule"] * 10
    macro = bootstrap_ci(macro_accuracy, predictions, targets, groups, n_resamples=R)
    assert macro.value == pytest.approx(0.5)
    assert macro.low <= 0.5 <= macro.high and macro.high < 0.9
    values = bootstrap_values(macro_accuracy, predictions, targets, groups, n_resamples=R)
    # every resample holds both conditions (almost surely), so every recomputed value is exactly 0.5
    assert np.allclose(values, 0.5)
    item_mean = bootstrap_ci(accuracy, predictions, targets, n_resamples=R)
    assert item_mean.low > 0.8  # averaging item scores would have given an interval around 0.9


def test_bootstrap_of_no_items_and_undefined_resamples():
    empty = bootstrap_ci(accuracy, [], [], n_resamples=R)
    assert empty.n == 0 and math.isnan(empty.value)
    with pytest.raises(ValueError):
        bootstrap_ci(accuracy, ["a"], ["a"], confidence=1.5)


def test_paired_diff_of_identical_runs_is_zero():
    predictions, targets = _answers(100, 0.7, 3)
    same = paired_bootstrap_diff(accuracy, predictions, predictions, targets, n_resamples=R)
    assert (same.diff, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_diff_uses_the_same_items_for_both_runs():
    targets = _answers(300, 1.0, 4)[1]
    better, _ = _answers(300, 0.8, 4)
    rng = np.random.default_rng(9)
    flip = {"yes": "no", "no": "yes"}
    worse = [
        flip[p] if p == t and rng.random() < 0.15 else p for p, t in zip(better, targets, strict=True)
    ]  # more errors
    result = paired_bootstrap_diff(accuracy, better, worse, targets, n_resamples=R, seed=1)
    assert result.diff == pytest.approx(accuracy(better, targets) - accuracy(worse, targets))
    assert 0 < result.low <= result.diff <= result.high
    assert result.p_value < 0.01
    # the same resampled indices for both runs
    manual = []
    for idx in resample_indices(300, R, seed=1):
        for row in idx:
            t = [targets[i] for i in row]
            manual.append(accuracy([better[i] for i in row], t) - accuracy([worse[i] for i in row], t))
    assert result.low == pytest.approx(np.percentile(manual, 2.5))
    assert result.high == pytest.approx(np.percentile(manual, 97.5))
    # pairing removes the shared errors: tighter than two independent intervals would suggest
    a = bootstrap_ci(accuracy, better, targets, n_resamples=R)
    b = bootstrap_ci(accuracy, worse, targets, n_resamples=R, seed=1)
    assert result.high - result.low < math.hypot(a.high - a.low, b.high - b.low) * 0.75


def test_paired_diff_p_value_is_two_sided():
    targets = _answers(200, 1.0, 5)[1]
    good, _ = _answers(200, 0.8, 5)
    bad, _ = _answers(200, 0.7, 6)
    forward = paired_bootstrap_diff(accuracy, good, bad, targets, n_resamples=R, seed=2)
    backward = paired_bootstrap_diff(accuracy, bad, good, targets, n_resamples=R, seed=2)
    assert forward.diff == pytest.approx(-backward.diff)
    assert forward.p_value == pytest.approx(backward.p_value)


def test_mcnemar_matches_scipy_binomtest():
    rng = np.random.default_rng(0)
    a = rng.random(120) < 0.7
    b = rng.random(120) < 0.6
    result = mcnemar_exact(a, b)
    assert result.b == int(np.sum(a & ~b)) and result.c == int(np.sum(~a & b))
    assert result.p_value == pytest.approx(binomtest(result.b, result.b + result.c, 0.5).pvalue)


def test_mcnemar_textbook_example_and_no_discordance():
    # b = 1, c = 9: p = 2 * P(X <= 1 | 10, 1/2) = 2 * (1 + 10) / 1024
    a = [True] * 20 + [True] + [False] * 9
    b = [True] * 20 + [False] + [True] * 9
    result = mcnemar_exact(a, b)
    assert (result.b, result.c) == (1, 9)
    assert result.p_value == pytest.approx(22 / 1024)
    assert mcnemar_exact([True, False], [True, False]) == (0, 0, 1.0)


def test_items_needed_paired_by_hand():
    # Connor (1987): delta 0.1, psi 0.2, alpha 0.05 (z 1.959964), power 0.8 (z 0.841621)
    z_a, z_b = 1.959963984540054, 0.8416212335729143
    by_hand = (z_a * math.sqrt(0.2) + z_b * math.sqrt(0.2 - 0.01)) ** 2 / 0.01  # 154.6
    assert math.ceil(by_hand) == 155
    assert items_needed_paired(0.7, 0.6, discordant=0.2) == 155
    assert items_needed_paired(0.6, 0.7, discordant=0.2) == 155
    independent = 0.7 * 0.4 + 0.6 * 0.3
    expected = math.ceil((z_a * math.sqrt(independent) + z_b * math.sqrt(independent - 0.01)) ** 2 / 0.01)
    assert items_needed_paired(0.7, 0.6) == expected
    assert items_needed_paired(0.7, 0.7, discordant=0.1) is None
    with pytest.raises(ValueError, match="discordant"):
        items_needed_paired(0.7, 0.5, discordant=0.1)


# ---------------------------------------------------------------- compare_runs


def _write_run(path, benchmark, model, items, predictions):
    path.mkdir(parents=True)
    rows = [
        {"id": item["id"], "prediction": p, "target": item["target"], "group": item["group"], "scores": {}}
        for item, p in zip(items, predictions, strict=True)
    ]
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [
        {"name": "macro_f1", "fn": "binary_f1_macro_by_group", "options": {}},
        {"name": "accuracy", "fn": "accuracy", "options": {}},
    ]
    results = {"benchmark": benchmark, "model": model, "metrics": {}, "metric_specs": specs}
    (path / "results.json").write_text(json.dumps(results))
    return path


def _runs(tmp_path, n=200, benchmark_b="ct-rate"):
    targets = _answers(n, 1.0, 7)[1]
    items = [{"id": f"vol{i // 4}-c{i % 4}", "target": t, "group": f"c{i % 4}"} for i, t in enumerate(targets)]
    rng = np.random.default_rng(11)
    good = [t if rng.random() < 0.85 else None for t in targets]
    bad = [("no" if t == "yes" else "yes") if rng.random() < 0.3 else p for t, p in zip(targets, good, strict=True)]
    run_a = _write_run(tmp_path / "a", "ct-rate", "medgemma-1.5-4b", items, good)
    run_b = _write_run(tmp_path / "b", benchmark_b, "other-model", items, bad)
    return run_a, run_b, items, good, bad


def test_compare_runs_finds_the_better_model(tmp_path):
    run_a, run_b, *_ = _runs(tmp_path)
    result = compare_runs(run_a, run_b, n_resamples=R)
    json.dumps(result)  # JSON-ready
    assert result["n_common"] == 200 and result["n_only_a"] == result["n_only_b"] == 0
    by_name = {m["name"]: m for m in result["metrics"]}
    acc = by_name["accuracy"]
    assert acc["diff"] == pytest.approx(acc["value_a"] - acc["value_b"])
    assert acc["diff"] > 0 and acc["ci_low"] > 0 and acc["p_value"] < 0.05
    assert acc["mcnemar"]["b"] > acc["mcnemar"]["c"] and acc["mcnemar"]["p_value"] < 0.05
    assert isinstance(acc["items_needed"], int) and acc["items_needed"] > 0
    assert by_name["macro_f1"]["diff"] > 0 and by_name["macro_f1"]["mcnemar"] is None
    text = format_comparison(result)
    assert "accuracy" in text and "macro_f1" in text and "medgemma-1.5-4b" in text and "items compared: 200" in text


def test_compare_runs_refuses_different_benchmarks(tmp_path):
    run_a, run_b, *_ = _runs(tmp_path, benchmark_b="mri-conditions")
    with pytest.raises(MedlensError, match="different benchmarks"):
        compare_runs(run_a, run_b, n_resamples=R)


def test_compare_runs_reports_partial_overlap(tmp_path):
    run_a, _, items, good, bad = _runs(tmp_path)
    extra = [{"id": f"new{i}", "target": "yes", "group": "c0"} for i in range(3)]
    run_b = _write_run(tmp_path / "partial", "ct-rate", "other-model", items[5:] + extra, bad[5:] + ["yes"] * 3)
    result = compare_runs(run_a, run_b, n_resamples=R)
    assert result["n_common"] == 195
    assert (result["n_only_a"], result["n_only_b"]) == (5, 3)
    assert result["run_a"]["only_here_ids"] == [item["id"] for item in items[:5]]
    acc = next(m for m in result["metrics"] if m["name"] == "accuracy")
    assert acc["value_a"] == pytest.approx(accuracy(good[5:], [i["target"] for i in items[5:]]))
    assert "only in A: 5, only in B: 3" in format_comparison(result)


def test_compare_runs_refuses_runs_on_different_targets(tmp_path):
    run_a, _, items, _, bad = _runs(tmp_path)
    changed = [{**items[0], "target": "maybe"}, *items[1:]]
    run_b = _write_run(tmp_path / "changed", "ct-rate", "other-model", changed, bad)
    with pytest.raises(MedlensError, match="disagree on the target"):
        compare_runs(run_a, run_b, n_resamples=R)
