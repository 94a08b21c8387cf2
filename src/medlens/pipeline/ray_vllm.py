"""Generation on Ray Data LLM's vLLM processor (``vLLMEngineProcessorConfig`` + ``build_processor``), for
the vllm engine on whole GPUs without an adapter (other runs use the actor pool of
:mod:`~medlens.pipeline.ray_replicas`, which also runs vLLM, adapters included).

Each prepared unit becomes one row per request (:func:`request_rows`, on a CPU worker): the prompt rendered
exactly as the vllm backend renders it (the model's chat template, ``<bos>`` left to vLLM's tokenizer), the
images as RGB arrays, the sampling settings of the backend. Ray's own chat-template and tokenize stages are
off: they would give Gemma a second ``<bos>`` (the template writes one and the tokenizer adds one), which
changes greedy answers. Rows that must not reach the engine (a unit that failed earlier) carry Ray's
``__inference_error__`` marker, which every processor stage passes through untouched; a request the engine
refuses comes back the same way (``should_continue_on_error``). The driver gathers each unit's outputs and
calls ``stages.finish(..., backend=None)``.

Untested here (no GPU or vLLM on the development machines): the processor itself. The pure parts (engine
settings, rows in and out, gathering) are tested with test-tiny's processor."""

from __future__ import annotations

import functools
import json
import pickle
from typing import Any

from medlens.backends import GenerationOutput, GenerationRequest, parse_model_spec
from medlens.backends.base import GenerationFailed
from medlens.backends.rendering import END_TOKENS, clean_completion, image_parts, render_prompt, to_pil
from medlens.errors import MedlensError
from medlens.models import GENERATE, ModelSource, resolve_model
from medlens.pipeline.failures import describe
from medlens.pipeline.ray_replicas import RowOutcome
from medlens.pipeline.ray_rows import ANSWER, unpack
from medlens.pipeline.spec import BackendSpec, RaySettings, Stages

#: images per prompt the engine is sized for unless ``max_images`` is given (126 slide patches; a CT has 85)
DEFAULT_MAX_IMAGES = 126
#: context unless ``max_model_len`` is given (Google's Model Garden deployment; an 85-slice CT is ~21,760
#: image tokens)
DEFAULT_MAX_MODEL_LEN = 32768
#: vllm backend options that are vLLM engine arguments as they are
ENGINE_OPTIONS = (
    "dtype",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "tensor_parallel_size",
    "enable_prefix_caching",
    "enforce_eager",
    "seed",
)
#: the marker Ray Data LLM's stages pass through untouched (a non-empty value skips the engine)
SKIP = "__inference_error__"
BYPASS = "medlens: not for the engine"


def install_hint() -> str:
    return "pip install 'ray[llm]' (it brings vLLM) on the GPU nodes"


class VLLMStage:
    """The generation stage on Ray Data LLM's vLLM processor."""

    name = "vllm"

    def __init__(self, stages: Stages, spec: BackendSpec, settings: RaySettings, batch_size: int, ledger: str) -> None:
        self.stages, self.spec, self.settings, self.batch_size = stages, spec, settings, batch_size
        self.model = _model_name(spec)
        self.pending: dict[int, dict[str, Any]] = {}

    @staticmethod
    def fits(spec: BackendSpec, settings: RaySettings) -> bool:
        """Engine vllm, whole GPUs per replica (its tensor-parallel size), no adapter."""
        engine, _, options = parse_model_spec(spec.model, spec.engine, spec.options)
        gpus = settings.gpus_per_replica
        return engine == "vllm" and gpus >= 1 and float(gpus).is_integer() and options.get("adapter") is None

    def build(self, dataset: Any) -> Any:
        try:
            from ray.data.llm import build_processor, vLLMEngineProcessorConfig
        except ImportError as exc:
            raise MedlensError(
                f"Ray's vLLM processor needs ray.data.llm ({exc.name} is missing): {install_hint()}"
            ) from None
        config = vLLMEngineProcessorConfig(**processor_config(self.spec, self.settings, self.batch_size))
        rows = dataset.flat_map(
            request_rows,
            fn_kwargs={"stages": self.stages, "model": self.model, "limits": limits(self.spec)},
            num_cpus=self.settings.cpus_per_prepare,
        )
        return build_processor(config, preprocess=preprocess, postprocess=postprocess)(rows)

    def collect(self, row: dict[str, Any]) -> list[RowOutcome]:
        """Gather a unit's outputs; once all are in, finish it here (no backend on this path)."""
        index = int(row["index"])
        if row.get("error"):
            self.pending.pop(index, None)
            return [(index, None, json.loads(row["error"]))]
        marker = row.get(SKIP) or ""
        if marker and marker != BYPASS:
            self.pending.pop(index, None)
            failed = GenerationFailed.wrap(MedlensError(" ".join(str(marker).split())[:300]), 0, {}, 1)
            return [(index, None, describe(failed, ANSWER))]
        state = self.pending.setdefault(index, {"outputs": {}, "payload": None})
        if row.get("payload"):
            state["payload"] = row["payload"]
        if row.get("output"):
            state["outputs"][int(row["part"])] = pickle.loads(row["output"])
        if len(state["outputs"]) < int(row["parts"]) or state["payload"] is None:
            return []
        del self.pending[index]
        unit = pickle.loads(row["unit"])
        prepared, _ = unpack(state["payload"])
        outputs = [state["outputs"][part] for part in range(int(row["parts"]))]
        try:
            return [(index, self.stages.finish(unit, prepared, outputs, None), None)]
        except Exception as exc:  # a parser bug, a two-stage task that needs the backend
            return [(index, None, describe(exc, ANSWER))]

    def finish_all(self) -> list[RowOutcome]:
        """Units still missing an output are reported lost by the runner."""
        return []


