"""MedSigLIP contrastive fine-tuning with test-tiny-siglip: the sigmoid loss, training, saving, reloading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.errors import InputError, NotFoundError, OutputFolderError

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

N_CT_SLICES = 6


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Five image-text pairs (bright left / right half, one CT series paired with two images) as JSONL."""
    root = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(1)
    rows = []
    for i in range(4):
        image = rng.integers(0, 60, (96, 128, 3), dtype=np.uint8)
        side = "left" if i % 2 else "right"
        image[:, :64] += 180 if side == "left" else 0
        image[:, 64:] += 180 if side == "right" else 0
        Image.fromarray(image).save(root / f"case{i}.png")
        rows.append({"id": f"r{i}", "inputs": [f"case{i}.png"], "text": f"a picture bright on the {side} side {i}"})
    hu, _ = ct_phantom(n_slices=N_CT_SLICES, size=48)
    write_ct_series(hu, root / "ct")
    rows.append({"inputs": ["ct", "case0.png"], "text": "a ct slice of the abdomen"})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def encoder():
    from medlens.models.siglip_encoder import SiglipEncoder

    loaded = SiglipEncoder("test-tiny-siglip")
    yield loaded
    loaded.close()


def _units(encoder, images):
    pixels = torch.from_numpy(encoder.pixels(images))
    with torch.no_grad():
        out = encoder.model.get_image_features(pixel_values=pixels)
    return torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)


def test_sigmoid_loss_is_transformers_loss_for_distinct_pairs_and_counts_equal_texts_as_positive(encoder):
    from medlens.finetune.siglip_contrastive_data import same_text_mask
    from medlens.finetune.siglip_contrastive_loss import sigmoid_loss

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    texts = ["pneumonia", "a normal chest radiograph", "cardiomegaly"]
    tokens = {k: torch.from_numpy(v) for k, v in encoder.tokenize(texts).items()}
    with torch.no_grad():
        expected = encoder.model(pixel_values=torch.from_numpy(encoder.pixels(images)), return_loss=True, **tokens).loss
        out = encoder.model.get_text_features(**tokens)
    text_units = torch.nn.functional.normalize(out if isinstance(out, torch.Tensor) else out.pooler_output, dim=-1)
    image_units = _units(encoder, images)
    scale, bias = encoder.model.logit_scale.detach(), encoder.model.logit_bias.detach()
    ours = sigmoid_loss(image_units, text_units, scale, bias, torch.from_numpy(same_text_mask(texts)))
    assert float(ours) == pytest.approx(float(expected), rel=1e-5)

    repeated = ["Pneumonia ", "pneumonia", "cardiomegaly"]
    mask = same_text_mask(repeated)
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    diagonal = sigmoid_loss(image_units, text_units, scale, bias, torch.eye(3, dtype=torch.bool))
    assert float(sigmoid_loss(image_units, text_units, scale, bias, torch.from_numpy(mask))) != pytest.approx(
        float(diagonal)
    )


def test_rows_pool_their_images_as_embed_pools_a_study(encoder):
    from medlens.finetune.siglip_contrastive_loss import pool_rows
    from medlens.siglip.zeroshot import pool_embeddings

    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (50, 70, 3), dtype=np.uint8) for _ in range(5)]
    units = _units(encoder, images)
    pooled = pool_rows(units * 3.0, [1, 3, 1]).numpy()  # un-normalised input: normalised per image first
    reference = encoder.embed_images(images)
    np.testing.assert_allclose(pooled[0], reference[0], atol=1e-5)
    np.testing.assert_allclose(pooled[1], pool_embeddings(reference[1:4]), atol=1e-5)
    np.testing.assert_allclose(pooled[2], reference[4], atol=1e-5)


