"""The linear probe (cross-validated metrics with intervals, saved probes) and the persistent retrieval index,
on synthetic unit embeddings (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medlens.errors import InputError, MedlensError, NotFoundError
from medlens.siglip.index import META_FILE, SHARD_DIR, IndexEntry, SiglipIndex
from medlens.siglip.probe import LinearProbe, cross_validate, fit_probe, roc_auc

pytest.importorskip("sklearn")


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def _clusters(n_per_class: int, n_classes: int, dim: int = 32, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim))
    x = np.concatenate([centres[k] + spread * rng.normal(size=(n_per_class, dim)) for k in range(n_classes)])
    labels = [f"class {k}" for k in range(n_classes) for _ in range(n_per_class)]
    return _unit(x), labels


# ---------------------------------------------------------------- probe


def test_probe_separates_separable_classes_with_intervals_around_the_estimate():
    x, labels = _clusters(30, 2)
    report = cross_validate(x, labels, folds=5, n_resamples=500)
    assert report.folds == 5 and report.counts == {"class 0": 30, "class 1": 30}
    assert set(report.metrics) == {"accuracy", "macro_f1", "roc_auc"}
    for metric in report.metrics.values():
        assert metric["value"] >= 0.95 and metric["n"] == 60
        assert metric["ci_low"] <= metric["value"] <= metric["ci_high"]
    assert report.positive_class == "class 1"


def test_probe_on_shuffled_labels_is_near_chance():
    rng = np.random.default_rng(1)
    x, labels = _clusters(100, 2, seed=2)
    shuffled = list(rng.permutation(labels))
    report = cross_validate(x, shuffled, folds=5, n_resamples=500)
    accuracy = report.metrics["accuracy"]
    assert abs(accuracy["value"] - 0.5) < 0.12
    assert accuracy["ci_low"] < 0.5 + 0.05 and accuracy["ci_high"] > 0.5 - 0.05
    assert abs(report.metrics["roc_auc"]["value"] - 0.5) < 0.15


def test_probe_metrics_agree_with_scikit_learn_on_the_out_of_fold_predictions():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    x, labels = _clusters(20, 3, spread=1.2, seed=3)
    report = cross_validate(x, labels, folds=4, n_resamples=200)
    assert "roc_auc" not in report.metrics  # binary only
    assert report.metrics["accuracy"]["value"] == pytest.approx(accuracy_score(labels, report.predictions), abs=1e-6)
    assert report.metrics["macro_f1"]["value"] == pytest.approx(
        f1_score(labels, report.predictions, average="macro"), abs=1e-6
    )
    assert report.probabilities.shape == (60, 3)
    np.testing.assert_allclose(report.probabilities.sum(axis=1), 1.0, atol=1e-9)
    scores = np.random.default_rng(4).normal(size=50)
    truth = (scores + np.random.default_rng(5).normal(size=50) > 0).astype(int)
    assert roc_auc(scores, truth) == pytest.approx(roc_auc_score(truth, scores))
    assert np.isnan(roc_auc([0.1, 0.2], [1, 1]))


def test_probe_reduces_folds_for_a_small_class_and_refuses_what_cannot_be_probed():
    x, labels = _clusters(10, 2)
    labels = labels[:13]  # class 1 keeps 3 items
    report = cross_validate(x[:13], labels, folds=5, n_resamples=100)
    assert report.folds == 3 and any("3 folds instead of 5" in w for w in report.warnings)
    with pytest.raises(InputError, match="at least 2 classes"):
        cross_validate(x[:10], labels[:10])
    with pytest.raises(InputError, match=r"'class 1'.*single item"):
        cross_validate(x[:11], labels[:11])
    with pytest.raises(MedlensError, match="labels for embeddings"):
        cross_validate(x, labels)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_saved_probe_predicts_like_the_fitted_pipeline(tmp_path, n_classes):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, labels = _clusters(15, n_classes, spread=1.0, seed=6)
    probe = fit_probe(x, labels, c=0.5, model="test-tiny-siglip", fingerprint="abc")
    path = probe.save(tmp_path / "probe.npz")
    loaded = LinearProbe.load(path)
    assert loaded.classes == sorted(set(labels)) and loaded.model == "test-tiny-siglip" and loaded.dim == 32
    codes = [loaded.classes.index(label) for label in labels]
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=2000)).fit(x, codes)
    new = _clusters(5, n_classes, spread=1.0, seed=7)[0]
    np.testing.assert_allclose(loaded.predict_proba(new), reference.predict_proba(new), atol=1e-6)
    assert loaded.predict(new) == [loaded.classes[i] for i in reference.predict(new)]
    with pytest.raises(MedlensError, match="dimension"):
        loaded.predict_proba(np.zeros((1, 8)))
    with pytest.raises(InputError, match="probe"):
        LinearProbe.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------- index


def _entries(source: str, n: int, label: str | None = None) -> list[IndexEntry]:
    return [IndexEntry(source, i, label) for i in range(1, n + 1)]


@pytest.fixture
def vectors():
    return _unit(np.random.default_rng(10).normal(size=(40, 16)))


def test_index_adds_incrementally_persists_and_finds_itself(tmp_path, vectors):
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", 16)
    assert len(index) == 0 and index.search(vectors[0]) == []
    first = index.add(vectors[:10], _entries("/data/a", 10, "pneumonia"))
    assert (first.added, first.skipped) == (10, 0)

    reopened = SiglipIndex.open(tmp_path / "idx")
    assert len(reopened) == 10 and reopened.model == "m" and reopened.dim == 16
    second = reopened.add(vectors[10:25] * 3.0, _entries("/data/b", 15))  # stored normalised
    assert (second.added, len(reopened)) == (15, 25)
    np.testing.assert_allclose(np.linalg.norm(reopened.embeddings, axis=1), 1.0, atol=1e-6)

    again = SiglipIndex.open(tmp_path / "idx")
    assert [item.id for item in again.items] == list(range(25))
    for row in (3, 17):
        (top, *_rest) = again.search(vectors[row], top_k=5)
        assert top.item.id == row and top.score == pytest.approx(1.0, abs=1e-5)
    hits = again.search(vectors[0], top_k=7)
    expected = np.argsort(-(again.embeddings @ vectors[0]), kind="stable")[:7]
    assert [h.item.id for h in hits] == list(expected) and [h.rank for h in hits] == list(range(1, 8))
    assert hits[0].as_dict()["source"] == "/data/a" and hits[0].as_dict()["label"] == "pneumonia"
    assert len(again.search(vectors[0], top_k=100)) == 25
    info = again.info()
    assert info["count"] == 25 and info["sources"] == 2 and info["labels"] == {"pneumonia": 10}
    assert info["shards"] == 2


def test_index_skips_duplicates_of_the_same_source_and_image(tmp_path, vectors):
    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", 16)
    index.add(vectors[:3], _entries("/data/a", 3))
    repeat = index.add(vectors[:4], [*_entries("/data/a", 3), IndexEntry("/data/a", 4)])
    assert (repeat.added, repeat.skipped) == (1, 3)
    within = index.add(vectors[:2], [IndexEntry("/data/c", 1), IndexEntry("/data/c", 1)])
    assert (within.added, within.skipped) == (1, 1)
    nothing = index.add(vectors[:1], [IndexEntry("/data/c", 1)])
    assert (nothing.added, nothing.skipped) == (0, 1)
    assert len(SiglipIndex.open(tmp_path / "idx")) == 5


def test_an_interrupted_add_leaves_the_index_as_it_was(tmp_path, vectors, monkeypatch):
    import medlens.siglip.index as index_module

    index = SiglipIndex.create(tmp_path / "idx", "m", "fp", 16)
    index.add(vectors[:5], _entries("/data/a", 5))
    before = (tmp_path / "idx" / META_FILE).read_text()

    def crash_on_commit(path, value):
        raise KeyboardInterrupt  # the process dies after the shard files, before meta.json

    with monkeypatch.context() as patch:
        patch.setattr(index_module, "write_json_atomic", crash_on_commit)
        with pytest.raises(KeyboardInterrupt):
            index.add(vectors[5:10], _entries("/data/b", 5))

    def half_written(handle, array, **_):
        handle.write(b"\x93NUMPY half")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(np, "save", half_written)
        with pytest.raises(OSError, match="disk full"):
            SiglipIndex.open(tmp_path / "idx").add(vectors[10:12], _entries("/data/c", 2))

    assert (tmp_path / "idx" / META_FILE).read_text() == before
    survivor = SiglipIndex.open(tmp_path / "idx")
    assert len(survivor) == 5 and survivor.search(vectors[2])[0].item.id == 2
    assert not [p for p in (tmp_path / "idx" / SHARD_DIR).iterdir() if p.name.startswith(".")]  # no temp files
    # the next add commits cleanly, ids continue, and the unlisted shard of the crashed add is gone
    assert survivor.add(vectors[5:10], _entries("/data/b", 5)).added == 5
    reopened = SiglipIndex.open(tmp_path / "idx")
    assert len(reopened) == 10 and [i.id for i in reopened.items] == list(range(10))
    assert sorted(p.name for p in (tmp_path / "idx" / SHARD_DIR).iterdir()) == [
        "000001.jsonl",
        "000001.npy",
        "000002.jsonl",
        "000002.npy",
    ]


def test_index_refuses_another_model_or_dimension(tmp_path, vectors):
    SiglipIndex.create(tmp_path / "idx", "test-tiny-siglip", "fp1", 16).add(vectors[:2], _entries("/a", 2))
    with pytest.raises(MedlensError, match="16-dimensional") as info:
        SiglipIndex.open_or_create(tmp_path / "idx", "medsiglip", "fp2", 1152)
    assert str(tmp_path / "idx") in str(info.value)
    with pytest.raises(MedlensError, match=r"model 'test-tiny-siglip' .*fp1.*not of 'other'"):
        SiglipIndex.open_or_create(tmp_path / "idx", "other", "fp2", 16)
    index = SiglipIndex.open(tmp_path / "idx")
    with pytest.raises(MedlensError, match="dimension 8"):
        index.add(np.ones((1, 8)), _entries("/b", 1))
    with pytest.raises(MedlensError, match="dimension"):
        index.search(np.ones(8))
    assert SiglipIndex.open_or_create(tmp_path / "idx", "renamed", "fp1", 16).model == "test-tiny-siglip"


def test_index_open_errors_name_the_folder(tmp_path):
    with pytest.raises(NotFoundError, match="no such index folder"):
        SiglipIndex.open(tmp_path / "none")
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotFoundError, match="not a medlens index"):
        SiglipIndex.open(tmp_path / "plain")
    (tmp_path / "plain" / META_FILE).write_text(json.dumps({"format": "other"}))
    with pytest.raises(MedlensError, match="not a medlens-siglip-index") as info:
        SiglipIndex.open(tmp_path / "plain")
    assert str(tmp_path / "plain") in str(info.value)
