"""The pure parts of the Ray Data LLM path (no GPU or vLLM here): which runs it takes, the engine and processor
settings, the engine rows a unit becomes (rendered as the vllm backend renders them), what comes back, and
the driver gathering a unit's outputs before ``finish``."""

from __future__ import annotations

import json
import pickle

import pytest
from pipeline_stages import ToyStages, toy_units

from medlens.backends import GenerationOutput
from medlens.backends.rendering import render_prompt
from medlens.errors import MedlensError
from medlens.models import GENERATE, resolve_model
from medlens.pipeline import BackendSpec, RaySettings
from medlens.pipeline.failures import prepare_one
from medlens.pipeline.ray_replicas import ReplicaStage
from medlens.pipeline.ray_rows import pack, unit_rows
from medlens.pipeline.ray_runner import generation_stage
from medlens.pipeline.ray_vllm import (
    BYPASS,
    SKIP,
    VLLMStage,
    engine_kwargs,
    postprocess,
    preprocess,
    processor_config,
    renderer,
    request_rows,
)

pytest.importorskip("transformers")

GPU = RaySettings(gpus_per_replica=1, replicas=2)


def test_the_vllm_processor_runs_vllm_on_whole_gpus_without_an_adapter() -> None:
    assert generation_stage(BackendSpec("test-tiny", "vllm"), GPU) is VLLMStage
    assert generation_stage(BackendSpec("vllm:test-tiny"), RaySettings(gpus_per_replica=2)) is VLLMStage
    assert generation_stage(BackendSpec("test-tiny", "vllm"), RaySettings()) is ReplicaStage  # no GPU
    assert generation_stage(BackendSpec("test-tiny", "vllm"), RaySettings(gpus_per_replica=0.5)) is ReplicaStage
    assert generation_stage(BackendSpec("test-tiny", "vllm", {"adapter": "lora"}), GPU) is ReplicaStage
    assert generation_stage(BackendSpec("test-tiny"), GPU) is ReplicaStage  # transformers replicas on GPUs


def test_engine_and_processor_settings() -> None:
    assert engine_kwargs(BackendSpec("test-tiny", "vllm", {"dtype": "bfloat16"}), GPU) == {
        "max_model_len": 32768,
        "tensor_parallel_size": 1,
        "enable_prefix_caching": True,
        "seed": 0,
        "dtype": "bfloat16",
        "limit_mm_per_prompt": {"image": 126},
        "mm_processor_kwargs": {"do_pan_and_scan": False},
    }
    ct = engine_kwargs(BackendSpec("test-tiny", "vllm", {"max_images": 85, "max_model_len": 24576}), GPU)
    assert ct["limit_mm_per_prompt"] == {"image": 85} and ct["max_model_len"] == 24576
    with pytest.raises(MedlensError, match="tensor_parallel_size=2 needs --gpus-per-replica 2"):
        engine_kwargs(BackendSpec("test-tiny", "vllm", {"tensor_parallel_size": 2}), GPU)
    config = processor_config(BackendSpec("test-tiny", "vllm"), GPU, batch_size=16)
    assert {k: v for k, v in config.items() if k not in ("model_source", "engine_kwargs")} == {
        "batch_size": 16,
        "concurrency": 2,
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
        "prepare_multimodal_stage": False,
        "should_continue_on_error": True,
    }
    assert config["model_source"] == str(resolve_model("test-tiny", GENERATE).path)


def test_rays_own_config_takes_the_settings() -> None:
    """Where ray[llm] is installed (GPU nodes), its pydantic config accepts every key."""
    try:
        from ray.data.llm import vLLMEngineProcessorConfig
    except ImportError as exc:
        pytest.skip(f"ray.data.llm is not importable here ({exc.name} missing; pip install 'ray[llm]')")
    config = vLLMEngineProcessorConfig(**processor_config(BackendSpec("test-tiny", "vllm"), GPU, batch_size=4))
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 126} and config.concurrency == 2


