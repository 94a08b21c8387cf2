"""Uncertainty for benchmark results: bootstrap intervals, paired bootstrap differences, McNemar's exact test
and the number of paired items needed to tell two models apart.

The bootstrap resamples ITEMS with replacement and recomputes the metric on every resample, so macro
metrics (per condition, per label) are recomputed, not averaged from item scores. Registered metrics are
recomputed from resampled sums of their :class:`~medlens.metrics.functions.Parts` (vectorised); any other
metric function is called once per resample. Both routes draw the same indices for a seed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from medlens.metrics.functions import MetricFn, Parts, parts_of

#: at most this many resampled item indices are held at once (memory bound of the vectorised bootstrap)
CHUNK_ELEMENTS = 2_000_000


class Interval(NamedTuple):
    """A metric value with its bootstrap percentile interval over ``n`` items."""

    value: float
    low: float
    high: float
    n: int


class DiffInterval(NamedTuple):
    """Metric of run A minus metric of run B, its paired bootstrap interval and two-sided p-value."""

    diff: float
    low: float
    high: float
    p_value: float


class McNemar(NamedTuple):
    """Discordant pairs (``b``: A right and B wrong, ``c``: the reverse) and the exact two-sided p-value."""

    b: int
    c: int
    p_value: float


def resample_indices(n: int, n_resamples: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Item indices of the bootstrap resamples, in chunks of rows ``(r, n)``; the same for a seed whatever
    the chunk size (one ``Generator.integers`` call per resample)."""
    rng = np.random.default_rng(seed)
    rows = max(1, min(n_resamples, CHUNK_ELEMENTS // max(n, 1)))
    for start in range(0, n_resamples, rows):
        count = min(rows, n_resamples - start)
        yield np.stack([rng.integers(0, n, size=n) for _ in range(count)])


def _resampled_sums(parts: Parts, idx: np.ndarray) -> np.ndarray:
    """Per-resample, per-group sums of the item statistics, ``(r, n_groups, k)``."""
    r, k, g = len(idx), parts.stats.shape[1], parts.n_groups
    keys = (np.arange(r)[:, None] * g + parts.codes[idx]).ravel()
    out = np.empty((r * g, k))
    for j in range(k):
        out[:, j] = np.bincount(keys, weights=parts.stats[idx, j].ravel(), minlength=r * g)
    return out.reshape(r, g, k)


def _take(values: Sequence | None, idx: np.ndarray) -> list | None:
    return None if values is None else [values[i] for i in idx]


def _on_resamples(
    metric_fn: MetricFn, predictions: Sequence, targets: Sequence, groups: Sequence | None, options: dict[str, Any]
) -> Callable[[np.ndarray], np.ndarray]:
    """A function giving the metric on each resample of a chunk of indices ``(r, n)``: resampled sums of the
    metric's parts (computed once) for registered metrics, else one call of ``metric_fn`` per resample."""
    parts = parts_of(metric_fn, predictions, targets, groups, **options)
    if parts is not None:
        return lambda idx: np.asarray(parts.reduce(_resampled_sums(parts, idx)), dtype=float)

    def call(idx: np.ndarray) -> np.ndarray:
        rows = [metric_fn(_take(predictions, r), _take(targets, r), _take(groups, r), **options) for r in idx]
        return np.asarray(rows, dtype=float)

    return call


def _percentiles(values: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval, ignoring resamples where the metric is undefined (NaN)."""
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def _check_confidence(confidence: float, n_resamples: int) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, not {n_resamples}")


def bootstrap_values(
    metric_fn: MetricFn,
    predictions: Sequence,
    targets: Sequence,
    groups: Sequence | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
    **options: Any,
) -> np.ndarray:
    """The metric recomputed on ``n_resamples`` resamples of the items (NaN where it is undefined)."""
    on = _on_resamples(metric_fn, predictions, targets, groups, options)
    return np.concatenate([on(idx) for idx in resample_indices(len(targets), n_resamples, seed)])


def bootstrap_ci(
    metric_fn: MetricFn,
    predictions: Sequence,
    targets: Sequence,
    groups: Sequence | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    **options: Any,
) -> Interval:
    """The metric and its percentile bootstrap interval (items resampled with replacement; deterministic per
    seed). Resamples on which the metric is undefined (NaN) are left out; no item gives NaN throughout."""
    _check_confidence(confidence, n_resamples)
    n = len(targets)
    if len(predictions) != n:
        raise ValueError(f"{len(predictions)} predictions but {n} targets")
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0)
    value = float(metric_fn(predictions, targets, groups, **options))
    values = bootstrap_values(metric_fn, predictions, targets, groups, n_resamples, seed, **options)
    low, high = _percentiles(values, confidence)
    return Interval(value, low, high, n)


def paired_bootstrap_diff(
    metric_fn: MetricFn,
    preds_a: Sequence,
    preds_b: Sequence,
    targets: Sequence,
    groups: Sequence | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    **options: Any,
) -> DiffInterval:
    """Metric(A) - metric(B) with a paired bootstrap: each resample draws the SAME items for both runs.

    The interval is the percentile interval of the resampled differences. The two-sided p-value inverts that
    interval: ``p = min(1, 2 * min(P*(d <= 0), P*(d >= 0)))``, with ``P*`` the share of resampled
    differences at or below (above) 0, each count taken as ``(count + 1) / (R + 1)`` so p is never 0. Thus
    p < 1 - confidence about when the interval excludes 0; identical runs give p = 1. The smallest p that
    ``R`` resamples can show is ``2 / (R + 1)``.
    """
    _check_confidence(confidence, n_resamples)
    n = len(targets)
    if len(preds_a) != n or len(preds_b) != n:
        raise ValueError(f"{len(preds_a)} and {len(preds_b)} predictions but {n} targets")
    if n == 0:
        return DiffInterval(float("nan"), float("nan"), float("nan"), float("nan"))
    diff = float(metric_fn(preds_a, targets, groups, **options)) - float(metric_fn(preds_b, targets, groups, **options))
    on_a = _on_resamples(metric_fn, preds_a, targets, groups, options)
    on_b = _on_resamples(metric_fn, preds_b, targets, groups, options)
    values = np.concatenate([on_a(idx) - on_b(idx) for idx in resample_indices(n, n_resamples, seed)])
    low, high = _percentiles(values, confidence)
    return DiffInterval(diff, low, high, _bootstrap_p(values))


def _bootstrap_p(diffs: np.ndarray) -> float:
    finite = diffs[~np.isnan(diffs)]
    if finite.size == 0:
        return float("nan")
    total = finite.size + 1
    below = (np.count_nonzero(finite <= 0) + 1) / total
    above = (np.count_nonzero(finite >= 0) + 1) / total
    return float(min(1.0, 2 * min(below, above)))


def mcnemar_exact(correct_a: Sequence[bool], correct_b: Sequence[bool]) -> McNemar:
    """McNemar's exact test on paired right/wrong outcomes: a two-sided binomial test (p = 1/2) of ``b``
    among the ``b + c`` discordant pairs (``scipy.stats.binomtest``); p = 1 when there is none."""
    from scipy.stats import binomtest

    a = np.asarray(correct_a, dtype=bool)
    b_arr = np.asarray(correct_b, dtype=bool)
    if a.shape != b_arr.shape:
        raise ValueError(f"{a.size} outcomes for A but {b_arr.size} for B")
    b = int(np.count_nonzero(a & ~b_arr))
    c = int(np.count_nonzero(~a & b_arr))
    if b + c == 0:
        return McNemar(b, c, 1.0)
    return McNemar(b, c, float(binomtest(b, b + c, 0.5).pvalue))


def items_needed_paired(
    p_a: float, p_b: float, discordant: float | None = None, alpha: float = 0.05, power: float = 0.8
) -> int | None:
    """Paired items needed for McNemar's test to detect the accuracy difference ``p_a - p_b`` (Connor 1987).

    With ``delta = p_a - p_b`` (= p10 - p01, the difference of the discordant proportions) and ``psi`` the
    share of discordant pairs (p10 + p01; ``discordant``)::

        n = (z(1 - alpha/2) * sqrt(psi) + z(power) * sqrt(psi - delta**2))**2 / delta**2

    rounded up, where ``z`` is the standard normal quantile. Without ``discordant`` the runs are assumed to
    err independently: ``psi = p_a (1 - p_b) + p_b (1 - p_a)`` (usually more than real, correlated models
    show, so more items). Returns None when ``delta`` is 0.
    """
    from scipy.stats import norm

    delta = p_a - p_b
    if delta == 0:
        return None
    psi = p_a * (1 - p_b) + p_b * (1 - p_a) if discordant is None else discordant
    if not abs(delta) - 1e-9 <= psi <= 1 + 1e-9:
        raise ValueError(f"the discordant share must lie between |p_a - p_b| = {abs(delta):g} and 1, not {psi:g}")
    psi = min(max(psi, abs(delta)), 1.0)
    z_alpha, z_power = norm.ppf(1 - alpha / 2), norm.ppf(power)
    n = (z_alpha * math.sqrt(psi) + z_power * math.sqrt(max(psi - delta**2, 0.0))) ** 2 / delta**2
    return math.ceil(n - 1e-9)