def _model_name(spec: BackendSpec) -> str:
    return parse_model_spec(spec.model, spec.engine, spec.options)[1]


def limits(spec: BackendSpec) -> dict[str, int]:
    """The engine's fixed limits: images per prompt and context length."""
    options = parse_model_spec(spec.model, spec.engine, spec.options)[2]
    return {
        "max_images": int(options.get("max_images") or DEFAULT_MAX_IMAGES),
        "max_model_len": int(options.get("max_model_len") or DEFAULT_MAX_MODEL_LEN),
    }


def engine_kwargs(spec: BackendSpec, settings: RaySettings) -> dict[str, Any]:
    """vLLM engine arguments, as the vllm backend builds its engine, with fixed limits."""
    _, model, options = parse_model_spec(spec.model, spec.engine, spec.options)
    source = resolve_model(model, GENERATE)
    fixed = limits(spec)
    kwargs: dict[str, Any] = {
        "max_model_len": fixed["max_model_len"],
        "tensor_parallel_size": int(settings.gpus_per_replica),
        "enable_prefix_caching": True,
        "seed": 0,
    }
    kwargs.update({key: options[key] for key in ENGINE_OPTIONS if key in options})
    if kwargs["tensor_parallel_size"] != int(settings.gpus_per_replica):
        raise MedlensError(
            f"tensor_parallel_size={kwargs['tensor_parallel_size']} needs --gpus-per-replica "
            f"{kwargs['tensor_parallel_size']} (not {settings.gpus_per_replica})"
        )
    if source.gguf_file is not None:
        kwargs["tokenizer"] = str(source.tokenizer_dir or source.path)
    if _reads_images(source):
        kwargs["limit_mm_per_prompt"] = {"image": fixed["max_images"]}
        kwargs["mm_processor_kwargs"] = {"do_pan_and_scan": False}  # MedGemma was not trained with it
    return kwargs


def processor_config(spec: BackendSpec, settings: RaySettings, batch_size: int) -> dict[str, Any]:
    """Keyword arguments of ``vLLMEngineProcessorConfig``: medlens renders and vLLM tokenizes."""
    source = resolve_model(_model_name(spec), GENERATE)
    return {
        "model_source": str(source.gguf_file or source.path),
        "engine_kwargs": engine_kwargs(spec, settings),
        "batch_size": max(1, batch_size),
        "concurrency": max(1, settings.replicas),
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": False,
        "prepare_multimodal_stage": False,
        "should_continue_on_error": True,
    }


def _reads_images(source: ModelSource) -> bool:
    if source.text_only or source.gguf_file is not None:
        return False
    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("vision_config") is not None


@functools.cache
def renderer(model: str) -> tuple[Any, Any, list[int], int]:
    """The processor (None for text-only models), tokenizer, end-token ids and default token cap, once
    per worker process."""
    from medlens.backends.vllm_backend import _load_renderer

    source = resolve_model(model, GENERATE)
    processor, tokenizer = _load_renderer(source)
    stop_ids = [i for i in (tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS) if i is not None]
    return processor, tokenizer, stop_ids, source.default_max_new_tokens


