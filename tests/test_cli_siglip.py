"""The MedSigLIP commands end to end with test-tiny-siglip: embed, zeroshot, probe (fit, apply), search, siglip
finetune; exit 2 on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medlens import DISCLAIMER
from medlens.demo.phantom import ct_phantom, write_ct_series

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sklearn")

N_CT_SLICES = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Eight PNGs (two kinds: bright left half or bright right half) with a labels CSV, and a small CT series."""
    root = tmp_path_factory.mktemp("siglip-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        image = rng.integers(0, 60, (240, 320, 3), dtype=np.uint8)
        side = "left" if i % 2 else "right"
        image[:, :160] += 180 if side == "left" else 0
        image[:, 160:] += 180 if side == "right" else 0
        Image.fromarray(image).save(root / f"case{i}.png")
        rows.append(f"case{i}.png,{side}\n")
    (root / "labels.csv").write_text("path,label\n" + "".join(rows))
    hu, _ = ct_phantom(n_slices=N_CT_SLICES, size=48)
    write_ct_series(hu, root / "ct")
    return root


def _ok(result):
    code, out, err = result
    assert code == 0, err
    return out


def test_embed_writes_one_unit_row_per_image_and_the_texts(data, tmp_path, cli):
    from medlens.siglip.embedding_file import EmbeddingFile

    out = _ok(cli("embed", data / "case0.png", data / "ct", "--text", "pneumonia", "-o", tmp_path / "e.npz", "-q"))
    summary = json.loads(out)
    assert summary["n_studies"] == 2 and summary["n_images"] == 1 + N_CT_SLICES and summary["n_texts"] == 1
    assert summary["model"] == "test-tiny-siglip" and summary["dim"] == 32 and summary["image_size"] == 448
    assert any("noise" in w for w in summary["warnings"]) and summary["disclaimer"] == DISCLAIMER
    stored = EmbeddingFile.load(tmp_path / "e.npz")
    assert stored.embeddings.shape == (1 + N_CT_SLICES, 32) and stored.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(stored.embeddings, axis=1), 1.0, atol=1e-5)
    assert stored.sources == [str(data / "case0.png")] + [str(data / "ct")] * N_CT_SLICES
    assert stored.images == [1, *range(1, N_CT_SLICES + 1)]
    assert stored.texts == ["pneumonia"] and stored.text_embeddings.shape == (1, 32)
    assert stored.fingerprint == summary["fingerprint"]


def test_zeroshot_prints_one_json_line_per_study(data, cli):
    out = _ok(cli("zeroshot", data / "case1.png", data / "ct", "-l", "pneumonia", "-l", "normal", "--per-image", "-q"))
    lines = [json.loads(line) for line in out.splitlines()]
    assert [r["input"] for r in lines] == [str(data / "case1.png"), str(data / "ct")]
    for result in lines:
        softmax, sigmoid, logits = result["softmax"], result["sigmoid"], result["logits"]
        assert set(softmax) == {"pneumonia", "normal"} and sum(softmax.values()) == pytest.approx(1.0, abs=1e-5)
        assert result["top_label"] == max(logits, key=logits.get)
        for label, logit in logits.items():
            assert sigmoid[label] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-6)
        assert result["disclaimer"] == DISCLAIMER and any("noise" in w for w in result["warnings"])
    assert lines[1]["n_images"] == N_CT_SLICES and len(lines[1]["images"]) == N_CT_SLICES


def test_zeroshot_reads_a_csv_and_keeps_its_labels(data, cli):
    out = _ok(cli("zeroshot", data / "labels.csv", "-l", "left", "-l", "right", "--template", "bright {label}", "-q"))
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 8 and lines[0]["true_label"] == "right"
    assert lines[0]["prompts"] == {"left": "bright left", "right": "bright right"}


def test_probe_from_a_csv_and_from_an_embed_file_agree(data, tmp_path, cli):
    from medlens.siglip.probe import LinearProbe

    options = ["--folds", "4", "--resamples", "200", "-q"]
    result = json.loads(_ok(cli("probe", data / "labels.csv", *options, "--save", tmp_path / "p.npz")))
    assert result["classes"] == ["left", "right"] and result["counts"] == {"left": 4, "right": 4}
    assert result["folds"] == 4 and result["disclaimer"] == DISCLAIMER
    for metric in ("accuracy", "macro_f1", "roc_auc"):
        m = result["metrics"][metric]
        assert m["n"] == 8 and m["ci_low"] <= m["value"] <= m["ci_high"]
    probe = LinearProbe.load(result["saved"])
    assert probe.classes == ["left", "right"] and probe.fingerprint == result["fingerprint"]

    _ok(cli("embed", data / "labels.csv", "-o", tmp_path / "e.npz", "-q"))
    from_file = json.loads(_ok(cli("probe", tmp_path / "e.npz", *options)))
    assert from_file["metrics"] == result["metrics"]


