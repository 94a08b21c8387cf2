"""Benchmark metrics, all with one signature: ``fn(predictions, targets, groups=None, **options) -> float``.

Every metric is computed from :class:`Parts`: a few numbers per item (for example "correct" and "counted")
whose sums, per group, determine the value. The metric functions reduce those sums once; the bootstrap in
:mod:`medlens.metrics.stats` reduces resampled sums, so an interval is the same metric recomputed on each
resample (macro metrics included) without calling Python code per resample.

Each metric declares its options as a :class:`MetricOptions` model (unknown options and wrong types are
errors, in a benchmark YAML file and in Python alike); :func:`metric_options` gives it by name.

Conventions (scikit-learn's ``zero_division=0``): an F1 whose precision and recall are both undefined (no
positive target and no positive prediction for a label, a condition or the whole set) is 0. A metric of no
item at all is NaN. A prediction of ``None`` (the output could not be parsed) is always a wrong answer.
"""

from __future__ import annotations

import inspect
import re
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medlens.prep.boxes import mean_iou as boxes_mean_iou
from medlens.registry import Registry

MetricFn = Callable[..., float]
Reducer = Callable[[np.ndarray], np.ndarray]

#: registered metric functions, by the name benchmark YAML files use in ``metrics: [{fn: ...}]``
METRICS: Registry[MetricFn] = Registry("metric")
#: metrics whose per-item scores are right (1) / wrong (0) answers, so McNemar's test applies
EXACT_MATCH = frozenset({"accuracy", "closed_accuracy", "normalized_match"})

_ARTICLES = frozenset({"a", "an", "the"})
_PUNCT = re.compile(r"[^\w\s]|_")
_WORD = re.compile(r"[a-z0-9]+")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass(frozen=True)
class Parts:
    """Per-item statistics whose per-group sums determine a metric.

    ``stats`` is ``(n, k)``; ``codes`` gives each item's group in ``0..n_groups-1``; ``reduce`` maps sums of
    shape ``(..., n_groups, k)`` to values of shape ``(...)``. With ``item_mean`` the metric is the mean of
    the item scores ``stats[:, 0] / stats[:, 1]`` over items whose ``stats[:, 1]`` is positive.
    """

    stats: np.ndarray
    codes: np.ndarray
    n_groups: int
    reduce: Reducer
    item_mean: bool = False

    @property
    def n(self) -> int:
        return len(self.stats)

    def sums(self) -> np.ndarray:
        """Per-group sums of the statistics, ``(n_groups, k)``."""
        out = np.zeros((self.n_groups, self.stats.shape[1]))
        np.add.at(out, self.codes, self.stats)
        return out

    def value(self) -> float:
        if self.n == 0:
            return float("nan")
        return float(self.reduce(self.sums()[None])[0])


# ---------------------------------------------------------------- options

#: fields of a lab row that ``fields`` may name (the lab-extract payload's columns)
LabField = Literal["name", "result", "unit", "range", "panel", "method", "specimen", "sample_collection_time"]
LAB_FIELDS: tuple[LabField, ...] = ("name", "result", "unit")


