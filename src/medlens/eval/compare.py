"""Paired comparison of two runs of one benchmark: items matched by id, every metric's difference with a
paired bootstrap interval and p-value, McNemar's exact test for right/wrong metrics, and how many paired
items a study would need to detect the observed accuracy difference."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from medlens.errors import MedlensError, NotFoundError
from medlens.metrics.functions import EXACT_MATCH, METRICS, item_scores
from medlens.metrics.stats import items_needed_paired, mcnemar_exact, paired_bootstrap_diff

CONFIDENCE = 0.95
_SHOWN_IDS = 10


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise NotFoundError("not found (is this a medlens run directory?)", str(path))
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MedlensError(f"cannot read run results ({exc})", str(path)) from None


def _read_samples(path: Path) -> dict[str, dict[str, Any]]:
    """The samples of a run by id; duplicate ids are refused."""
    if not path.is_file():
        raise NotFoundError("not found (is this a medlens run directory?)", str(path))
    samples: dict[str, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise MedlensError(f"line {number} is not JSON ({exc})", str(path)) from None
            key = str(row.get("id"))
            if key in samples:
                raise MedlensError(f"item id {key!r} appears twice", str(path))
            samples[key] = row
    return samples


def _metric_specs(results: dict[str, Any], where: Path) -> list[dict[str, Any]]:
    """The metric specs of a run; runs without them fall back to metric names that are metric functions."""
    specs = results.get("metric_specs")
    if specs:
        return [{"name": s["name"], "fn": s["fn"], "options": s.get("options") or {}} for s in specs]
    names = [name for name in results.get("metrics", {}) if name in METRICS]
    if not names:
        raise MedlensError("results.json names no metric that can be recomputed", str(where))
    return [{"name": name, "fn": name, "options": {}} for name in names]


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _exact_match(fn: str, preds_a: list, preds_b: list, targets: list, groups: list | None, options: dict) -> dict:
    """McNemar's test and the paired items needed, over the items the metric scores."""
    a = item_scores(fn, preds_a, targets, groups, **options) or []
    b = item_scores(fn, preds_b, targets, groups, **options) or []
    pairs = [(x == 1.0, y == 1.0) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"mcnemar": None, "items_needed": None}
    right_a, right_b = (np.asarray(col) for col in zip(*pairs, strict=True))
    test = mcnemar_exact(right_a, right_b)
    p_a, p_b = float(right_a.mean()), float(right_b.mean())
    needed = items_needed_paired(p_a, p_b, discordant=(test.b + test.c) / len(pairs))
    return {"mcnemar": {**test._asdict(), "n": len(pairs)}, "items_needed": needed}


def _compare_metric(
    spec: dict[str, Any], preds_a: list, preds_b: list, targets: list, groups: list | None, n_resamples: int, seed: int
) -> dict[str, Any]:
    fn = METRICS.get(spec["fn"])
    options = spec["options"]
    value_a = fn(preds_a, targets, groups, **options)
    value_b = fn(preds_b, targets, groups, **options)
    diff = paired_bootstrap_diff(
        fn, preds_a, preds_b, targets, groups, n_resamples=n_resamples, confidence=CONFIDENCE, seed=seed, **options
    )
    row: dict[str, Any] = {
        "name": spec["name"],
        "fn": spec["fn"],
        "value_a": _json_float(value_a),
        "value_b": _json_float(value_b),
        "diff": _json_float(diff.diff),
        "ci_low": _json_float(diff.low),
        "ci_high": _json_float(diff.high),
        "p_value": _json_float(diff.p_value),
        "mcnemar": None,
        "items_needed": None,
    }
    if spec["fn"] in EXACT_MATCH:
        row.update(_exact_match(spec["fn"], preds_a, preds_b, targets, groups, options))
    return row


def _run_info(path: Path, results: dict[str, Any], n_items: int, only: list[str]) -> dict[str, Any]:
    return {
        "path": str(path),
        "model": results.get("model"),
        "n_items": n_items,
        "n_only_here": len(only),
        "only_here_ids": only[:_SHOWN_IDS],
    }


