"""`medlens ask` arguments that cannot be mistaken: --question/-Q, the positional question rule, and every
missing input named in one error (exit 2), through the real command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medlens.cli.ask import looks_like_question, split_inputs
from medlens.errors import MedlensError, NotFoundError


@pytest.fixture()
def pngs(tmp_path):
    paths = []
    for name in ("a.png", "b.png"):
        Image.fromarray(np.full((32, 48), 100, np.uint8)).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def test_the_issue_example_names_the_mistyped_second_path(pngs, cli, tmp_path):
    """`medlens ask PATH... QUESTION`: a mistyped second path was taken as the question (exit 0)."""
    typo = tmp_path / "b_typo.dcm"
    code, out, err = cli("ask", pngs[0], typo, "--task", "compare", "--quiet")
    assert code == 2 and out == ""
    assert "b_typo.dcm" in err and "no such file" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_every_missing_path_is_named_in_one_error(pngs, cli, tmp_path):
    code, _, err = cli("ask", pngs[0], tmp_path / "x1.dcm", tmp_path / "x2", "-Q", "What is shown?", "--quiet")
    assert code == 2 and "x1.dcm" in err and "x2" in err and str(pngs[0]) not in err


def test_the_brief_example_with_q_still_names_the_typo(pngs, cli, tmp_path):
    # -q is --quiet: the quoted text is then positional, taken as the question, and the typo is named
    code, _, err = cli("ask", pngs[0], tmp_path / "b_typo.dcm", "-q", "Is there a lesion?")
    assert code == 2 and "b_typo.dcm" in err


def test_question_twice_is_an_error(pngs, cli):
    code, _, err = cli("ask", pngs[0], "What is shown here?", "--question", "Another?", "--quiet")
    assert code == 2 and "two questions" in err


def test_after_two_inputs_a_bare_word_is_a_missing_input(pngs, cli):
    code, _, err = cli("ask", *pngs, "pneumonia", "--task", "compare", "--quiet")
    assert code == 2 and "pneumonia" in err and "--question" in err


def test_after_one_input_a_path_like_argument_is_a_missing_input(pngs, cli, tmp_path):
    for typo in ("b_typo.dcm", f"{tmp_path}/other", "study.nii.gz"):
        code, _, err = cli("ask", pngs[0], typo, "--quiet")
        assert code == 2 and typo in err


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("Is there a lesion?", True),
        ("Describe the findings", True),
        ("Describe.", True),
        ("left/right asymmetry?", True),
        ("pneumonia", False),  # no space, no '?': a mistyped path is likelier
        ("scans/ct 2", False),  # a path with a space
        ("my scan.dcm", False),
        ("study.nii.gz", False),
        ("notes dir/", False),
        ("", False),
    ],
)
def test_the_question_rule(arg, expected):
    assert looks_like_question(arg) is expected


def test_split_inputs(pngs, tmp_path):
    a, b = (str(p) for p in pngs)
    assert split_inputs([a, "What is it?"]) == ([a], "What is it?")
    assert split_inputs([a, "pneumonia"]) == ([a], "pneumonia")  # INPUT QUESTION: a one-word question
    with pytest.raises(NotFoundError, match="pneumonia"):
        split_inputs([a, b, "pneumonia"])
    assert split_inputs([a, b, "Any change?"]) == ([a, b], "Any change?")
    assert split_inputs([a, b]) == ([a, b], None)
    assert split_inputs([a, b], "Q?") == ([a, b], "Q?")
    assert split_inputs([a]) == ([a], None)
    with pytest.raises(NotFoundError) as info:
        split_inputs([a, str(tmp_path / "gone.png"), "What changed?"])
    assert "gone.png" in str(info.value)
    with pytest.raises(MedlensError):
        split_inputs([a, "Why?"], "Why not?")


def test_question_option_runs_with_test_tiny(pngs, cli):
    code, out, err = cli("ask", pngs[0], "-Q", "What is shown?", "--max-new-tokens", "2", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["task"] == "qa" and [i["file"] for i in result["inputs"]] == [str(pngs[0])]
