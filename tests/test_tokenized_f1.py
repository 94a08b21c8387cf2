"""The two tokenised F1 definitions: medlens's (default) and lmms-eval's (``definition: lmms-eval``)."""

from __future__ import annotations

import pytest

from medlens.metrics.functions import METRICS, MetricOptionsError, check_options, tokenized_f1


def _f1(common: int, n_said: int, n_truth: int) -> float:
    precision, recall = common / n_said, common / n_truth
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize(
    ("prediction", "target", "medlens", "lmms_eval"),
    [
        # articles and the full stop: medlens drops them; lmms-eval keeps "the" and "." as tokens
        ("The left lung.", "left lung", 1.0, _f1(2, 4, 2)),
        # repeats: medlens counts words as a bag, lmms-eval as a set
        ("lung lung", "lung", _f1(1, 2, 1), 1.0),
        # punctuation inside words: medlens splits "right-sided", lmms-eval keeps it one token
        ("right-sided effusion", "right sided effusion", 1.0, _f1(1, 2, 3)),
        # lmms-eval reads the answer out of \boxed{}; medlens scores the whole text
        (r"I think \boxed{pneumothorax}", "pneumothorax", _f1(1, 4, 1), 1.0),  # i, think, boxed, pneumothorax
        # two empty answers: 1 for medlens, 0 for lmms-eval
        ("", "", 1.0, 0.0),
    ],
)
def test_definitions_differ(prediction: str, target: str, medlens: float, lmms_eval: float) -> None:
    assert tokenized_f1([prediction], [target]) == pytest.approx(medlens)
    assert tokenized_f1([prediction], [target], definition="medlens") == pytest.approx(medlens)
    assert tokenized_f1([prediction], [target], definition="lmms-eval") == pytest.approx(lmms_eval)


def test_open_questions_with_lmms_eval() -> None:
    """lmms-eval's number: mean over open questions only, closed (yes/no) targets left out."""
    predictions, targets = ["yes", "the liver.", "no"], ["no", "liver", "no"]
    value = tokenized_f1(predictions, targets, questions="open", definition="lmms-eval")
    assert value == pytest.approx(_f1(1, 3, 1))  # {"the", "liver", "."} against {"liver"}
    assert tokenized_f1(predictions, targets, questions="open") == pytest.approx(1.0)


def test_definition_option_is_validated() -> None:
    fn = METRICS.get("tokenized_f1")
    assert check_options(fn, {"definition": "lmms-eval"}).definition == "lmms-eval"
    with pytest.raises(MetricOptionsError, match="definition"):
        check_options(fn, {"definition": "squad"})