def test_probe_apply_gives_the_in_memory_predictions(data, tmp_path, cli):
    from medlens.models.siglip_encoder import SiglipEncoder
    from medlens.siglip.inputs import embed_studies, read_label_csv
    from medlens.siglip.probe import _estimator

    saved = json.loads(
        _ok(
            cli(
                "probe",
                data / "labels.csv",
                "--folds",
                "2",
                "--resamples",
                "100",
                "--save",
                tmp_path / "p.npz",
                "--c",
                "0.5",
                "-q",
            )
        )
    )["saved"]
    out = _ok(cli("probe", "apply", saved, data / "labels.csv", data / "case5.png", "-q"))
    lines = [json.loads(line) for line in out.splitlines()]

    refs = read_label_csv(data / "labels.csv")
    encoder = SiglipEncoder("test-tiny-siglip")
    features = np.stack([s.pooled() for s in embed_studies(encoder, refs)])
    labels = [r.label for r in refs]
    fitted = _estimator(0.5).fit(features, labels)  # the sklearn pipeline itself, never saved
    expected = fitted.predict_proba(np.concatenate([features, features[5:6]]))
    assert len(lines) == 9 and [r["input"] for r in lines[:8]] == [r.source for r in refs]
    for row, probabilities in zip(lines, expected, strict=True):
        assert list(row["probabilities"]) == list(fitted.classes_) == ["left", "right"]
        np.testing.assert_allclose(list(row["probabilities"].values()), probabilities, atol=1e-5)
        assert row["label"] == fitted.classes_[int(np.argmax(probabilities))]
        assert row["disclaimer"] == DISCLAIMER and row["model"] == "test-tiny-siglip"
    assert [r["true_label"] for r in lines[:8]] == labels and "true_label" not in lines[8]
    assert [r["label"] for r in lines[:8]] == labels  # the tiny model separates bright halves (measured)


def test_siglip_finetune_makes_a_model_every_command_loads_and_old_probes_refuse_it(data, tmp_path, cli):
    run = tmp_path / "run"
    args = ("siglip", "finetune", data / "labels.csv", "--out", run, "--steps", "3", "--batch-size", "4")
    summary = json.loads(_ok(cli(*args, "--lr", "0.01", "--method", "lora", "--seed", "2", "-q")))
    assert summary["model_dir"] == str(run / "model") and summary["n_pairs"] == 8 and summary["steps"] == 3
    assert summary["last_loss"] < summary["first_loss"] and summary["disclaimer"] == DISCLAIMER
    assert len((run / "train_log.jsonl").read_text().splitlines()) == 3
    code, _out, err = cli(*args, "-q")
    assert code == 2 and "--overwrite" in err and err.count("\n") == 1

    tuned = json.loads(_ok(cli("zeroshot", data / "case0.png", "-l", "left", "-l", "right", "-m", run / "model", "-q")))
    assert tuned["model"] == str(run / "model") and any("noise" in w for w in tuned["warnings"])
    probe = tmp_path / "p.npz"
    _ok(cli("probe", data / "labels.csv", "--folds", "2", "--resamples", "100", "--save", probe, "-q"))
    code, out, err = cli("probe", "apply", probe, data / "case0.png", "-m", run / "model", "-q")
    assert code == 2 and out == "" and err.startswith("medlens: error:") and err.count("\n") == 1
    assert str(probe) in err and summary["fingerprint"] in err and "test-tiny-siglip" in err
    assert "Traceback" not in err


def test_search_add_query_info(data, tmp_path, cli):
    index = tmp_path / "idx"
    added = json.loads(_ok(cli("search", "add", index, data / "labels.csv", data / "ct", "--note", "batch 1", "-q")))
    assert added["added_images"] == 8 + N_CT_SLICES and added["count"] == 8 + N_CT_SLICES
    again = json.loads(_ok(cli("search", "add", index, data / "case3.png", "-q")))
    assert again["added_images"] == 0 and again["skipped_studies_already_indexed"] == 1

    found = json.loads(_ok(cli("search", "query", index, data / "case3.png", "--top-k", "3", "-q")))
    top = found["results"][0]
    assert top["source"] == str((data / "case3.png").resolve()) and top["image"] == 1
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and top["label"] == "left" and top["note"] == "batch 1"
    assert len(found["results"]) == 3 and found["disclaimer"] == DISCLAIMER
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True)

    by_text = json.loads(_ok(cli("search", "query", index, "--text", "bright left", "-k", "2", "-q")))
    assert by_text["query"] == {"text": "bright left"} and len(by_text["results"]) == 2

    info = json.loads(_ok(cli("search", "info", index)))
    assert info["count"] == 8 + N_CT_SLICES and info["sources"] == 9 and info["labels"] == {"left": 4, "right": 4}
    assert info["model"] == "test-tiny-siglip" and info["dim"] == 32


