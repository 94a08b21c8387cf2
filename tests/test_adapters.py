"""PEFT adapters everywhere (``--adapter DIR``): a LoRA made here with peft on test-tiny changes greedy outputs,
reloads to the same outputs through every generate path, is part of the backend's identity (so the eval journal
never reuses a base output for it), is recorded in the envelope and by the server, and is refused with one line
when the folder is not an adapter, does not fit, or goes to an engine that cannot load it (docs/adapters.md)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft")

from eval_data import build_all, write_png

from medlens.backends import (
    AdapterNotSupportedError,
    GenerationRequest,
    check_backend_options,
    identify_backend,
    load_backend,
)
from medlens.backends.vllm_backend import lora_rank_limit
from medlens.errors import InputError
from medlens.eval.registry import get_benchmark
from medlens.eval.runner import run_benchmark
from medlens.models.adapter import MEDLENS_FILE, AdapterError, read_adapter

RANK = 4


def make_adapter(folder: Path, seed: int = 0, targets: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """A LoRA on test-tiny saved by peft, its A and B weights seeded random (non-zero), so outputs change."""
    import peft
    import torch
    import transformers

    from medlens.models import GENERATE, resolve_model

    path = resolve_model("test-tiny", GENERATE).path
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(targets), init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(tmp_path_factory.mktemp("adapters") / "lora-a")


@pytest.fixture(scope="module")
def adapted(adapter):
    backend = load_backend("test-tiny", adapter=str(adapter))
    yield backend
    backend.close()


def _image(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)


def _requests() -> list[GenerationRequest]:
    """Two questions about one image (a shared prefix), another image, and a text-only prompt."""
    image, other = _image(1), _image(2)
    instruction = "Describe this chest radiograph carefully, paying attention to the lungs and the heart size. "

    def ask(picture: np.ndarray | None, question: str) -> GenerationRequest:
        content = [] if picture is None else [{"type": "image", "image": picture}]
        content.append({"type": "text", "text": instruction + question})
        return GenerationRequest([{"role": "user", "content": content}], max_new_tokens=6)

    return [
        ask(image, "Is there an effusion?"),
        ask(image, "Is the heart enlarged?"),
        ask(other, "Is there a pneumothorax?"),
        ask(None, "What is atelectasis?"),
    ]


def _texts(backend, requests) -> list[str]:
    return [o.text for o in backend.generate(requests)]


def test_adapter_changes_outputs_and_reloads_to_the_same_ones_on_every_path(tiny_backend, adapter, adapted):
    requests = _requests()
    base = _texts(tiny_backend, requests)
    with_adapter = _texts(adapted, requests)
    assert with_adapter != base
    assert sum(a != b for a, b in zip(with_adapter, base, strict=True)) >= 3
    # one at a time (no shared prefix, no batch) gives what the shared-prefix group and the batch gave
    alone = [adapted.generate_one(r).text for r in _requests()]
    assert alone == with_adapter
    with load_backend("test-tiny", adapter=str(adapter), batch_size=1, share_prefix=False) as again:
        assert _texts(again, _requests()) == with_adapter


def test_identity_names_base_and_adapter(tiny_backend, adapter, adapted, tmp_path):
    info = read_adapter(adapter)
    assert adapted.adapter == info and tiny_backend.adapter is None
    assert adapted.fingerprint == f"{tiny_backend.fingerprint}+adapter:{info.sha256[:16]}"
    assert adapted.revision == adapted.fingerprint != tiny_backend.revision
    predicted = identify_backend("test-tiny", adapter=str(adapter))
    assert predicted is not None
    assert predicted.revision == adapted.revision and predicted.adapter == {"name": "lora-a", "sha256": info.sha256}
    copy = shutil.copytree(adapter, tmp_path / "renamed")
    assert read_adapter(copy).sha256 == info.sha256  # the content counts, not the folder's name
    weights = copy / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert read_adapter(copy).sha256 != info.sha256


def short_benchmark(folder: Path) -> tuple[str, Path]:
    """PubMedQA's spec with an 8-token cap (so that each run takes a fraction of a second), and its data."""
    spec = get_benchmark("pubmedqa")[1].read_text().replace("max_new_tokens: 512", "max_new_tokens: 8")
    (folder / "pubmedqa-short.yaml").write_text(spec)
    return str(folder / "pubmedqa-short.yaml"), build_all(folder / "data")