def compare_runs(run_a: Path, run_b: Path, n_resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Compare two runs of one benchmark on the items they share (matched by id); a JSON-ready dict.

    Metrics are recomputed on the shared items, so values can differ from each run's own results.json.
    Targets and groups come from run A; runs whose targets disagree on a shared item are refused.
    """
    run_a, run_b = Path(run_a), Path(run_b)
    results_a = _read_json(run_a / "results.json")
    results_b = _read_json(run_b / "results.json")
    bench_a, bench_b = results_a.get("benchmark"), results_b.get("benchmark")
    if bench_a != bench_b:
        raise MedlensError(
            f"cannot compare runs of different benchmarks: {bench_a!r} ({run_a}) vs {bench_b!r} ({run_b})"
        )
    samples_a = _read_samples(run_a / "samples.jsonl")
    samples_b = _read_samples(run_b / "samples.jsonl")
    common = [key for key in samples_a if key in samples_b]
    only_a = [key for key in samples_a if key not in samples_b]
    only_b = [key for key in samples_b if key not in samples_a]
    if not common:
        raise MedlensError(f"the runs {run_a} and {run_b} have no item id in common")
    _check_targets(common, samples_a, samples_b)
    preds_a = [samples_a[k].get("prediction") for k in common]
    preds_b = [samples_b[k].get("prediction") for k in common]
    targets = [samples_a[k].get("target") for k in common]
    raw_groups = [samples_a[k].get("group") for k in common]
    groups = raw_groups if any(g is not None for g in raw_groups) else None
    specs = _metric_specs(results_a, run_a / "results.json")
    warnings = []
    if results_b.get("metric_specs") and results_b["metric_specs"] != results_a.get("metric_specs"):
        warnings.append("the runs list different metrics; run A's metric definitions are used for both")
    metrics = [_compare_metric(s, preds_a, preds_b, targets, groups, n_resamples, seed) for s in specs]
    return {
        "benchmark": bench_a,
        "run_a": _run_info(run_a, results_a, len(samples_a), only_a),
        "run_b": _run_info(run_b, results_b, len(samples_b), only_b),
        "n_common": len(common),
        "n_only_a": len(only_a),
        "n_only_b": len(only_b),
        "n_resamples": n_resamples,
        "seed": seed,
        "confidence": CONFIDENCE,
        "metrics": metrics,
        "warnings": warnings,
    }


def _check_targets(common: list[str], samples_a: dict, samples_b: dict) -> None:
    differ = [k for k in common if samples_a[k].get("target") != samples_b[k].get("target")]
    if differ:
        raise MedlensError(
            f"the runs disagree on the target of {len(differ)} shared item(s) (first: {differ[0]!r}); "
            "they were not run on the same data"
        )


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def _fmt_p(value: float | None) -> str:
    if value is None:
        return "-"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _metric_cells(row: dict[str, Any]) -> list[str]:
    interval = f"[{_fmt(row['ci_low'], True)}, {_fmt(row['ci_high'], True)}]"
    test = row.get("mcnemar")
    mcnemar = f"{_fmt_p(test['p_value'])} (b={test['b']}, c={test['c']})" if test else "-"
    needed = row.get("items_needed")
    return [
        row["name"],
        _fmt(row["value_a"]),
        _fmt(row["value_b"]),
        _fmt(row["diff"], True),
        interval,
        _fmt_p(row["p_value"]),
        mcnemar,
        "-" if needed is None else str(needed),
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return lines


def format_comparison(result: dict[str, Any]) -> str:
    """A readable text table of :func:`compare_runs`'s result."""
    a, b = result["run_a"], result["run_b"]
    level = round(100 * result["confidence"])
    lines = [
        f"benchmark: {result['benchmark']}",
        f"A: {a['model']}  ({a['path']})",
        f"B: {b['model']}  ({b['path']})",
        f"items compared: {result['n_common']}  (only in A: {a['n_only_here']}, only in B: {b['n_only_here']})",
        "",
    ]
    header = ["metric", "A", "B", "A-B", f"{level}% CI", "p (bootstrap)", "McNemar p", "items needed"]
    lines += _table(header, [_metric_cells(row) for row in result["metrics"]])
    lines += [
        "",
        f"paired bootstrap over items ({result['n_resamples']} resamples, seed {result['seed']}); "
        "items needed: paired items for McNemar's test to detect the observed difference "
        "(alpha 0.05, power 0.8, Connor 1987)",
    ]
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)