@pytest.mark.parametrize(("method", "lr"), [("full", 1e-2), ("lora", 5e-2)])
def test_loss_falls_and_the_saved_model_loads_with_other_embeddings(pairs, tmp_path, encoder, method, lr):
    from medlens.finetune.siglip_contrastive import ContrastiveConfig, finetune_siglip
    from medlens.models.fingerprint import model_fingerprint
    from medlens.models.siglip_encoder import SiglipEncoder

    config = ContrastiveConfig(steps=6, batch_size=5, lr=lr, method=method, warmup_ratio=0.0)
    summary = finetune_siglip(pairs / "pairs.jsonl", tmp_path / "run", config=config)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 7)) and summary["first_loss"] == log[0]["loss"]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"], [e["loss"] for e in log]
    assert log[0]["loss"] == pytest.approx(11.01, abs=0.05)  # tiny model at its init (measured)
    assert log[0]["lr"] == pytest.approx(lr) and log[-1]["lr"] == pytest.approx(lr / 6)  # linear decay, no warmup
    assert log[-1]["temperature"] != pytest.approx(10.0)  # the learnable temperature learns in both methods
    assert json.loads((tmp_path / "run" / "run.json").read_text())["last_loss"] == log[-1]["loss"]

    model_dir = tmp_path / "run" / "model"
    assert not any("lora" in p.name for p in model_dir.iterdir())  # adapters merged: a plain SigLIP folder
    tuned = SiglipEncoder(str(model_dir))
    assert tuned.fingerprint == summary["fingerprint"] == model_fingerprint(model_dir) != encoder.fingerprint
    assert tuned.is_test_model and "noise" in tuned.warning  # fine-tuned noise is still noise
    image = np.asarray(Image.open(pairs / "case1.png").convert("RGB"))
    before, after = encoder.embed_images([image]), tuned.embed_images([image])
    assert after.shape == before.shape and float(before[0] @ after[0]) < 0.999
    assert json.loads((model_dir / "medlens_model.json").read_text())["base_fingerprint"] == encoder.fingerprint


def test_runs_are_seeded(pairs, tmp_path):
    from medlens.finetune.siglip_contrastive import ContrastiveConfig, finetune_siglip

    def losses(seed: int, name: str, checkpointing: bool = False) -> list[float]:
        config = ContrastiveConfig(
            steps=3, batch_size=2, lr=1e-2, method="lora", seed=seed, gradient_checkpointing=checkpointing
        )
        finetune_siglip(pairs / "pairs.jsonl", tmp_path / name, config=config)
        return [json.loads(line) for line in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    first, again, other = losses(0, "a"), losses(0, "b"), losses(1, "c")
    assert [(e["rows"], e["loss"]) for e in first] == [(e["rows"], e["loss"]) for e in again]
    checkpointed = losses(0, "d", checkpointing=True)  # recomputing activations changes no number
    assert [e["loss"] for e in checkpointed] == pytest.approx([e["loss"] for e in first], abs=1e-5)
    assert [e["rows"] for e in first] != [e["rows"] for e in other]
    seen = [row for e in first[:2] for row in e["rows"]]
    assert len(set(seen[:4])) == 4  # batches draw without replacement within an epoch


def test_bad_manifests_and_outputs_are_typed_errors(pairs, tmp_path):
    from medlens.finetune.siglip_contrastive import ContrastiveConfig, finetune_siglip

    cases = {
        "one.jsonl": ('{"inputs": ["case0.png"], "text": "x"}\n', InputError, "at least 2 pairs"),
        "notext.jsonl": ('{"inputs": ["case0.png"]}\n{"inputs": ["case1.png"], "text": "y"}\n', InputError, "line 1"),
        "gone.jsonl": ('{"inputs": ["nope.png"], "text": "x"}\n{"inputs": ["case1.png"], "text": "y"}\n', None, ""),
        "cols.csv": ("path,diagnosis\ncase0.png,a\n", InputError, "path and text"),
    }
    for name, (content, kind, reason) in cases.items():
        (pairs / name).write_text(content)
        with pytest.raises(kind or NotFoundError) as caught:
            finetune_siglip(pairs / name, tmp_path / name)
        assert reason in str(caught.value)
        if kind is None:
            assert str(pairs / "nope.png") in str(caught.value)
    with pytest.raises(InputError, match="batch size"):
        finetune_siglip(pairs / "pairs.jsonl", tmp_path / "x", config=ContrastiveConfig(batch_size=1))
    (tmp_path / "done" / "model").mkdir(parents=True)
    with pytest.raises(OutputFolderError, match="--overwrite"):
        finetune_siglip(pairs / "pairs.jsonl", tmp_path / "done", config=ContrastiveConfig(steps=1))


def test_the_schedule_is_transformers_linear_warmup_and_decay():
    from transformers import get_linear_schedule_with_warmup

    from medlens.finetune.siglip_contrastive import linear_schedule

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(optimizer, num_warmup_steps=3, num_training_steps=10)
    expected = [reference.lr_lambdas[0](step) for step in range(12)]
    assert [linear_schedule(step, 3, 10) for step in range(12)] == pytest.approx(expected)
