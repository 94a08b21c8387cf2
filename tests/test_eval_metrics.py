"""Benchmark metrics against scikit-learn references and hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from medlens.errors import UnknownNameError
from medlens.metrics.functions import (
    METRICS,
    MetricOptionsError,
    accuracy,
    binary_f1_macro_by_group,
    closed_accuracy,
    item_scores,
    lab_f1_macro,
    lab_f1_micro,
    lcs_length,
    macro_accuracy,
    mean_iou,
    metric_options,
    multilabel_f1_macro,
    multilabel_f1_micro,
    normalized_match,
    rouge_l,
    rouge_l_item,
    token_f1,
    tokenized_f1,
)

LABELS = ["normal", "cardiomegaly", "opacity", "atelectasis", "pleural effusion", "nodule"]


def _yes_no_data(n: int, seed: int, n_groups: int = 4, p_none: float = 0.1):
    rng = np.random.default_rng(seed)
    targets = rng.choice(["yes", "no"], n, p=[0.3, 0.7]).tolist()
    predictions: list = rng.choice(["yes", "no"], n).tolist()
    predictions = [None if rng.random() < p_none else p for p in predictions]
    groups = [f"condition {rng.integers(n_groups)}" for _ in range(n)]
    return predictions, targets, groups


def _as_answer(prediction, target):
    """What a None prediction counts as: the wrong answer."""
    if prediction is None:
        return "no" if target == "yes" else "yes"
    return prediction


def test_every_metric_is_registered_with_did_you_mean():
    assert set(METRICS.names()) >= {
        "accuracy",
        "macro_accuracy",
        "binary_f1_macro_by_group",
        "multilabel_f1_macro",
        "multilabel_f1_micro",
        "tokenized_f1",
        "closed_accuracy",
        "rouge_l",
        "mean_iou",
        "lab_f1_micro",
        "lab_f1_macro",
        "normalized_match",
    }
    with pytest.raises(UnknownNameError, match="did you mean 'accuracy'"):
        METRICS.get("acuracy")


def test_metric_options_are_checked_in_python_too():
    """The options models that check benchmark files also check Python calls: nothing is silently ignored."""
    from medlens.metrics.stats import bootstrap_ci

    with pytest.raises(MetricOptionsError, match="metric accuracy: labels: unknown option"):
        accuracy(["a"], ["a"], labels=["a"])
    with pytest.raises(MetricOptionsError, match="by_label: Input should be a valid boolean"):
        mean_iou([[]], [[]], by_label="yes")
    with pytest.raises(MetricOptionsError, match="questions"):
        tokenized_f1(["a"], ["a"], questions="some")
    with pytest.raises(MetricOptionsError, match="question: unknown option"):
        item_scores("tokenized_f1", ["a"], ["a"], question="open")
    with pytest.raises(MetricOptionsError, match="labels"):
        bootstrap_ci(multilabel_f1_macro, [["a"]], [["a"]], labels="a", n_resamples=10)
    with pytest.raises(MetricOptionsError, match=r"fields\.0: Input should be"):
        lab_f1_micro([[]], [[]], fields=["value"])
    # label and field lists may be any sequence: a, b with only a present -> (1 + 0) / 2
    assert multilabel_f1_macro([["a"]], [["a"]], labels=("a", "b")) == 0.5
    assert metric_options("lab_f1_macro")().fields == ["name", "result", "unit"]
    assert metric_options("mean_iou")().model_dump() == {"by_label": True, "key": "box_2d"}


def test_lengths_must_agree():
    with pytest.raises(ValueError, match="2 predictions but 1 targets"):
        accuracy(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="groups"):
        macro_accuracy(["a"], ["a"], ["g", "h"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_accuracy_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    targets = rng.choice(list("ABCD"), 300).tolist()
    predictions = [None if rng.random() < 0.1 else p for p in rng.choice(list("ABCD"), 300).tolist()]
    reference = accuracy_score(targets, ["<none>" if p is None else p for p in predictions])
    assert accuracy(predictions, targets) == pytest.approx(reference)
    assert item_scores("accuracy", predictions, targets) == [
        float(p == t) for p, t in zip(predictions, targets, strict=True)
    ]


def test_accuracy_counts_none_as_wrong_even_against_none():
    assert accuracy([None, "B"], [None, "B"]) == 0.5
    assert np.isnan(accuracy([], []))


@pytest.mark.parametrize("seed", [0, 1])
def test_macro_accuracy_is_mean_of_per_group_sklearn_accuracies(seed):
    predictions, targets, groups = _yes_no_data(400, seed)
    per_group = []
    for group in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == group]
        said = [predictions[i] if predictions[i] is not None else "<none>" for i in rows]
        per_group.append(accuracy_score([targets[i] for i in rows], said))
    assert macro_accuracy(predictions, targets, groups) == pytest.approx(np.mean(per_group))
    assert item_scores("macro_accuracy", predictions, targets, groups) is None


def test_macro_accuracy_weighs_groups_equally_by_hand():
    predictions = ["improved"] * 9 + ["stable"]
    targets = ["improved"] * 9 + ["worsened"]
    groups = ["pneumonia"] * 9 + ["edema"]
    assert macro_accuracy(predictions, targets, groups) == pytest.approx(0.5)
    assert accuracy(predictions, targets, groups) == pytest.approx(0.9)
    assert macro_accuracy(predictions, targets) == pytest.approx(0.9)  # no groups: plain accuracy


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_f1_macro_by_group_matches_sklearn_per_condition(seed):
    predictions, targets, groups = _yes_no_data(500, seed, n_groups=5)
    scores = []
    for group in sorted(set(groups)):
        rows = [i for i, g in enumerate(groups) if g == group]
        truth = [targets[i] for i in rows]
        said = [_as_answer(predictions[i], targets[i]) for i in rows]
        scores.append(f1_score(truth, said, pos_label="yes", zero_division=0))
    assert binary_f1_macro_by_group(predictions, targets, groups) == pytest.approx(np.mean(scores))


def test_binary_f1_by_group_by_hand():
    # condition x: one TP, one FN (None for a yes) -> F1 2/3; condition y: no positive target, one FP -> 0
    predictions = ["yes", None, "no", "Yes"]
    targets = ["yes", "yes", "no", "no"]
    groups = ["x", "x", "y", "y"]
    assert binary_f1_macro_by_group(predictions, targets, groups) == pytest.approx((2 / 3 + 0) / 2)
    # a condition without any positive target or prediction scores 0 (scikit-learn zero_division=0)
    assert binary_f1_macro_by_group(["no", "yes"], ["no", "yes"], ["a", "b"]) == pytest.approx(0.5)
    assert f1_score(["no"], ["no"], pos_label="yes", zero_division=0) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multilabel_f1_matches_sklearn_on_binarized_labels(seed):
    rng = np.random.default_rng(seed)
    present = LABELS[:-1]  # "nodule" is never in a target or prediction: F1 0, still counted in the mean

    def draw():
        return [label for label in present if rng.random() < 0.3]

    targets = [draw() for _ in range(120)]
    predictions = [None if rng.random() < 0.05 else draw() for _ in range(120)]
    binarizer = MultiLabelBinarizer(classes=LABELS)
    truth = binarizer.fit_transform(targets)
    said = binarizer.transform([p or [] for p in predictions])
    for average, fn in (("macro", multilabel_f1_macro), ("micro", multilabel_f1_micro)):
        reference = f1_score(truth, said, average=average, zero_division=0)
        assert fn(predictions, targets, labels=LABELS) == pytest.approx(reference)
    assert item_scores("multilabel_f1_macro", predictions, targets, labels=LABELS) is None


def test_multilabel_f1_by_hand_and_label_handling():
    targets = [["cardiomegaly"], ["opacity", "nodule"]]
    predictions = [["Cardiomegaly ", "unknown finding"], ["opacity"]]
    # cardiomegaly 1, opacity 1, nodule 0 (a false negative), normal 0 (never present) -> macro 2/4
    labels = ["cardiomegaly", "opacity", "nodule", "normal"]
    assert multilabel_f1_macro(predictions, targets, labels=labels) == pytest.approx(0.5)
    # pooled: tp 2, fp 0, fn 1 -> 4 / 5
    assert multilabel_f1_micro(predictions, targets, labels=labels) == pytest.approx(0.8)
    # without a label set: every label seen (the unknown one is a false positive)
    assert multilabel_f1_macro(predictions, targets) == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert multilabel_f1_micro([[]], [[]], labels=labels) == 0.0


def test_token_f1_by_hand():
    assert token_f1("The left lung.", "left lung") == 1.0
    assert token_f1("right lung base", "left lung") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))  # 0.4
    assert token_f1("Yes", "yes") == 1.0
    assert token_f1(None, "yes") == 0.0
    assert token_f1("the", "a") == 1.0  # nothing but articles on both sides
    assert token_f1("lung lung", "lung") == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens count once each
    predictions = ["The left lung.", "right lung base", None]
    targets = ["left lung", "left lung", "no"]
    assert tokenized_f1(predictions, targets) == pytest.approx((1 + 0.4 + 0) / 3)
    assert tokenized_f1(predictions, targets, questions="open") == pytest.approx((1 + 0.4) / 2)
    assert item_scores("tokenized_f1", predictions, targets, questions="open") == [1.0, pytest.approx(0.4), None]


def test_closed_accuracy_only_scores_yes_no_targets():
    predictions = ["Yes, there is a fracture.", "yes", "liver", "I cannot tell", "no."]
    targets = ["yes", "No", "liver", "yes", "no"]
    assert closed_accuracy(predictions, targets) == pytest.approx(2 / 4)
    assert item_scores("closed_accuracy", predictions, targets) == [1.0, 0.0, None, 0.0, 1.0]
    assert np.isnan(closed_accuracy(["liver"], ["liver"]))


def test_lcs_length_textbook_examples():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # CLRS
    assert lcs_length(list("AGGTAB"), list("GXTXAYB")) == 4  # GTAB
    assert lcs_length([], list("abc")) == 0


def test_rouge_l_by_hand():
    # Lin (2004): reference "police killed the gunman"
    assert rouge_l_item("police kill the gunman", "police killed the gunman") == pytest.approx(0.75)
    assert rouge_l_item("the gunman kill police", "police killed the gunman") == pytest.approx(0.5)
    # LCS 5 of 5 predicted and 6 reference words: P 1, R 5/6, F 10/11
    assert rouge_l_item("The cat, on the mat.", "the cat sat on the mat") == pytest.approx(10 / 11)
    assert rouge_l_item(None, "text") == 0.0
    assert rouge_l_item("", "text") == 0.0
    predictions = ["police kill the gunman", "The cat, on the mat."]
    targets = ["police killed the gunman", "the cat sat on the mat"]
    assert rouge_l(predictions, targets) == pytest.approx((0.75 + 10 / 11) / 2)


def test_mean_iou_by_hand():
    heart = {"label": "heart", "box_2d": [0, 0, 100, 100]}
    lung = {"label": "left lung", "box_2d": [200, 200, 400, 400]}
    shifted = {"label": "Heart", "box_2d": [0, 50, 100, 150]}  # overlap 50x100 of union 15000 -> 1/3
    predictions = [[heart, lung], None, [shifted]]
    targets = [[heart, lung], [heart], [heart, lung]]
    assert mean_iou(predictions, targets) == pytest.approx((1 + 0 + (1 / 3 + 0) / 2) / 3)
    assert item_scores("mean_iou", predictions, targets) == [1.0, 0.0, pytest.approx(1 / 6)]
    # an item without target boxes is left out
    assert mean_iou([[heart], [heart]], [[heart], []]) == 1.0
    assert mean_iou([[heart]], [[{"label": "lung", "box_2d": [0, 0, 100, 100]}]], by_label=False) == 1.0


def _lab(name, result, unit, **more):
    return {"name": name, "result": result, "unit": unit, **more}


def test_lab_f1_by_hand():
    target_1 = [_lab("Hemoglobin", "13.5", "g/dL"), _lab("WBC", "7.2", "10^3/uL"), _lab("Platelets", "250", "10^3/uL")]
    predicted_1 = [
        _lab("HEMOGLOBIN ", "13.50", "g / dl"),  # case, spaces and trailing zeros ignored
        _lab("W.B.C.", "7.2", "10^3/uL", range="4-11"),  # punctuation in names ignored, other fields too
        _lab("Platelets", "205", "10^3/uL"),  # wrong result
        _lab("RBC", "4.5", "10^6/uL"),  # not in the target
    ]
    target_2 = [_lab("Sodium", "1,200", "mmol/L")]
    predicted_2 = [_lab("sodium", "1200", "mmol/l")]
    predictions, targets = [predicted_1, predicted_2], [target_1, target_2]
    # report 1: tp 2, fp 2, fn 1 -> F1 4/7; report 2: F1 1; pooled: tp 3, fp 2, fn 1 -> 6/9
    assert lab_f1_macro(predictions, targets) == pytest.approx((4 / 7 + 1) / 2)
    assert lab_f1_micro(predictions, targets) == pytest.approx(6 / 9)
    assert item_scores("lab_f1_macro", predictions, targets) == [pytest.approx(4 / 7), 1.0]
    assert item_scores("lab_f1_micro", predictions, targets) is None
    # names only: report 1 tp 3, fp 1, fn 0 -> 6/7
    assert lab_f1_macro([predicted_1], [target_1], fields=["name"]) == pytest.approx(6 / 7)
    # a report with no rows at all scores 1; an unparsed prediction 0
    assert lab_f1_macro([[], None], [[], target_2]) == pytest.approx(0.5)
    # matching is one-to-one: a duplicated prediction is a false positive
    assert lab_f1_micro([[target_2[0], target_2[0]]], [target_2]) == pytest.approx(2 / 3)


def test_normalized_match_by_hand():
    synonyms = ["Myocardial infarction", "heart attack"]
    predictions = ["Acute myocardial infarction.", "The heart attacks", "A heart attack", None, "Tension pneumothorax"]
    targets = [synonyms, synonyms, synonyms, synonyms, "pneumothorax"]
    assert item_scores("normalized_match", predictions, targets) == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert normalized_match(predictions, targets) == pytest.approx(3 / 5)
    assert normalized_match(["the pneumothorax"], ["A Pneumothorax"]) == 1.0
    assert normalized_match(["pneumothoraces"], ["pneumothorax"]) == 0.0
    assert normalized_match(["anything"], [[None, ""]]) == 0.0