def _prepared_row(unit_index: int, **faults: dict) -> dict:
    units = toy_units(**faults)
    row = unit_rows(units)[unit_index]
    row["payload"] = pack(*prepare_one(ToyStages(), units[unit_index]))
    return row


LIMITS = {"max_images": 126, "max_model_len": 32768}


def test_a_unit_becomes_one_engine_row_per_request_rendered_as_the_vllm_backend_does() -> None:
    row = _prepared_row(4)  # "two": two questions about one image
    rows = request_rows(row, stages=ToyStages(), model="test-tiny", limits=LIMITS)
    assert [(r["part"], r["parts"]) for r in rows] == [(0, 2), (1, 2)]
    assert rows[0]["payload"] == row["payload"] and rows[1]["payload"] == b""  # the payload rides once
    processor, tokenizer, stop_ids, _ = renderer("test-tiny")
    unit = toy_units()[4]
    requests = ToyStages().requests(unit, prepare_one(ToyStages(), unit)[0])
    for one, request in zip(rows, requests, strict=True):
        full = render_prompt(processor, tokenizer, request.messages)
        assert full.startswith("<bos>") and one["prompt"] == full[len("<bos>") :]  # vLLM adds the one <bos>
        assert one["prompt"].count("<start_of_image>") == 1 and len(one["images"]) == 1
        assert json.loads(one["sampling"]) == {
            "max_tokens": 6,
            "stop_token_ids": stop_ids,
            "skip_special_tokens": False,
            "temperature": 0.0,
        }
    engine_in = preprocess(rows[0])
    assert engine_in["prompt"] == rows[0]["prompt"] and engine_in["sampling_params"]["max_tokens"] == 6
    assert engine_in["multimodal_data"]["image"][0].size == (32, 32)


def test_failed_units_skip_the_engine() -> None:
    failed = request_rows(
        _prepared_row(-1, corrupt={"fault": "corrupt"}), stages=ToyStages(), model="test-tiny", limits=LIMITS
    )
    assert len(failed) == 1 and failed[0][SKIP] == BYPASS and preprocess(failed[0]) == {}
    assert json.loads(failed[0]["error"])["error"] == "CorruptFileError"
    too_long = request_rows(
        _prepared_row(1), stages=ToyStages(), model="test-tiny", limits={**LIMITS, "max_model_len": 20}
    )
    error = json.loads(too_long[0]["error"])
    assert error["error"] == "GenerationFailed" and error["stage"] == "answer"
    assert error["reason"].endswith("more than the 20-token context of test-tiny")


def test_the_driver_gathers_a_units_outputs_then_finishes_it() -> None:
    row = _prepared_row(4)
    rows = request_rows(row, stages=ToyStages(), model="test-tiny", limits=LIMITS)
    stop = rows[0]["stop_ids"][0]
    answered = [
        postprocess({**r, "generated_text": text, "generated_tokens": tokens, "num_input_tokens": 300})
        for r, text, tokens in zip(
            rows, ["yes<end_of_turn>", "left side"], [[5, stop], [7, 8, 9, 10, 11, 12]], strict=True
        )
    ]
    assert pickle.loads(answered[0]["output"]) == GenerationOutput("yes", 300, 2, "stop")
    assert pickle.loads(answered[1]["output"]) == GenerationOutput("left side", 300, 6, "length")
    stage = VLLMStage(ToyStages(), BackendSpec("test-tiny", "vllm"), GPU, 8, "ledger")
    assert stage.collect(answered[1]) == []  # the second request first: the unit waits for the first
    assert stage.collect(answered[0]) == [
        (4, {"answers": ["yes", "left side"], "tokens": [2, 6], "finish": ["stop", "length"], "backend": False}, None)
    ]
    refused = {**rows[0], SKIP: "prompt longer than max_model_len"}
    (index, result, error), *_ = stage.collect(refused)
    assert (index, result) == (4, None) and error is not None
    assert error["error"] == "GenerationFailed" and error["reason"] == "prompt longer than max_model_len"