def _save_other_siglip(directory) -> None:
    """Another SigLIP model (other seed, other dimension) saved like downloaded real weights."""
    import torch
    from transformers import SiglipConfig, SiglipModel

    from medlens.models.siglip_tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 64, "pad_token_id": 0},
        vision_config={**tower, "image_size": 112, "patch_size": 56},
    )
    torch.manual_seed(3)
    SiglipModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_a_local_model_directory_works_and_cannot_join_another_models_index(data, tmp_path, cli):
    model_dir = tmp_path / "medsiglip-448"
    _save_other_siglip(model_dir)
    out = _ok(cli("zeroshot", data / "case0.png", "-l", "a", "-l", "b", "--model", model_dir, "-q"))
    result = json.loads(out)
    assert result["model"] == str(model_dir.resolve()) and not any("noise" in w for w in result["warnings"])

    index = tmp_path / "idx"
    _ok(cli("search", "add", index, data / "case0.png", "-q"))
    code, out, err = cli("search", "add", index, data / "case1.png", "--model", model_dir, "-q")
    assert code == 2 and out == "" and str(index) in err and "test-tiny-siglip" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # an index made with the local model remembers it: queries need no --model
    other = tmp_path / "idx2"
    _ok(cli("search", "add", other, data / "case2.png", "--model", model_dir, "-q"))
    found = json.loads(_ok(cli("search", "query", other, data / "case2.png", "-q")))
    assert found["model"] == str(model_dir.resolve()) and found["results"][0]["score"] == pytest.approx(1, abs=1e-4)


@pytest.fixture(scope="module")
def bad(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "wrong.csv").write_text("file,diagnosis\ncase0.png,left\n")
    (root / "one-class.csv").write_text("path,label\n" + "".join(f"{data}/case{i}.png,left\n" for i in range(3)))
    (root / "lonely.csv").write_text(
        "path,label\n" + "".join(f"{data}/case{i}.png,{'a' if i else 'b'}\n" for i in range(4))
    )
    (root / "missing-row.csv").write_text(f"path,label\n{data}/case0.png,a\nnot-there.png,b\n")
    return root


@pytest.mark.parametrize(
    ("args", "named", "reason"),
    [
        (["embed", "{bad}/missing.png", "-o", "{bad}/o.npz"], "{bad}/missing.png", "no such file"),
        (["embed", "{bad}/broken.png", "-o", "{bad}/o.npz"], "{bad}/broken.png", "cannot read image"),
        (["zeroshot", "{data}/case0.png", "-l", " "], None, "label is empty"),
        (["zeroshot", "{data}/case0.png", "-l", "a", "-l", "a"], None, "more than once"),
        (["zeroshot", "{data}/case0.png", "-l", "a", "--template", "no slot"], None, "placeholder"),
        (["zeroshot", "{bad}/missing-row.csv", "-l", "a"], "{bad}/not-there.png", "no such file"),
        (["probe", "{bad}/wrong.csv"], "{bad}/wrong.csv", "columns path,label"),
        (["probe", "{bad}/one-class.csv"], None, "at least 2 classes"),
        (["probe", "{bad}/lonely.csv"], None, "single item"),
        (["probe", "{bad}/absent.csv"], "{bad}/absent.csv", "no such CSV"),
        (["embed", "{data}/case0.png", "-m", "{bad}"], "{bad}", "no config.json"),
        (["embed", "{data}/case0.png", "-m", "test-tiny"], None, "did you mean 'test-tiny-siglip'"),
        (["probe", "apply", "{bad}/wrong.csv", "{data}/case0.png"], "{bad}/wrong.csv", "not a medlens probe"),
        (["siglip", "finetune", "{bad}/absent.jsonl", "-o", "{bad}/run"], "{bad}/absent.jsonl", "no such manifest"),
        (["siglip", "finetune", "{bad}/wrong.csv", "-o", "{bad}/run"], "{bad}/wrong.csv", "path and text"),
        (["siglip", "finetune", "{bad}/missing-row.csv", "-o", "{bad}/run"], "{bad}/not-there.png", "no such file"),
        (["search", "query", "{bad}/no-index", "--text", "x"], "{bad}/no-index", "no such index"),
        (["search", "info", "{bad}"], "{bad}", "not a medlens index"),
    ],
)
def test_bad_inputs_exit_2_with_one_line_naming_the_file(cli, data, bad, args, named, reason):
    quiet = [] if args[:2] == ["search", "info"] else ["-q"]
    code, out, err = cli(*[a.format(data=data, bad=bad) for a in args], *quiet)
    assert code == 2, (out, err)
    assert err.startswith("medlens: error:") and err.count("\n") == 1 and "Traceback" not in err
    assert reason in err
    if named:
        assert named.format(data=data, bad=bad) in err


def test_search_query_needs_exactly_one_of_study_and_text(data, tmp_path, cli):
    _ok(cli("search", "add", tmp_path / "idx", data / "case0.png", "-q"))
    for args in ([], [str(data / "case0.png"), "--text", "x"]):
        code, _out, err = cli("search", "query", tmp_path / "idx", *args, "-q")
        assert code == 2 and "either a study" in err


def test_a_failed_first_add_leaves_no_index_behind(data, tmp_path, cli):
    code, _out, err = cli("search", "add", tmp_path / "idx", data / "case0.png", tmp_path / "gone.png", "-q")
    assert code == 2 and str(tmp_path / "gone.png") in err
    assert not (tmp_path / "idx").exists()