class MetricOptions(BaseModel):
    """The options a metric takes (none by default): unknown names and wrong types are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class LabelOptions(MetricOptions):
    """Multi-label F1: the label set (default: every label seen in predictions and targets)."""

    labels: Annotated[list[str] | None, Field(strict=False, min_length=1)] = None


class QuestionOptions(MetricOptions):
    """Tokenised F1: every item, or only the open questions (targets that are not yes/no); and the token
    F1 definition, medlens's own or lmms-eval's (docs/evaluation.md, Tokenised F1)."""

    questions: Literal["all", "open"] = "all"
    definition: Literal["medlens", "lmms-eval"] = "medlens"


class IouOptions(MetricOptions):
    """Mean IoU: match boxes by label or not, and which box key to read."""

    by_label: bool = True
    key: Literal["box_2d", "box_px"] = "box_2d"


class LabOptions(MetricOptions):
    """Lab row F1: the fields on which a predicted and a target row must agree."""

    fields: Annotated[list[LabField], Field(strict=False, min_length=1)] = Field(
        default_factory=lambda: list(LAB_FIELDS)
    )


class MetricOptionsError(ValueError):
    """An option a metric does not take, or a value of the wrong type."""


PartsFn = Callable[..., Parts]
_PARTS: dict[MetricFn, PartsFn] = {}
_OPTIONS: dict[MetricFn, type[MetricOptions]] = {}
_NAMES: dict[MetricFn, str] = {}


def _register(name: str, fn: MetricFn, parts_fn: PartsFn, options: type[MetricOptions] = MetricOptions) -> None:
    """Register ``fn`` under ``name``; its parts function takes exactly the options model's fields."""
    taken = list(inspect.signature(parts_fn).parameters)[3:]
    if set(taken) != set(options.model_fields):
        raise TypeError(f"metric {name}: parts take {taken}, options declare {list(options.model_fields)}")
    METRICS.add(name, fn)
    _PARTS[fn], _OPTIONS[fn], _NAMES[fn] = parts_fn, options, name


def metric_options(name: str) -> type[MetricOptions]:
    """The options model of the metric registered as ``name`` (did-you-mean error otherwise)."""
    return _OPTIONS[METRICS.get(name)]


def check_options(fn: MetricFn, options: Mapping[str, Any]) -> MetricOptions:
    """The validated options of a registered metric function; :class:`MetricOptionsError` when bad."""
    try:
        return _OPTIONS[fn].model_validate(dict(options))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        known = ", ".join(_OPTIONS[fn].model_fields) or "none"
        reason = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
        raise MetricOptionsError(f"metric {_NAMES[fn]}: {where}: {reason} (options: {known})") from None


def parts_of(
    metric_fn: MetricFn, predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any
) -> Parts | None:
    """The :class:`Parts` of a registered metric function, or None for a function medlens does not know."""
    parts_fn = _PARTS.get(metric_fn)
    if parts_fn is None:
        return None
    settings = check_options(metric_fn, options)
    _check_lengths(predictions, targets, groups)
    return parts_fn(predictions, targets, groups, **dict(settings))


def _value(fn: MetricFn, predictions: Sequence, targets: Sequence, groups: Sequence | None, options: dict) -> float:
    parts = parts_of(fn, predictions, targets, groups, **options)
    assert parts is not None  # only registered metrics call this
    return parts.value()


def item_scores(
    name: str, predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any
) -> list[float | None] | None:
    """Per-item scores of the metric ``name`` when it is a mean of them, else None (macro and pooled metrics).

    An item the metric does not score (an open question for ``closed_accuracy``, an item without target
    boxes for ``mean_iou``) gets ``None``.
    """
    parts = parts_of(METRICS.get(name), predictions, targets, groups, **options)
    if parts is None or not parts.item_mean:
        return None
    return [float(s / w) if w > 0 else None for s, w in parts.stats[:, :2]]


# ---------------------------------------------------------------- reducers


def _safe_div(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, empty, dtype=float)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _ratio(empty: float) -> Reducer:
    """``sum(stats[:, 0]) / sum(stats[:, 1])`` (one group); ``empty`` when the denominator is 0."""

    def reduce(sums: np.ndarray) -> np.ndarray:
        return _safe_div(sums[..., 0, 0], sums[..., 0, 1], empty)

    return reduce


