"""A benchmark's train split as training data: the seeded iu-cxr-findings split is disjoint by report text,
and each training row is the request evaluation sends, with the target in the form the parser reads back."""

from __future__ import annotations

import json

import pytest

from medlens.errors import InputError, MedlensError
from medlens.eval.iu_cxr import archive_path, load_items
from medlens.eval.kinds import findings_in
from medlens.eval.registry import get_benchmark, make_kind
from medlens.eval.training_rows import training_items

try:
    archive_path()
except MedlensError:
    pytest.skip("the IU reports ship in the torchxrayvision package (not installed)", allow_module_level=True)


@pytest.fixture(scope="module")
def splits():
    return {name: load_items(split=name) for name in ("all", "train", "held_out")}


def test_iu_split_is_seeded_disjoint_by_report_and_complete(splits):
    train, held = splits["train"], splits["held_out"]
    assert len(train) + len(held) == len(splits["all"]) and len(held) >= 200
    assert not {i["report"] for i in train} & {i["report"] for i in held}
    assert not {i["id"] for i in train} & {i["id"] for i in held}
    other = load_items(split="held_out", seed=1)
    assert {i["id"] for i in other} != {i["id"] for i in held}
    with pytest.raises(InputError, match="split must be one of all, train, held_out"):
        load_items(split="test")


def test_training_rows_are_the_eval_requests_with_parseable_targets(splits):
    rows = training_items("iu-cxr-findings", "train", limit=5)
    spec, path = get_benchmark("iu-cxr-findings")
    kind = make_kind(spec, path, "medgemma-1.5")
    labels = spec.options["labels"]
    for row, item in zip(rows, splits["train"][:5], strict=True):
        assert row.id == item["id"] and row.inputs == []
        assert row.messages() == kind.query(item).messages  # the very prompt evaluation sends
        assert findings_in(row.answer, labels) == item["target"] == json.loads(row.answer)
        assert item["report"] in row.question


def test_a_benchmark_without_splits_is_refused():
    with pytest.raises(InputError, match="benchmark medqa has no 'train' split"):
        training_items("medqa", "train")