def sampling_params(request: GenerationRequest, cap: int, stop_ids: list[int]) -> dict[str, Any]:
    """vLLM ``SamplingParams`` keywords, as the vllm backend sets them."""
    params: dict[str, Any] = {"max_tokens": cap, "stop_token_ids": stop_ids, "skip_special_tokens": False}
    if request.temperature > 0:
        params.update(temperature=request.temperature, seed=request.seed)
    else:
        params["temperature"] = 0.0
    return params


def render_request(model: str, request: GenerationRequest, fixed: dict[str, int]) -> dict[str, Any]:
    """One request as the engine row takes it: prompt text without ``<bos>``, images, sampling settings;
    a request over the fixed limits raises (it fails only its unit)."""
    processor, tokenizer, stop_ids, default_cap = renderer(model)
    images = image_parts(request.messages)
    if images and processor is None:
        raise MedlensError(f"{model} is a text-only model and cannot read images")
    if len(images) > fixed["max_images"]:
        raise MedlensError(f"a request has {len(images)} images, more than max_images={fixed['max_images']}")
    text = render_prompt(processor, tokenizer, request.messages)
    counted = text.replace(processor.boi_token, processor.full_image_sequence) if images else text
    length = len(tokenizer(counted, add_special_tokens=False)["input_ids"])
    cap = request.max_new_tokens or default_cap
    if length + cap > fixed["max_model_len"]:  # as the vllm backend refuses it
        error = MedlensError(
            f"the prompt needs {length} tokens + {cap} new tokens, more than the {fixed['max_model_len']}-token "
            f"context of {model}"
        )
        raise GenerationFailed.wrap(error, 0, {}, 1)
    bos = tokenizer.bos_token
    return {
        "prompt": text[len(bos) :] if bos and text.startswith(bos) else text,
        "images": [to_pil(image) for image in images],
        "sampling": json.dumps(sampling_params(request, cap, stop_ids)),
        "cap": cap,
        "stop_ids": stop_ids,
    }


def request_rows(row: dict[str, Any], *, stages: Stages, model: str, limits: dict[str, int]) -> list[dict[str, Any]]:
    """A prepared unit as engine rows, one per request (a ``flat_map``). Its payload rides on the first row
    only, for the driver's ``finish``; a unit that failed (to prepare, or to make its requests) is one row
    that skips the engine."""
    index, unit_bytes = int(row["index"]), row["unit"]
    base = {"index": index, "unit": unit_bytes, "part": 0, "parts": 1, "payload": b"", "error": ""}
    prepared, error = unpack(row["payload"])
    if error is None:
        try:
            requests = stages.requests(pickle.loads(unit_bytes), prepared)
            rendered = [render_request(model, request, limits) for request in requests]
        except Exception as exc:  # a request over the context, a bad image part
            error = describe(exc, ANSWER)
    if error is not None:
        return [{**base, "error": json.dumps(error), SKIP: BYPASS}]
    if not rendered:  # nothing to ask: finished on the driver with no outputs
        return [{**base, "parts": 0, "payload": row["payload"], SKIP: BYPASS}]
    return [
        {**base, **one, "part": part, "parts": len(rendered), "payload": row["payload"] if part == 0 else b""}
        for part, one in enumerate(rendered)
    ]


def preprocess(row: dict[str, Any]) -> dict[str, Any]:
    """An engine row as Ray's vLLM stage reads it (rows that skip the engine are left as they are)."""
    if row.get(SKIP):
        return {}
    inputs: dict[str, Any] = {"prompt": row["prompt"], "sampling_params": json.loads(row["sampling"])}
    if len(row["images"]):
        inputs["multimodal_data"] = {"image": list(row["images"])}
    return inputs


def postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """The engine's answer as a medlens output (cleaned text, token counts, why it stopped)."""
    tokens = [int(t) for t in row.get("generated_tokens") or []]
    stop_ids = {int(t) for t in row.get("stop_ids") or []}
    ended = bool(tokens) and tokens[-1] in stop_ids
    output = GenerationOutput(
        text=clean_completion(str(row.get("generated_text") or "")),
        prompt_tokens=int(row.get("num_input_tokens") or 0),
        completion_tokens=len(tokens),
        finish_reason="length" if not ended and len(tokens) >= int(row["cap"]) else "stop",
    )
    keep = ("index", "unit", "part", "parts", "payload", "error")
    return {**{key: row[key] for key in keep}, "output": pickle.dumps(output, protocol=5)}