def _group_mean(per_group: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean of per-group values over the groups that have items (NaN when none has)."""
    count = present.sum(axis=-1)
    total = np.where(present, per_group, 0.0).sum(axis=-1)
    return _safe_div(total, count, float("nan"))


def _reduce_macro_accuracy(sums: np.ndarray) -> np.ndarray:
    correct, count = sums[..., 0], sums[..., 1]
    return _group_mean(_safe_div(correct, count, 0.0), count > 0)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return _safe_div(2 * tp, 2 * tp + fp + fn, 0.0)


def _reduce_group_f1(sums: np.ndarray) -> np.ndarray:
    tp, fp, fn, count = (sums[..., j] for j in range(4))
    return _group_mean(_f1(tp, fp, fn), count > 0)


def _reduce_label_f1(sums: np.ndarray) -> np.ndarray:
    if sums.shape[-1] == 0:  # no label at all
        return np.full(sums.shape[:-2], float("nan"))
    per_label = sums[..., 0, :].reshape(*sums.shape[:-2], -1, 3)
    return _f1(per_label[..., 0], per_label[..., 1], per_label[..., 2]).mean(axis=-1)


# ---------------------------------------------------------------- helpers


def _check_lengths(predictions: Sequence, targets: Sequence, groups: Sequence | None) -> None:
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    if groups is not None and len(groups) != len(targets):
        raise ValueError(f"{len(groups)} groups but {len(targets)} targets")


def _codes(groups: Sequence | None, n: int) -> tuple[np.ndarray, int]:
    """Group codes ``0..G-1`` in order of first appearance (everything in one group when ``groups`` is None)."""
    if groups is None:
        return np.zeros(n, dtype=np.intp), 1
    index: dict[Hashable, int] = {}
    codes = [index.setdefault(_hashable(g), len(index)) for g in groups]
    return np.asarray(codes, dtype=np.intp).reshape(n), max(len(index), 1)


def _hashable(value: Any) -> Hashable:
    return value if isinstance(value, Hashable) else repr(value)


def _ungrouped(rows: Iterable[Sequence[float]] | np.ndarray, k: int, reduce: Reducer, item_mean: bool = False) -> Parts:
    stats = np.asarray(rows if isinstance(rows, np.ndarray) else list(rows), dtype=float)
    stats = stats.reshape(len(stats), k)
    return Parts(stats, np.zeros(len(stats), dtype=np.intp), 1, reduce, item_mean)


def _mean_parts(scores: Iterable[float | None]) -> Parts:
    """Parts of a mean of item scores; ``None`` scores are left out of the mean."""
    rows = [(0.0, 0.0) if s is None else (float(s), 1.0) for s in scores]
    return _ungrouped(rows, 2, _ratio(float("nan")), item_mean=True)


def _correct(prediction: Any, target: Any) -> bool:
    return prediction is not None and prediction == target


def _words(text: Any) -> list[str]:
    """Lower case, punctuation to spaces, split on white space."""
    return _PUNCT.sub(" ", str(text).lower()).split()


def _yes_no(value: Any) -> str | None:
    """``"yes"`` or ``"no"`` (case and surrounding spaces ignored; booleans too), else None."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).strip().lower() if value is not None else ""
    return text if text in ("yes", "no") else None


# ---------------------------------------------------------------- accuracy family


def _accuracy_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    return _mean_parts(float(_correct(p, t)) for p, t in zip(predictions, targets, strict=True))


def accuracy(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Share of items whose prediction equals the target exactly (``None`` predictions are wrong)."""
    return _value(accuracy, predictions, targets, groups, options)


def _macro_accuracy_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    codes, n_groups = _codes(groups, len(targets))
    stats = np.asarray([(float(_correct(p, t)), 1.0) for p, t in zip(predictions, targets, strict=True)])
    return Parts(stats.reshape(-1, 2), codes, n_groups, _reduce_macro_accuracy)


def macro_accuracy(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Mean over groups (conditions, findings) of the accuracy within each group.

    Without groups this is plain accuracy. Only groups that have items count (in a bootstrap resample too).
    """
    return _value(macro_accuracy, predictions, targets, groups, options)


def _binary_f1_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    codes, n_groups = _codes(groups, len(targets))
    rows = []
    for prediction, target in zip(predictions, targets, strict=True):
        truth = _yes_no(target) == "yes"
        said = _yes_no(prediction)
        positive = (not truth) if said is None else said == "yes"  # unparsed: the wrong answer
        rows.append((float(truth and positive), float(positive and not truth), float(truth and not positive), 1.0))
    stats = np.asarray(rows, dtype=float).reshape(-1, 4)
    return Parts(stats, codes, n_groups, _reduce_group_f1)


def binary_f1_macro_by_group(
    predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any
) -> float:
    """Binary F1 with "yes" positive within each group (condition), averaged over the groups (CT-RATE style).

    Answers are compared case-insensitively. A prediction that is not yes/no (``None``, unparsed) counts as
    the wrong answer: "no" when the target is yes, "yes" when it is no. A condition without any positive
    target or positive prediction has F1 0 (scikit-learn's ``zero_division=0``). Without groups: binary F1.
    """
    return _value(binary_f1_macro_by_group, predictions, targets, groups, options)


def _closed_accuracy_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    scores = []
    for prediction, target in zip(predictions, targets, strict=True):
        truth = _yes_no(" ".join(_words(target))) if target is not None else None
        scores.append(None if truth is None else float(_said_yes_no(prediction) == truth))
    return _mean_parts(scores)


def _said_yes_no(prediction: Any) -> str | None:
    """The yes/no of a free-text answer: its first word when that is yes or no, else the only one it uses."""
    if prediction is None:
        return None
    words = _words(prediction)
    if words and words[0] in ("yes", "no"):
        return words[0]
    used = {w for w in words if w in ("yes", "no")}
    return used.pop() if len(used) == 1 else None


def closed_accuracy(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Accuracy over the closed questions only: items whose target is "yes" or "no" (VQA-RAD, SLAKE).

    The prediction's answer is its first word when that is yes/no, else the only one of yes/no it contains;
    anything else is wrong. NaN when no target is yes/no.
    """
    return _value(closed_accuracy, predictions, targets, groups, options)


# ---------------------------------------------------------------- multi-label F1


def _label_key(label: Any) -> str:
    return " ".join(str(label).split()).casefold()


def _label_set(value: Any) -> set[str]:
    if value is None:
        return set()
    if isinstance(value, str):
        return {_label_key(value)}
    return {_label_key(v) for v in value if v is not None}


def _label_counts(predictions: Sequence, targets: Sequence, labels: Sequence | None) -> np.ndarray:
    """``(n, L, 3)``: per item and label, true positive, false positive and false negative (0/1)."""
    if labels is None:
        found = set().union(*(_label_set(v) for v in (*predictions, *targets)))
        labels = sorted(found)
    keys = list(dict.fromkeys(_label_key(label) for label in labels))
    out = np.zeros((len(targets), len(keys), 3))
    for i, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        said, truth = _label_set(prediction), _label_set(target)
        for j, key in enumerate(keys):
            out[i, j] = (
                key in said and key in truth,
                key in said and key not in truth,
                key in truth and key not in said,
            )
    return out


def _multilabel_macro_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, labels: Sequence | None
) -> Parts:
    counts = _label_counts(predictions, targets, labels)
    return _ungrouped(counts.reshape(len(counts), -1), counts.shape[1] * 3, _reduce_label_f1)


def _multilabel_micro_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, labels: Sequence | None
) -> Parts:
    tp, fp, fn = np.moveaxis(_label_counts(predictions, targets, labels).sum(axis=1), -1, 0)
    return _ungrouped(zip(2 * tp, 2 * tp + fp + fn, strict=True), 2, _ratio(0.0))


def multilabel_f1_macro(
    predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any
) -> float:
    """F1 per label, averaged over the label set (option ``labels``; default: every label seen).

    Each item's prediction and target are collections of labels (case and spacing ignored; a string is one
    label; ``None`` is no label). Labels outside ``labels`` are ignored. A label that is in no target and no
    prediction scores F1 0 and still counts in the mean (scikit-learn ``f1_score(average="macro",
    zero_division=0)`` on ``MultiLabelBinarizer(classes=labels)`` outputs).
    """
    return _value(multilabel_f1_macro, predictions, targets, groups, options)


def multilabel_f1_micro(
    predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any
) -> float:
    """F1 of true/false positives and false negatives pooled over all items and labels (option ``labels``).

    0 when nothing is positive in targets or predictions (scikit-learn ``zero_division=0``).
    """
    return _value(multilabel_f1_micro, predictions, targets, groups, options)


# ---------------------------------------------------------------- text overlap


def _answer_tokens(text: Any) -> list[str]:
    """Lower case, punctuation to spaces, articles (a, an, the) removed."""
    return [w for w in _words(text) if w not in _ARTICLES]


def token_f1(prediction: Any, target: Any) -> float:
    """Token-level F1 of one answer (bag of words after :func:`_answer_tokens`); 0 for ``None``.

    Two answers without any token score 1 (both empty), one empty answer 0.
    """
    if prediction is None:
        return 0.0
    said, truth = _answer_tokens(prediction), _answer_tokens("" if target is None else target)
    if not said or not truth:
        return float(said == truth)
    common = sum((Counter(said) & Counter(truth)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(said), common / len(truth)
    return 2 * precision * recall / (precision + recall)


_BOXED = re.compile(r"\\boxed\{(.+?)\}")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _lmms_eval_tokens(text: str) -> set[str]:
    """lmms-eval's VQA tokens: lower case, every "." split off as its own token, whitespace split, as a set."""
    return set(text.lower().replace(".", " .").split())


def lmms_eval_token_f1(prediction: Any, target: Any) -> float:
    """lmms-eval's open-question token F1 (VQA-RAD/SLAKE tasks): the answer inside ``\\boxed{}`` or
    ``<answer>`` when present, lower-cased; F1 of the two token *sets* (repeats count once, articles and
    punctuation other than "." stay in their words); 0 when either side has no token or none is shared."""
    if prediction is None or target is None:
        return 0.0
    said = str(prediction)
    found = _BOXED.search(said) or _ANSWER_TAG.search(said)
    said = found.group(1) if found else said
    mine, theirs = _lmms_eval_tokens(said.strip()), _lmms_eval_tokens(str(target).strip())
    common = len(mine & theirs)
    if common == 0:
        return 0.0
    precision, recall = common / len(mine), common / len(theirs)
    return 2 * precision * recall / (precision + recall)


#: token F1 definitions, by the name the ``definition`` option takes
TOKEN_F1: dict[str, Callable[[Any, Any], float]] = {"medlens": token_f1, "lmms-eval": lmms_eval_token_f1}


def _tokenized_f1_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, questions: str, definition: str
) -> Parts:
    score = TOKEN_F1[definition]
    scores = []
    for prediction, target in zip(predictions, targets, strict=True):
        closed = target is not None and _yes_no(" ".join(_words(target))) is not None
        scores.append(None if questions == "open" and closed else score(prediction, target))
    return _mean_parts(scores)


def tokenized_f1(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Mean token-level F1 of answers (VQA-RAD, SLAKE).

    Option ``questions``: ``"all"`` (default: every item) or ``"open"`` (items whose target is not yes/no).
    Option ``definition``: ``"medlens"`` (default, :func:`token_f1`: lower case, punctuation and articles
    removed, repeated words counted, two empty answers 1) or ``"lmms-eval"`` (:func:`lmms_eval_token_f1`;
    lmms-eval scores open questions only, so pair it with ``questions: open`` to reproduce its number).
    """
    return _value(tokenized_f1, predictions, targets, groups, options)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences (dynamic programming, O(len a * len b))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l_item(prediction: Any, target: Any) -> float:
    """ROUGE-L F-measure (beta 1) of one text against its reference, on lower-cased ``[a-z0-9]+`` words."""
    if prediction is None or target is None:
        return 0.0
    said, truth = _WORD.findall(str(prediction).lower()), _WORD.findall(str(target).lower())
    lcs = lcs_length(said, truth) if said and truth else 0
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(said), lcs / len(truth)
    return 2 * precision * recall / (precision + recall)


def _rouge_l_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    return _mean_parts(rouge_l_item(p, t) for p, t in zip(predictions, targets, strict=True))


def rouge_l(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Mean over items of the ROUGE-L F-measure (longest common subsequence of words; no stemming)."""
    return _value(rouge_l, predictions, targets, groups, options)


def _normal_text(text: Any) -> str:
    """Lower case, punctuation to spaces, spaces collapsed, one leading article dropped."""
    words = _words(text)
    if words and words[0] in _ARTICLES:
        words = words[1:]
    return " ".join(words)


def match_item(prediction: Any, target: Any) -> float:
    """1.0 when a normalised synonym of ``target`` (a string or a list of them) equals the normalised
    prediction or appears in it as whole words, else 0.0."""
    if prediction is None or target is None:
        return 0.0
    said = f" {_normal_text(prediction)} "
    synonyms = [target] if isinstance(target, str) else list(target)
    for synonym in synonyms:
        norm = _normal_text(synonym) if synonym is not None else ""
        if norm and f" {norm} " in said:
            return 1.0
    return 0.0


def _normalized_match_parts(predictions: Sequence, targets: Sequence, groups: Sequence | None = None) -> Parts:
    return _mean_parts(match_item(p, t) for p, t in zip(predictions, targets, strict=True))


def normalized_match(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Share of open-ended answers (MedPix-style diagnoses) that name the target or one of its synonyms."""
    return _value(normalized_match, predictions, targets, groups, options)


# ---------------------------------------------------------------- localization


def _iou_item(prediction: Any, target: Any, by_label: bool, key: str) -> float | None:
    truth = [box for box in target or [] if _is_box(box, key)]
    if not truth:
        return None
    said = [box for box in prediction or [] if _is_box(box, key)]
    return boxes_mean_iou(said, truth, by_label=by_label, key=key)


def _is_box(box: Any, key: str) -> bool:
    return isinstance(box, Mapping) and isinstance(box.get(key), Sequence) and len(box[key]) == 4


def _mean_iou_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, by_label: bool, key: str
) -> Parts:
    return _mean_parts(_iou_item(p, t, by_label, key) for p, t in zip(predictions, targets, strict=True))


def mean_iou(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Mean over items of :func:`medlens.prep.boxes.mean_iou` (target boxes matched by label).

    Each prediction and target is a list of ``{"label", "box_2d"}`` boxes. An item without a prediction
    scores 0; an item without target boxes is left out. Options ``by_label`` (True) and ``key`` ("box_2d").
    """
    return _value(mean_iou, predictions, targets, groups, options)


# ---------------------------------------------------------------- lab rows


def _norm_name(value: Any) -> str:
    return re.sub(r"[\W_]+", "", str(value).casefold()) if value is not None else ""


def _norm_value(value: Any) -> str:
    """Case and spaces ignored; numbers compared as numbers ("5.0" = "5", "1,200" = "1200")."""
    text = "".join(str(value).casefold().split()) if value is not None else ""
    if _THOUSANDS.fullmatch(text):
        text = text.replace(",", "")
    if _NUMBER.fullmatch(text):
        try:
            return format(Decimal(text).normalize(), "f")
        except InvalidOperation:
            return text
    return text


def lab_row_key(row: Any, fields: Sequence[str] = LAB_FIELDS) -> tuple[str, ...]:
    """The normalised fields of a lab row by which predicted and target rows are matched."""
    if hasattr(row, "model_dump"):
        row = row.model_dump()
    if not isinstance(row, Mapping):
        return tuple("" for _ in fields)
    return tuple(_norm_name(row.get(f)) if f == "name" else _norm_value(row.get(f)) for f in fields)


def lab_counts(prediction: Any, target: Any, fields: Sequence[str] = LAB_FIELDS) -> tuple[int, int, int]:
    """``(tp, fp, fn)`` of one report: rows matched one-to-one on their normalised ``fields``."""
    said = Counter(lab_row_key(r, fields) for r in prediction or [])
    truth = Counter(lab_row_key(r, fields) for r in target or [])
    tp = sum((said & truth).values())
    return tp, sum(said.values()) - tp, sum(truth.values()) - tp


def _lab_rows(predictions: Sequence, targets: Sequence, fields: Sequence[str]) -> list[tuple[int, int, int]]:
    return [lab_counts(p, t, fields) for p, t in zip(predictions, targets, strict=True)]


def _lab_micro_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, fields: Sequence[str]
) -> Parts:
    rows = [(2 * tp, 2 * tp + fp + fn) for tp, fp, fn in _lab_rows(predictions, targets, fields)]
    return _ungrouped(rows, 2, _ratio(0.0))


def _lab_item_f1(prediction: Any, counts: tuple[int, int, int]) -> float:
    tp, fp, fn = counts
    if prediction is None:
        return 0.0
    if tp + fp + fn == 0:
        return 1.0
    return 2 * tp / (2 * tp + fp + fn)


def _lab_macro_parts(
    predictions: Sequence, targets: Sequence, groups: Sequence | None, *, fields: Sequence[str]
) -> Parts:
    counts = _lab_rows(predictions, targets, fields)
    return _mean_parts(_lab_item_f1(p, c) for p, c in zip(predictions, counts, strict=True))


def lab_f1_micro(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """F1 of lab rows pooled over all reports.

    A predicted row matches a target row (one-to-one) when the option ``fields`` (default name, result,
    unit) all agree after normalisation: names ignore case, spaces and punctuation; other fields ignore case
    and spaces, and numbers compare by value. ``None`` predictions are reports with no row.
    """
    return _value(lab_f1_micro, predictions, targets, groups, options)


def lab_f1_macro(predictions: Sequence, targets: Sequence, groups: Sequence | None = None, **options: Any) -> float:
    """Mean over reports of each report's row F1 (matching as in :func:`lab_f1_micro`).

    A report with no target row and no predicted row scores 1; a ``None`` (unparsed) prediction scores 0.
    """
    return _value(lab_f1_macro, predictions, targets, groups, options)


for _name, _fn, _parts, _options in (
    ("accuracy", accuracy, _accuracy_parts, MetricOptions),
    ("macro_accuracy", macro_accuracy, _macro_accuracy_parts, MetricOptions),
    ("binary_f1_macro_by_group", binary_f1_macro_by_group, _binary_f1_parts, MetricOptions),
    ("closed_accuracy", closed_accuracy, _closed_accuracy_parts, MetricOptions),
    ("multilabel_f1_macro", multilabel_f1_macro, _multilabel_macro_parts, LabelOptions),
    ("multilabel_f1_micro", multilabel_f1_micro, _multilabel_micro_parts, LabelOptions),
    ("tokenized_f1", tokenized_f1, _tokenized_f1_parts, QuestionOptions),
    ("rouge_l", rouge_l, _rouge_l_parts, MetricOptions),
    ("normalized_match", normalized_match, _normalized_match_parts, MetricOptions),
    ("mean_iou", mean_iou, _mean_iou_parts, IouOptions),
    ("lab_f1_micro", lab_f1_micro, _lab_micro_parts, LabOptions),
    ("lab_f1_macro", lab_f1_macro, _lab_macro_parts, LabOptions),
):
    _register(_name, _fn, _parts, _options)
