"""Linear probe on MedSigLIP embeddings: logistic regression, stratified k-fold cross-validation, and the
metrics of the out-of-fold predictions with 95% bootstrap intervals from :mod:`medlens.metrics.stats`.

Every item is predicted by a model that never saw it, so the metrics estimate performance on new studies of
the same kind. The fitted probe (on all items) is saved as plain arrays (``.npz`` read with
``allow_pickle=False``; a pickled estimator, as joblib writes, can run code when loaded, and skops is not a
dependency): features are standardised inside the pipeline, and the scaler is folded into the linear weights.
"""

from __future__ import annotations

import warnings as warnings_module
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medlens import __version__
from medlens.errors import InputError, MedlensError
from medlens.files import write_atomic
from medlens.metrics.functions import MetricFn, accuracy, multilabel_f1_macro
from medlens.metrics.stats import bootstrap_ci
from medlens.registry import Registry
from medlens.siglip.zeroshot import sigmoid, softmax

DEFAULT_FOLDS = 5
DEFAULT_C = 1.0
MAX_ITER = 2000


def roc_auc(scores: Sequence[float], targets: Sequence[int], groups: Sequence | None = None, **_: Any) -> float:
    """Area under the ROC curve of ``scores`` for binary ``targets`` (1 positive), ties counted half
    (the Mann-Whitney statistic, as ``sklearn.metrics.roc_auc_score``); NaN without both classes."""
    from scipy.stats import rankdata

    y = np.asarray(targets, dtype=bool)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class ProbeMetric:
    """A metric of the out-of-fold predictions: which engine function, what it reads, when it applies."""

    fn: MetricFn
    #: (predicted class codes, out-of-fold probabilities, true class codes) -> (predictions, targets) for ``fn``
    inputs: Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[list, list]]
    #: number of classes -> whether the metric is defined
    applies: Callable[[int], bool] = lambda n_classes: True
    options: Callable[[int], dict[str, Any]] = lambda n_classes: {}


def _as_labels(predicted: np.ndarray, proba: np.ndarray, truth: np.ndarray) -> tuple[list, list]:
    return [str(p) for p in predicted], [str(t) for t in truth]


def _positive_scores(predicted: np.ndarray, proba: np.ndarray, truth: np.ndarray) -> tuple[list, list]:
    return proba[:, 1].tolist(), [int(t == 1) for t in truth]


#: probe metrics by output name; classes are compared as codes ("0", "1" ...), so case never merges them
PROBE_METRICS: Registry[ProbeMetric] = Registry("probe metric")
PROBE_METRICS.add("accuracy", ProbeMetric(accuracy, _as_labels))
PROBE_METRICS.add(
    "macro_f1",
    ProbeMetric(multilabel_f1_macro, _as_labels, options=lambda k: {"labels": [str(i) for i in range(k)]}),
)
PROBE_METRICS.add("roc_auc", ProbeMetric(roc_auc, _positive_scores, applies=lambda k: k == 2))


class ProbeModelError(InputError):
    """A probe given embeddings of another model (fingerprint or dimension differ) than it was trained on."""


@dataclass
class LinearProbe:
    """A fitted probe as plain arrays: ``decision = X @ coef.T + intercept`` (one row of ``coef`` when binary),
    with the identity of the embedding model (name, fingerprint) and the preparation recipe of its studies
    (empty when trained from an embedding file)."""

    classes: list[str]
    coef: np.ndarray
    intercept: np.ndarray
    model: str = ""
    fingerprint: str = ""
    recipe: str = ""

    @property
    def dim(self) -> int:
        return int(self.coef.shape[1])

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """``(n, n_classes)`` class probabilities, columns in :attr:`classes` order."""
        x = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
        if x.shape[1] != self.dim:
            raise MedlensError(f"embeddings of dimension {x.shape[1]} given to a probe of dimension {self.dim}")
        decision = x @ self.coef.T + self.intercept
        if len(self.classes) == 2:
            positive = sigmoid(decision[:, 0])
            return np.column_stack([1.0 - positive, positive])
        return softmax(decision)

    def predict(self, embeddings: np.ndarray) -> list[str]:
        return [self.classes[i] for i in np.argmax(self.predict_proba(embeddings), axis=1)]

    def check_model(self, model: str, fingerprint: str, dim: int, path: str | Path = "") -> None:
        """Refuse embeddings of another model: the fingerprint (or the dimension) must be the probe's own."""
        if int(dim) != self.dim or (self.fingerprint and fingerprint != self.fingerprint):
            raise ProbeModelError(
                f"the probe was trained on embeddings of model {self.model!r} (fingerprint {self.fingerprint}, "
                f"dimension {self.dim}), not of {model!r} (fingerprint {fingerprint}, dimension {dim}); "
                f"use --model {self.model} or train a probe on this model",
                str(path) or None,
            )

    def apply(self, embeddings: np.ndarray) -> list[dict[str, Any]]:
        """Per row: the predicted label and the probability of every class."""
        proba = self.predict_proba(embeddings)
        return [
            {
                "label": self.classes[int(np.argmax(row))],
                "probabilities": {c: round(float(p), 6) for c, p in zip(self.classes, row, strict=True)},
            }
            for row in proba
        ]

    def save(self, path: str | Path) -> Path:
        """Write the probe as ``.npz`` (atomically: a temporary file renamed into place)."""
        return write_atomic(
            path,
            lambda handle: np.savez(
                handle,
                classes=np.asarray(self.classes, dtype=str),
                coef=self.coef,
                intercept=self.intercept,
                model=np.asarray(self.model),
                fingerprint=np.asarray(self.fingerprint),
                recipe=np.asarray(self.recipe),
                medlens_version=np.asarray(__version__),
            ),
        )

    @classmethod
    def load(cls, path: str | Path) -> LinearProbe:
        try:
            with np.load(Path(path), allow_pickle=False) as data:
                return cls(
                    [str(c) for c in data["classes"]],
                    np.asarray(data["coef"], dtype=np.float64),
                    np.asarray(data["intercept"], dtype=np.float64),
                    str(data["model"]),
                    str(data["fingerprint"]),
                    str(data["recipe"]) if "recipe" in data else "",
                )
        except FileNotFoundError:
            raise InputError("no such probe file", str(path)) from None
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"not a medlens probe file ({exc})", str(path)) from None


