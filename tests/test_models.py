"""The models layer: one resolver, device and dtype rules, one fingerprint, for MedGemma backends and MedSigLIP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medlens.errors import MedlensError, ModelNotAvailableError
from medlens.models import BUILTIN_MODELS, EMBED, GENERATE, MARKER_FILE, model_fingerprint, resolve_model
from medlens.models.device import check_device_name, check_dtype_name


def test_models_layer_imports_no_model_library() -> None:
    code = (
        "import sys, medlens.models, medlens.models.gguf, medlens.models.gemma_tiny, medlens.models.siglip_tiny; "
        "assert not {'torch', 'transformers'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_registry_holds_every_builtin_with_its_purpose() -> None:
    purposes = {name: BUILTIN_MODELS.get(name).purpose for name in BUILTIN_MODELS}
    assert purposes == {"gemma-3-270m": GENERATE, "test-tiny": GENERATE, "test-tiny-siglip": EMBED}


@pytest.mark.parametrize(
    ("name", "purpose", "match"),
    [
        ("test-tiny-siglip", GENERATE, "not to generate with; did you mean 'test-tiny'"),
        ("test-tiny", EMBED, "not to embed with; did you mean 'test-tiny-siglip'"),
        ("test-tny", GENERATE, "did you mean 'test-tiny'"),
        ("someone/not-cached", GENERATE, r"not a built-in \(gemma-3-270m, test-tiny\), a local directory or in the"),
        ("./no/such/dir", EMBED, "no such directory"),
    ],
)
def test_names_resolve_for_their_purpose_only(name: str, purpose: str, match: str) -> None:
    with pytest.raises(ModelNotAvailableError, match=match):
        resolve_model(name, purpose)


def test_a_siglip_folder_is_refused_for_generation_and_a_gemma_folder_for_embedding(tmp_path: Path) -> None:
    siglip, gemma = tmp_path / "siglip", tmp_path / "gemma"
    for folder, model_type in ((siglip, "siglip"), (gemma, "gemma3")):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(ModelNotAvailableError, match="embeds, it does not answer") as info:
        resolve_model(str(siglip), GENERATE)
    assert str(siglip) in str(info.value)
    assert resolve_model(str(siglip), EMBED).model_type == "siglip"
    with pytest.raises(ModelNotAvailableError, match="model_type 'gemma3'"):
        resolve_model(str(gemma), EMBED)
    source = resolve_model(str(gemma), GENERATE)
    assert (source.path, source.model_type, source.text_only, source.is_test_model) == (gemma, "gemma3", None, False)


def test_a_built_copy_keeps_what_its_marker_says(tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    marker = {"name": "test-tiny", "is_test_model": True, "default_max_new_tokens": 16}
    (folder / MARKER_FILE).write_text(json.dumps(marker))
    source = resolve_model(str(folder))
    assert source.is_test_model and source.default_max_new_tokens == 16
    assert source.warning == BUILTIN_MODELS.get("test-tiny").warning  # the built-in's warning, not lost


def test_device_and_dtype_spellings() -> None:
    assert [check_device_name(d) for d in ("auto", "CPU", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    assert [check_dtype_name(d) for d in ("auto", "bf16", "FP32", "half")] == ["auto", "bfloat16", "float32", "float16"]
    with pytest.raises(MedlensError, match="unknown device 'tpu'"):
        check_device_name("tpu")
    with pytest.raises(MedlensError, match="unknown dtype 'int8'"):
        check_dtype_name("int8")


def test_device_and_dtype_selection_on_this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from medlens.models import device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device.select_device(torch, "auto") == "cpu"
    with pytest.raises(MedlensError, match="no CUDA GPU is available"):
        device.select_device(torch, "cuda:0")
    assert device.select_dtype(torch, "auto", "cpu") is torch.float32
    assert device.select_dtype(torch, "fp16", "cpu") is torch.float16
    monkeypatch.setattr(device, "cpu_supports_bfloat16", lambda _torch: False)
    with pytest.raises(MedlensError, match="without native bfloat16 support"):
        device.select_dtype(torch, "bfloat16", "cpu")
    monkeypatch.setattr(device, "cpu_supports_bfloat16", lambda _torch: True)
    assert device.select_dtype(torch, "bf16", "cpu") is torch.bfloat16


def test_fingerprint_follows_content_not_place(tmp_path: Path) -> None:
    from medlens.models import fingerprint

    def folder(name: str, weights: bytes) -> Path:
        path = tmp_path / name
        (path / ".cache").mkdir(parents=True)
        (path / "config.json").write_text('{"model_type": "gemma3"}')
        (path / "model.safetensors").write_bytes(weights)
        (path / ".cache" / "download.lock").write_text(name)  # hf download's bookkeeping: ignored
        return path

    big = bytes(range(256)) * (fingerprint.WHOLE_FILE_BYTES // 256 + 4096)
    a, b = folder("a", big), folder("b", big)
    assert model_fingerprint(a) == model_fingerprint(b) and len(model_fingerprint(a)) == 16
    middle = bytearray(big)
    middle[len(big) // 2] ^= 0xFF  # inside the middle sample of a large file
    assert model_fingerprint(folder("c", bytes(middle))) != model_fingerprint(a)
    assert model_fingerprint(folder("d", big + b"\0")) != model_fingerprint(a)  # another size
    (b / "config.json").write_text('{"model_type": "gemma3", "x": 1}')  # small files count byte for byte
    assert model_fingerprint(b) != model_fingerprint(a)
    assert model_fingerprint(a / "model.safetensors") != model_fingerprint(a)  # one file: its own tag


def test_backend_and_siglip_share_the_fingerprint_and_the_journal_uses_it(tiny_backend, tmp_path: Path) -> None:
    from medlens.siglip.encoder import SiglipEncoder

    assert tiny_backend.fingerprint == model_fingerprint(tiny_backend.model_path)
    assert tiny_backend.revision == tiny_backend.fingerprint
    encoder = SiglipEncoder("test-tiny-siglip")
    assert encoder.fingerprint == model_fingerprint(encoder.directory)
    assert (encoder.device, str(encoder.dtype)) == ("cpu", "torch.float32")  # auto on a CPU machine


def test_engine_options_are_checked_against_the_engine() -> None:
    from medlens.backends import engine_options, load_backend

    assert engine_options() == {}
    assert engine_options("cpu", "auto", {"timeout": 5}) == {"device": "cpu", "timeout": 5}
    with pytest.raises(MedlensError, match="engine transformers takes no option 'sharee_prefix'; did you mean"):
        load_backend("test-tiny", sharee_prefix=False)
    with pytest.raises(MedlensError, match="engine openai takes no option 'device'"):
        load_backend("openai:m@http://127.0.0.1:9/v1", device="cuda")


def test_bfloat16_runs_test_tiny_where_the_cpu_supports_it() -> None:
    torch = pytest.importorskip("torch")
    from medlens.backends import GenerationRequest, load_backend
    from medlens.models.device import cpu_supports_bfloat16

    if not cpu_supports_bfloat16(torch):
        pytest.skip("this CPU has no native bfloat16 (AVX-512/AMX): medlens refuses it, tested above")
    with load_backend("test-tiny", device="cpu", dtype="bfloat16") as backend:
        assert backend.model.dtype == torch.bfloat16
        (out,) = backend.generate([GenerationRequest([{"role": "user", "content": "Is there an effusion?"}], 4)])
        assert 1 <= out.completion_tokens <= 4
