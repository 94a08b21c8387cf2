"""The vLLM backend's own logic (prompt rendering, engine limits, sampling, outputs) against a recording stand-in
for ``vllm``: vLLM itself needs a CUDA GPU and none is here (docs/engines.md; bench/gpu_parity.py runs the
real engine against the transformers backend where one is lent)."""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field

import numpy as np
import pytest

pytest.importorskip("torch")

from medlens.backends import GenerationRequest, load_backend
from medlens.backends.base import GenerationFailed
from medlens.backends.vllm_backend import TESTED_VERSIONS, VLLMBackend, version_warning
from medlens.errors import BackendUnavailableError, MedlensError


@dataclass
class _Completion:
    text: str
    token_ids: list[int]


@dataclass
class _Result:
    prompt_token_ids: list[int]
    outputs: list[_Completion]


@dataclass
class FakeVLLM:
    """Records every engine built and every generate call; answers with scripted token ids."""

    version: str = "0.20.0"
    engines: list[dict] = field(default_factory=list)
    calls: list[tuple[list, list]] = field(default_factory=list)
    answer: list[int] = field(default_factory=lambda: [11, 12])

    def module(self) -> types.ModuleType:
        fake = self

        class LLM:
            def __init__(self, **options) -> None:
                fake.engines.append(options)

            def generate(self, prompts, params, use_tqdm=True):
                fake.calls.append((prompts, params))
                return [
                    _Result(list(range(7)), [_Completion("Final Answer: no<end_of_turn>", fake.answer)])
                    for _ in prompts
                ]

        def sampling(**options):
            return dict(options)

        module = types.ModuleType("vllm")
        module.__version__ = self.version
        module.LLM = LLM
        module.SamplingParams = sampling
        return module


@pytest.fixture
def fake(monkeypatch):
    recorder = FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", recorder.module())
    return recorder


def _volume_request(n_images: int, question: str, **options) -> GenerationRequest:
    rng = np.random.default_rng(n_images)
    content = []
    for n in range(n_images):
        content += [
            {"type": "image", "image": rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)},
            {"type": "text", "text": f"SLICE {n + 1}"},
        ]
    content.append({"type": "text", "text": question})
    return GenerationRequest([{"role": "user", "content": content}], **options)


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(BackendUnavailableError, match=r"medlens\[vllm\]"):
        VLLMBackend("test-tiny")


def test_prompts_and_token_counts_are_those_of_the_transformers_engine(fake, tiny_backend):
    backend = load_backend("vllm:test-tiny")
    assert (
        isinstance(backend, VLLMBackend) and backend.is_test_model and backend.fingerprint == tiny_backend.fingerprint
    )
    requests = [_volume_request(3, "Is there an effusion?"), _volume_request(3, "Is there a nodule?")]
    outputs = backend.generate(requests)
    ((prompts, params),) = fake.calls
    for request, prompt in zip(requests, prompts, strict=True):
        rendered = tiny_backend.render(request.messages)  # one rendering for both engines
        assert rendered.startswith("<bos>") and prompt["prompt"] == rendered.removeprefix("<bos>")  # vLLM adds it
        sent = [np.asarray(image) for image in prompt["multi_modal_data"]["image"]]
        given = [part["image"] for part in request.messages[0]["content"] if part["type"] == "image"]
        assert all(np.array_equal(a, b) for a, b in zip(sent, given, strict=True))  # lossless, in order
        expected = int(tiny_backend.prepare(request.messages)["input_ids"].shape[1])
        assert backend.prompt_tokens(rendered, 3) == expected  # counted without processing images
    assert params[0] == {
        "max_tokens": 16,
        "stop_token_ids": backend._stop_ids,
        "skip_special_tokens": False,
        "temperature": 0.0,
    }
    assert [(o.text, o.completion_tokens, o.prompt_tokens, o.finish_reason) for o in outputs] == [
        ("Final Answer: no", 2, 7, "stop")
    ] * 2


def test_engine_limits_follow_the_requests_and_grow_once_needed(fake):
    backend = VLLMBackend("test-tiny", dtype="bf16", gpu_memory_utilization=0.5)
    backend.generate([_volume_request(2, "Q?", max_new_tokens=4)])
    first = fake.engines[-1]
    assert first["limit_mm_per_prompt"] == {"image": 2} and first["max_model_len"] == 1024
    assert first["mm_processor_kwargs"] == {"do_pan_and_scan": False} and first["enable_prefix_caching"] is True
    assert first["dtype"] == "bfloat16" and first["gpu_memory_utilization"] == 0.5
    backend.generate([_volume_request(1, "Q?")])  # fits: no rebuild
    assert len(fake.engines) == 1
    backend.generate([_volume_request(5, "Q?")])  # more images than the engine takes: rebuilt, larger
    assert len(fake.engines) == 2 and fake.engines[-1]["limit_mm_per_prompt"] == {"image": 5}
    assert backend.limits == (5, 1024)


def test_fixed_limits_sampling_and_cut_answers(fake):
    backend = VLLMBackend("test-tiny", max_images=2, max_model_len=2048)
    fake.answer = [11, 12, 13]
    (out,) = backend.generate([_volume_request(1, "Q?", max_new_tokens=3, temperature=0.7, seed=5)])
    assert out.finish_reason == "length"  # the cap was reached without an end token
    assert fake.calls[-1][1][0]["temperature"] == 0.7 and fake.calls[-1][1][0]["seed"] == 5
    assert fake.engines[-1]["max_model_len"] == 2048 and fake.engines[-1]["limit_mm_per_prompt"] == {"image": 2}
    with pytest.raises(MedlensError, match="3 images, more than max_images=2"):
        backend.generate([_volume_request(3, "Q?")])
    with pytest.raises(GenerationFailed, match=r"request index 1 of 2 failed .*needs \d+ tokens \+ 5000 new") as info:
        backend.generate([_volume_request(1, "Q?"), _volume_request(1, "Q?", max_new_tokens=5000)])
    assert info.value.index == 1 and info.value.outputs == {}  # refused before anything ran


def test_versions_outside_the_supported_range_warn(fake):
    assert version_warning("0.20.1") is None and version_warning("0.11.1+cu130") is None
    assert "outside the range" in version_warning("0.11.0") and "outside the range" in version_warning("0.9.2")
    high = ".".join(map(str, TESTED_VERSIONS[1]))
    assert "outside the range" in version_warning(high)
    fake.version = "0.9.2"
    sys.modules["vllm"] = fake.module()
    backend = VLLMBackend("test-tiny")
    assert "vLLM 0.9.2 is outside" in backend.model_warning and "untrained test model" in backend.model_warning


def test_device_must_be_a_gpu_and_text_models_refuse_images(fake):
    with pytest.raises(MedlensError, match="CUDA_VISIBLE_DEVICES"):
        VLLMBackend("test-tiny", device="cuda:1")
    text_only = VLLMBackend("gemma-3-270m")
    assert text_only.processor is None and text_only.source.gguf_file is not None
    with pytest.raises(MedlensError, match="text-only model and cannot read images"):
        text_only.generate([_volume_request(1, "Q?")])
    text_only.generate([GenerationRequest([{"role": "user", "content": "What is an effusion?"}], max_new_tokens=2)])
    engine = fake.engines[-1]
    assert engine["model"].endswith(".gguf") and "limit_mm_per_prompt" not in engine