@dataclass
class ProbeReport:
    """Cross-validated results: metrics with intervals, class counts, out-of-fold predictions."""

    classes: list[str]
    counts: dict[str, int]
    folds: int
    metrics: dict[str, dict[str, float | int | None]]
    predictions: list[str]
    probabilities: np.ndarray
    warnings: list[str] = field(default_factory=list)
    positive_class: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "n": len(self.predictions),
            "classes": self.classes,
            "counts": self.counts,
            "folds": self.folds,
            "metrics": self.metrics,
        }
        if self.positive_class is not None:
            out["roc_auc_positive_class"] = self.positive_class
        out["warnings"] = self.warnings
        return out


def _check(embeddings: np.ndarray, labels: Sequence[str]) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Validated features, sorted class names and class codes; clear errors for what cannot be probed."""
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(labels):
        raise MedlensError(f"{len(labels)} labels for embeddings of shape {x.shape}")
    if not np.isfinite(x).all():
        raise MedlensError("the embeddings contain NaN or infinite values")
    counts = Counter(str(label) for label in labels)
    if len(counts) < 2:
        found = ", ".join(repr(c) for c in counts) or "none"
        raise InputError(f"a probe needs at least 2 classes; the labels have {len(counts)} ({found})")
    single = sorted(c for c, n in counts.items() if n < 2)
    if single:
        raise InputError(
            f"class(es) {', '.join(repr(c) for c in single)} have a single item; cross-validation needs at least "
            "2 per class"
        )
    classes = sorted(counts)
    codes = np.asarray([classes.index(str(label)) for label in labels])
    return x, classes, codes


def _estimator(c: float) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=MAX_ITER))


def _convergence_notes(caught: list[warnings_module.WarningMessage]) -> list[str]:
    from sklearn.exceptions import ConvergenceWarning

    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        return [f"the logistic regression did not converge in {MAX_ITER} iterations (try a smaller --c)"]
    return []


def cross_validate(
    embeddings: np.ndarray,
    labels: Sequence[str],
    folds: int = DEFAULT_FOLDS,
    c: float = DEFAULT_C,
    seed: int = 0,
    n_resamples: int = 2000,
    confidence: float = 0.95,
) -> ProbeReport:
    """Out-of-fold predictions of a stratified k-fold probe and their metrics with bootstrap intervals.

    Folds are reduced (with a warning) to the size of the smallest class.
    """
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    if folds < 2:
        raise MedlensError(f"cross-validation needs at least 2 folds, not {folds}")
    x, classes, codes = _check(embeddings, labels)
    counts = {name: int(np.count_nonzero(codes == i)) for i, name in enumerate(classes)}
    notes = []
    smallest = min(counts, key=counts.__getitem__)
    n_folds = min(folds, counts[smallest])
    if n_folds < folds:
        notes.append(f"class {smallest!r} has {counts[smallest]} items: {n_folds} folds instead of {folds}")
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings_module.catch_warnings(record=True) as caught:
        warnings_module.simplefilter("always")
        proba = cross_val_predict(_estimator(c), x, codes, cv=splitter, method="predict_proba")
    notes += _convergence_notes(caught)
    predicted = np.argmax(proba, axis=1)
    metrics = {}
    for name in PROBE_METRICS:
        metric = PROBE_METRICS.get(name)
        if not metric.applies(len(classes)):
            continue
        preds, targets = metric.inputs(predicted, proba, codes)
        options = metric.options(len(classes))
        interval = bootstrap_ci(
            metric.fn, preds, targets, n_resamples=n_resamples, confidence=confidence, seed=seed, **options
        )
        metrics[name] = {
            "value": _finite(interval.value),
            "ci_low": _finite(interval.low),
            "ci_high": _finite(interval.high),
            "n": interval.n,
        }
    return ProbeReport(
        classes,
        counts,
        n_folds,
        metrics,
        [classes[i] for i in predicted],
        proba,
        notes,
        positive_class=classes[1] if len(classes) == 2 else None,
    )


def _finite(value: float) -> float | None:
    return None if value != value else round(float(value), 6)  # NaN -> None (JSON null)


def fit_probe(
    embeddings: np.ndarray,
    labels: Sequence[str],
    c: float = DEFAULT_C,
    model: str = "",
    fingerprint: str = "",
    recipe: str = "",
) -> LinearProbe:
    """Fit the probe on all items and return it as plain arrays (scaler folded into the weights)."""
    x, classes, codes = _check(embeddings, labels)
    with warnings_module.catch_warnings():
        warnings_module.simplefilter("ignore")
        pipeline = _estimator(c).fit(x, codes)
    scaler, regression = pipeline[0], pipeline[-1]
    coef = regression.coef_ / scaler.scale_
    intercept = regression.intercept_ - coef @ scaler.mean_
    return LinearProbe(classes, coef, intercept, model, fingerprint, recipe)
