"""MedSigLIP model loading and embeddings with the built-in test-tiny-siglip and a "real weights" directory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from medlens.errors import MedlensError, ModelNotAvailableError
from medlens.prep.siglip import medsiglip_pixels

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def siglip_encoder():
    from medlens.siglip.encoder import SiglipEncoder

    encoder = SiglipEncoder("test-tiny-siglip")
    yield encoder
    encoder.close()


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(0, 256, (300, 200, 3), dtype=np.uint8),
        rng.integers(0, 256, (512, 512, 3), dtype=np.uint8),
        np.repeat(rng.integers(0, 256, (64, 96, 1), dtype=np.uint8), 3, axis=2),
    ]


def save_local_siglip(directory, image_size: int = 224, patch_size: int = 32, seed: int = 7) -> None:
    """A SiglipModel and tokenizer written with save_pretrained, as `hf download` would leave real weights."""
    from transformers import SiglipConfig, SiglipModel

    from medlens.models.siglip_tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tower = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tower, "vocab_size": len(tokenizer), "max_position_embeddings": 64, "pad_token_id": 0},
        vision_config={**tower, "image_size": image_size, "patch_size": patch_size},
    )
    torch.manual_seed(seed)
    SiglipModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _manual_image_features(encoder, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out = encoder.model.get_image_features(pixel_values=torch.from_numpy(pixels))
    features = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def test_tiny_model_is_built_once_atomically_and_deterministically(siglip_encoder, tmp_path):
    from medlens.models import MARKER_FILE, model_fingerprint
    from medlens.models.siglip_tiny import TINY_SIGLIP_VERSION, ensure_tiny_siglip

    built = ensure_tiny_siglip(tmp_path)
    assert built.name == f"test-tiny-siglip-v{TINY_SIGLIP_VERSION}"
    marker = json.loads((built / MARKER_FILE).read_text())
    assert marker["is_test_model"] is True
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_siglip(tmp_path) == built and (built / "model.safetensors").stat().st_mtime_ns == stamp
    # same seed, same weights: the session's copy (in MEDLENS_CACHE) has the same fingerprint
    assert model_fingerprint(built) == siglip_encoder.fingerprint
    (built / MARKER_FILE).unlink()  # an incomplete directory is rebuilt
    assert (ensure_tiny_siglip(tmp_path) / MARKER_FILE).is_file()


def test_tiny_model_warns_and_has_medsiglip_geometry(siglip_encoder):
    assert siglip_encoder.is_test_model and "noise" in siglip_encoder.warning
    assert siglip_encoder.image_size == 448 and siglip_encoder.dim == 32
    assert siglip_encoder.model.config.model_type == "siglip"


def test_image_embeddings_are_unit_float32_rows_independent_of_batching(siglip_encoder):
    images = _images()
    together = siglip_encoder.embed_images(images, batch_size=8)
    one_by_one = siglip_encoder.embed_images(images, batch_size=1)
    assert together.shape == (3, siglip_encoder.dim) and together.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert not np.allclose(together[0], together[1], atol=1e-3)  # different images, different embeddings
    assert siglip_encoder.embed_images([]).shape == (0, siglip_encoder.dim)


def test_pixels_are_medsiglip_pixels_and_feed_the_vision_tower(siglip_encoder):
    images = _images(1)
    pixels = siglip_encoder.pixels(images)
    assert pixels.shape == (3, 3, 448, 448) and pixels.dtype == np.float32
    for row, image in zip(pixels, images, strict=True):
        np.testing.assert_array_equal(row, medsiglip_pixels(image, 448))
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    expected = _manual_image_features(siglip_encoder, np.stack([medsiglip_pixels(i, 448) for i in images]))
    np.testing.assert_allclose(siglip_encoder.embed_images(images), expected, atol=1e-5)


def test_texts_are_padded_to_exactly_64_tokens_and_pooled_at_the_last_position(siglip_encoder):
    long_text = " ".join(["pleural effusion"] * 60)
    tokens = siglip_encoder.tokenize(["pneumonia", long_text])
    ids = tokens["input_ids"]
    pad = siglip_encoder.tokenizer.pad_token_id
    assert ids.shape == (2, 64)
    n_real = int((ids[0] != pad).sum())
    assert 1 < n_real < 64 and (ids[0, n_real:] == pad).all()  # padded at the end to max_length
    assert (ids[1] != pad).all()  # truncated to 64

    embedded = siglip_encoder.embed_texts(["pneumonia", long_text])
    with torch.inference_mode():
        inputs = {k: torch.from_numpy(v) for k, v in tokens.items()}
        out = siglip_encoder.model.get_text_features(**inputs)
        manual = (out if isinstance(out, torch.Tensor) else out.pooler_output).numpy()
        short = siglip_encoder.tokenizer(["pneumonia"], padding="longest", return_tensors="pt")
        unpadded = siglip_encoder.model.get_text_features(**short)
        unpadded = (unpadded if isinstance(unpadded, torch.Tensor) else unpadded.pooler_output).numpy()
    np.testing.assert_allclose(embedded, manual / np.linalg.norm(manual, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-5)
    unpadded = unpadded / np.linalg.norm(unpadded, axis=1, keepdims=True)
    assert not np.allclose(embedded[0], unpadded[0], atol=1e-3)  # the padding length changes the embedding


def test_logits_and_zero_shot_match_the_model_forward(siglip_encoder):
    from medlens.siglip.zeroshot import label_prompts, zero_shot_scores

    images = _images(2)[:2]
    labels = ["pneumonia", "normal chest", "pleural effusion"]
    prompts = label_prompts(labels, "a chest x-ray showing {label}")
    assert prompts[1] == "a chest x-ray showing normal chest"
    logits = siglip_encoder.logits(siglip_encoder.embed_images(images), siglip_encoder.embed_texts(prompts))
    tokens = siglip_encoder.tokenize(prompts)
    with torch.inference_mode():
        forward = siglip_encoder.model(
            pixel_values=torch.from_numpy(siglip_encoder.pixels(images)),
            **{k: torch.from_numpy(v) for k, v in tokens.items()},
        )
    np.testing.assert_allclose(logits, forward.logits_per_image.numpy(), atol=1e-4)
    scale = float(siglip_encoder.model.logit_scale.detach().exp())
    assert scale == pytest.approx(10.0) and siglip_encoder.logit_bias == pytest.approx(-10.0)

    scores = zero_shot_scores(logits[0], labels)
    assert scores.softmax.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(scores.softmax, np.exp(logits[0]) / np.exp(logits[0]).sum(), rtol=1e-6)
    np.testing.assert_allclose(scores.sigmoid, 1 / (1 + np.exp(-logits[0].astype(np.float64))), rtol=1e-6)
    assert scores.top_label == labels[int(np.argmax(logits[0]))]
    as_dict = scores.as_dict()
    assert set(as_dict["softmax"]) == set(labels) and as_dict["top_label"] == scores.top_label


def test_a_local_directory_is_the_real_weights_path(tmp_path):
    from medlens.siglip.encoder import SiglipEncoder

    save_local_siglip(tmp_path / "medsiglip")
    encoder = SiglipEncoder(str(tmp_path / "medsiglip"))
    assert encoder.name == str((tmp_path / "medsiglip").resolve())
    assert not encoder.is_test_model and encoder.warning is None
    assert encoder.image_size == 224 and encoder.dim == 16  # the config's vision image_size is honoured
    assert encoder.pixels(_images()[:1]).shape == (1, 3, 224, 224)
    embedded = encoder.embed_images(_images())
    assert embedded.shape == (3, 16)
    np.testing.assert_allclose(embedded, _manual_image_features(encoder, encoder.pixels(_images())), atol=1e-5)
    assert encoder.embed_texts(["pneumonia"]).shape == (1, 16)


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        ("missing", "not available offline"),
        ("typo", "did you mean 'test-tiny-siglip'"),
        ("no-config", "no config.json"),
        ("other-type", "model_type 'gemma3'"),
        ("file", "a file"),
    ],
)
def test_models_that_are_not_siglip_are_refused_clearly(tmp_path, setup, match):
    from medlens.models import EMBED, resolve_model

    target = {
        "missing": str(tmp_path / "nowhere"),
        "typo": "test-tiny-siglp",
        "no-config": str(tmp_path),
        "other-type": str(tmp_path),
        "file": str(tmp_path / "weights.bin"),
    }[setup]
    if setup == "other-type":
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    if setup == "file":
        (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelNotAvailableError, match=match) as info:
        resolve_model(target, EMBED)
    if setup != "typo":
        assert str(tmp_path) in str(info.value)


def test_device_and_dtype_errors_are_medlens_errors():
    from medlens.siglip.encoder import SiglipEncoder

    with pytest.raises(MedlensError, match="dtype"):
        SiglipEncoder("test-tiny-siglip", dtype="int8")
    with pytest.raises(MedlensError, match="device"):
        SiglipEncoder("test-tiny-siglip", device="tpu")


def test_label_checks():
    from medlens.siglip.zeroshot import clean_labels, label_prompts, pool_embeddings, zero_shot_scores

    assert clean_labels(["  pleural   effusion ", "normal"]) == ["pleural effusion", "normal"]
    for bad, match in [([], "no labels"), (["a", " "], "empty"), (["a", "b", "a "], "more than once")]:
        with pytest.raises(MedlensError, match=match):
            clean_labels(bad)
    with pytest.raises(MedlensError, match="placeholder"):
        label_prompts(["a"], "a chest x-ray")
    assert zero_shot_scores(np.array([-3.0]), ["a"]).warnings  # one label: the softmax means nothing
    pooled = pool_embeddings(np.array([[1.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(pooled, [2**-0.5, 2**-0.5], rtol=1e-6)


def test_importing_the_siglip_modules_stays_light():
    code = (
        "import sys\n"
        "import medlens.cli, medlens.siglip.index, medlens.siglip.probe, medlens.siglip.inputs\n"
        "heavy = [m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