def test_an_adapter_never_reuses_base_outputs_in_the_eval_journal(tiny_backend, adapter, adapted, tmp_path):
    spec, data = short_benchmark(tmp_path)
    run = tmp_path / "run"
    base = run_benchmark(spec, tiny_backend, out_dir=run, data=data, n_resamples=100)
    assert base["n_reused"] == 0 and base["adapter"] is None
    first = run_benchmark(spec, adapted, out_dir=run, data=data, n_resamples=100)
    assert first["n_reused"] == 0 and first["n_items"] == base["n_items"] > 0
    assert first["adapter"]["sha256"] == read_adapter(adapter).sha256
    again = run_benchmark(spec, "test-tiny", out_dir=run, data=data, backend_options={"adapter": str(adapter)})
    assert again["n_reused"] == again["n_items"] and again["model_revision"] == adapted.revision
    back = run_benchmark(spec, "test-tiny", out_dir=run, data=data, n_resamples=100)
    assert back["n_reused"] == back["n_items"] and back["adapter"] is None
    other = make_adapter(tmp_path / "lora-b", seed=1)
    changed = run_benchmark(spec, "test-tiny", out_dir=run, data=data, backend_options={"adapter": str(other)})
    assert changed["n_reused"] == 0


def test_eval_cli_writes_adapted_runs_to_their_own_folder(adapter, tmp_path, cli, monkeypatch):
    spec, data = short_benchmark(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("eval", "-b", spec, "--data", data, "--adapter", adapter, "-q", "--resamples", "100")
    assert code == 0, err
    assert "runs/pubmedqa-short-test-tiny+lora-a" in out and "adapter lora-a (" in out
    results = json.loads((tmp_path / "runs" / "pubmedqa-short-test-tiny+lora-a" / "results.json").read_text())
    assert results["adapter"]["name"] == "lora-a"


def test_ask_records_the_adapter_in_the_envelope(adapter, adapted, tmp_path, cli):
    png = tmp_path / "cxr.png"
    write_png(png, seed=3)
    code, out, err = cli("ask", png, "Is there an effusion?", "--adapter", adapter, "--max-new-tokens", "4", "-q")
    assert code == 0, err
    envelope = json.loads(out)
    assert envelope["adapter"] == read_adapter(adapter).identity()
    assert envelope["model_fingerprint"] == adapted.fingerprint


def _broken(tmp_path: Path, adapter: Path, name: str) -> Path:
    return shutil.copytree(adapter, tmp_path / name)


def test_folders_that_are_not_adapters_are_refused_in_one_line(adapter, tmp_path, cli):
    png = tmp_path / "cxr.png"
    write_png(png, seed=4)
    no_weights = _broken(tmp_path, adapter, "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    bad_json = _broken(tmp_path, adapter, "bad-json")
    (bad_json / "adapter_config.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = {
        tmp_path / "missing": "no such adapter folder",
        tmp_path / "empty": "no adapter_config.json",
        no_weights: "no adapter weights",
        bad_json: "adapter_config.json is not valid JSON",
        png: "not a file",
    }
    for folder, reason in cases.items():
        code, _, err = cli("ask", png, "Q?", "--adapter", folder, "-q")
        assert code == 2, (folder, err)
        assert err.count("\n") == 1 and str(folder) in err and reason in err and "Traceback" not in err
    spec, data = short_benchmark(tmp_path)
    code, _, err = cli("eval", "-b", spec, "--data", data, "--adapter", no_weights, "-q")
    assert code == 2 and str(no_weights) in err and "no adapter weights" in err


def test_an_adapter_for_another_base_or_other_shapes_is_refused(adapter, tmp_path, cli):
    png = tmp_path / "cxr.png"
    write_png(png, seed=5)
    other_base = _broken(tmp_path, adapter, "other-base")
    meta = {"base_model": "google/medgemma-4b-it", "base_revision": "0123456789abcdef", "recipe": "lora"}
    (other_base / MEDLENS_FILE).write_text(json.dumps(meta))
    code, _, err = cli("ask", png, "Q?", "--adapter", other_base, "-q")
    assert code == 2 and err.count("\n") == 1 and str(other_base) in err
    assert "trained on google/medgemma-4b-it (revision 0123456789abcdef), not on test-tiny" in err

    def edited(name: str, **changes) -> Path:
        folder = _broken(tmp_path, adapter, name)
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return folder

    cases = {
        edited("wider", r=2 * RANK): "size mismatch",
        edited("elsewhere", target_modules=["no_such_proj"]): "no_such_proj",
        edited("fewer", target_modules=["q_proj", "v_proj", "k_proj"]): "adapter weights missing",
    }
    for folder, reason in cases.items():
        with pytest.raises(AdapterError) as caught:
            load_backend("test-tiny", adapter=str(folder))
        assert isinstance(caught.value, InputError)
        assert caught.value.path == str(folder.resolve()) and reason in caught.value.reason
    # the same base recorded by medlens finetune is accepted
    own = _broken(tmp_path, adapter, "own-base")
    base_revision = identify_backend("test-tiny").revision  # type: ignore[union-attr]
    (own / MEDLENS_FILE).write_text(json.dumps({"base_model": "test-tiny", "base_revision": base_revision}))
    assert identify_backend("test-tiny", adapter=str(own)).adapter["name"] == "own-base"  # type: ignore[union-attr]


def test_engines_that_cannot_load_an_adapter_refuse_it_and_say_how(adapter, tmp_path, cli):
    with pytest.raises(AdapterNotSupportedError, match="load the adapter there"):
        load_backend("openai:medgemma@http://127.0.0.1:9/v1", adapter=str(adapter))
    with pytest.raises(AdapterNotSupportedError, match="GGUF"):
        check_backend_options("gemma-3-270m", "llamacpp", adapter=str(adapter))
    check_backend_options("test-tiny", "vllm", adapter=str(adapter))  # vLLM takes it (LoRARequest)
    png = tmp_path / "cxr.png"
    write_png(png, seed=6)
    code, _, err = cli("ask", png, "Q?", "--engine", "openai", "--adapter", adapter, "-q")
    assert code == 2 and err.count("\n") == 1 and "engine openai cannot load --adapter" in err
    code, _, err = cli("serve", "--engine", "openai", "--adapter", adapter)
    assert code == 2 and "engine openai cannot load --adapter" in err


def test_vllm_gets_lora_options_from_the_adapter(adapter, monkeypatch):
    assert [lora_rank_limit(r) for r in (None, 1, 4, 16, 17, 300)] == [16, 1, 8, 16, 32, 320]
    import sys
    import types

    built, calls = [], []

    class LLM:
        def __init__(self, **options):
            built.append(options)

        def generate(self, prompts, params, use_tqdm=True, lora_request=None):
            calls.append(lora_request)
            completion = types.SimpleNamespace(text="no<end_of_turn>", token_ids=[5, 1])
            return [types.SimpleNamespace(prompt_token_ids=[1, 2], outputs=[completion]) for _ in prompts]

    class LoRARequest:
        def __init__(self, lora_name, lora_int_id, lora_path):
            self.args = (lora_name, lora_int_id, lora_path)

    vllm = types.ModuleType("vllm")
    vllm.__version__, vllm.LLM, vllm.SamplingParams = "0.20.0", LLM, dict
    lora = types.ModuleType("vllm.lora")
    request_module = types.ModuleType("vllm.lora.request")
    request_module.LoRARequest = LoRARequest
    for name, module in (("vllm", vllm), ("vllm.lora", lora), ("vllm.lora.request", request_module)):
        monkeypatch.setitem(sys.modules, name, module)
    backend = load_backend("vllm:test-tiny", adapter=str(adapter))
    assert backend.fingerprint.endswith("+adapter:" + read_adapter(adapter).sha256[:16])
    backend.generate(_requests()[3:])
    assert built[0]["enable_lora"] is True and built[0]["max_lora_rank"] == 8 and built[0]["max_loras"] == 1
    assert calls[0].args == ("lora-a", 1, str(adapter.resolve()))


def test_the_server_names_its_adapter(adapter, adapted, tmp_path):
    from fastapi.testclient import TestClient
    from test_serve_api import ct_parts

    from medlens.serve.app import create_app
    from medlens.serve.settings import ServeSettings

    identity = read_adapter(adapter).identity()
    settings = ServeSettings(data_dir=tmp_path / "serve", engine_options={"adapter": str(adapter)})
    with TestClient(create_app(settings, backend=adapted)) as client:
        assert client.get("/health").json() == {"status": "ok", "adapter": identity}
        assert client.get("/ready").json()["adapter"] == identity
        assert client.get("/v1/models").json()["models"][0]["adapter"] == identity
        form = {"question": "Is there a fracture?", "options": json.dumps({"max_new_tokens": 3})}
        result = client.post("/v1/analyze", files=ct_parts(tmp_path / "ct"), data=form).json()
        assert result["adapter"] == identity and result["model_fingerprint"] == adapted.fingerprint


def test_quantization_is_part_of_the_revision_and_needs_cuda():
    from medlens.backends import identify_backend, load_backend
    from medlens.errors import MedlensError

    plain = identify_backend("test-tiny").revision
    assert identify_backend("test-tiny", quantization="4bit").revision == plain + "+nf4"
    assert identify_backend("test-tiny", quantization="8bit").revision == plain + "+int8"
    with pytest.raises(MedlensError, match="needs a CUDA GPU"):
        load_backend("test-tiny", device="cpu", quantization="4bit")
    with pytest.raises(MedlensError, match="quantization must be one of 4bit, 8bit"):
        identify_backend("test-tiny", quantization="3bit")
