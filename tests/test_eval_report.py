"""The HTML report of evaluation runs."""

from __future__ import annotations

import pytest
from eval_data import build_all
from scripted import ScriptedBackend

from medlens.errors import MedlensError
from medlens.eval.report import write_report
from medlens.eval.runner import run_benchmark


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = build_all(tmp_path_factory.mktemp("data"))
    base = tmp_path_factory.mktemp("runs")
    answers = {
        "ct-rate": ScriptedBackend("Final Answer: yes"),
        "chest-imagenome": ScriptedBackend('[{"box_2d": [400, 300, 800, 700], "label": "heart"}]'),
        "pubmedqa": ScriptedBackend("Final Answer: yes", "Final Answer: no", "I am unsure."),
    }
    for name, backend in answers.items():
        run_benchmark(name, backend, out_dir=base / name, data=root, n_resamples=200)
    return base


def test_report_shows_metrics_groups_confusion_iou_and_errors(runs, tmp_path, cli):
    code, out, _ = cli(
        "report", runs / "ct-rate", runs / "pubmedqa", runs / "chest-imagenome", "--out", tmp_path / "r.html"
    )
    assert code == 0 and "report written" in out
    page = (tmp_path / "r.html").read_text()
    assert "Research use only" in page and "27.0 (MedGemma 1.5 4B)" in page
    assert page.count("<svg") >= 2  # per-condition bars of ct-rate, IoU histogram of chest-imagenome
    assert "emphysema (n=2)" in page and "IoU per item" in page
    assert "Confusion matrix" in page and "unparsed" in page  # pubmedqa's third answer did not parse
    assert "data:image/png;base64," in page  # the worst errors show what the model saw
    assert "100.0" in page  # chest-imagenome's box matches its reference exactly


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(MedlensError, match="not a finished run folder"):
        write_report([tmp_path], tmp_path / "r.html")
