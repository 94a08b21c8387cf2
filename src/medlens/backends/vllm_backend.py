"""vLLM's offline engine (``--engine vllm`` or ``vllm:MODEL``), for GPUs: whole batches go to the engine,
which schedules them; prefix caching reuses the image prefix that every question about one study shares.

The prompt is rendered exactly as the transformers engine renders it (the model's own chat template), with
``<start_of_image>`` where each image goes; vLLM's Gemma 3 processor expands it. The engine is built at the
first ``generate``: ``limit_mm_per_prompt`` from the most images a request has (85 for a CT volume, 126 for
a slide) and ``max_model_len`` from the longest prompt plus its token cap, unless given; a later request
that needs more rebuilds it. Pan-and-scan is off (MedGemma was not trained with it). Known pitfalls are in
docs/engines.md: Gemma 3's bidirectional image attention is approximated by some vLLM V1 versions, and
some versions regressed on Gemma 3, so a version outside :data:`TESTED_VERSIONS` gets a warning.

A PEFT LoRA adapter (``adapter=DIR``) goes through vLLM's LoRA support: the engine is built with
``enable_lora`` and a ``max_lora_rank`` from the adapter's rank, and every request carries one ``LoRARequest``.

vllm is imported when a backend is made (``pip install 'medlens[vllm]'``, on a CUDA machine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from medlens.backends.base import (
    Backend,
    GenerationFailed,
    GenerationOutput,
    GenerationRequest,
    Messages,
    ProgressCallback,
)
from medlens.backends.rendering import END_TOKENS, clean_completion, image_parts, render_prompt, to_pil
from medlens.errors import BackendUnavailableError, MedlensError
from medlens.models import GENERATE, ModelSource, model_fingerprint, resolve_model
from medlens.models.adapter import AdapterError, AdapterInfo, read_adapter
from medlens.models.device import check_device_name, check_dtype_name
from medlens.models.hf import progress_bars

#: vLLM versions medlens supports for Gemma 3 (0.9.2 and 0.11.0 had Gemma 3 regressions: vLLM issues
#: 20806 and 28539); others work but get a warning in every result
TESTED_VERSIONS = ((0, 11, 1), (0, 34, 0))
#: rounding of a derived ``max_model_len`` (so that slightly longer prompts later fit without a rebuild)
_LENGTH_STEP = 1024
#: the values vLLM's ``max_lora_rank`` takes (vllm.config.lora.MaxLoRARanks); an adapter's rank is rounded up
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_limit(rank: int | None) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank`` (16 when unknown)."""
    if rank is None:
        return 16
    for limit in LORA_RANKS:
        if rank <= limit:
            return limit
    raise MedlensError(f"a LoRA rank of {rank} is more than vLLM's largest max_lora_rank ({LORA_RANKS[-1]})")


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the vllm engine needs vLLM ({exc.name} is missing): pip install 'medlens[vllm]' on a CUDA machine"
        ) from None
    return vllm


def version_warning(version: str) -> str | None:
    """A warning when ``version`` is outside :data:`TESTED_VERSIONS` (None inside it)."""
    numbers = []
    for part in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in part if ch.isdigit())
        numbers.append(int(digits or 0))
    low, high = TESTED_VERSIONS
    if low <= tuple(numbers) < high:
        return None
    span = f"{'.'.join(map(str, low))} to below {'.'.join(map(str, high))}"
    return f"vLLM {version} is outside the range medlens supports for Gemma 3 ({span}); check outputs"


class VLLMBackend(Backend):
    """A model on vLLM's offline ``LLM`` engine.

    Keywords (the engine's ``--model-arg`` keys): ``device`` (auto or cuda: vLLM runs on the GPUs it is
    shown; choose them with ``CUDA_VISIBLE_DEVICES``), ``dtype`` (auto, bfloat16, float16, float32),
    ``max_model_len`` and ``max_images`` (fixed engine limits instead of derived ones),
    ``gpu_memory_utilization`` (0.9), ``tensor_parallel_size`` (1), ``enable_prefix_caching`` (True),
    ``enforce_eager`` (False: CUDA graphs on), ``seed`` (0), ``adapter`` (a PEFT LoRA folder, served through
    vLLM's LoRA support; its hash is part of ``fingerprint``).
    """

    engine = "vllm"

    def __init__(
        self,
        model: str,
        device: str = "auto",
        dtype: str = "auto",
        max_model_len: int | None = None,
        max_images: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        tensor_parallel_size: int = 1,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        seed: int = 0,
        adapter: str | None = None,
    ) -> None:
        if check_device_name(device) not in ("auto", "cuda"):
            raise MedlensError(
                f"the vllm engine runs on the GPUs it is shown: use --device auto or cuda and choose GPUs with "
                f"CUDA_VISIBLE_DEVICES (not --device {device})"
            )
        adapter_info = read_adapter(adapter) if adapter is not None else None
        self._vllm = _import_vllm()
        self.model_name = model
        self.source = resolve_model(model, GENERATE)
        self.model_path = str(self.source.path)
        self.base_fingerprint = model_fingerprint(self.source.path)
        self.fingerprint = self.base_fingerprint
        if adapter_info is not None:
            adapter_info.check_base(model, self.base_fingerprint)
            self.adapter = adapter_info
            self.fingerprint = adapter_info.fingerprint(self.base_fingerprint)
        self.is_test_model = self.source.is_test_model
        self.default_max_new_tokens = self.source.default_max_new_tokens
        version = str(getattr(self._vllm, "__version__", "0"))
        self.vllm_version = version
        warnings = [w for w in (self.source.warning, version_warning(version)) if w]
        self.model_warning = "; ".join(warnings) or None
        self._fixed = {"max_model_len": max_model_len, "max_images": max_images}
        self._engine_options: dict[str, Any] = {
            "dtype": check_dtype_name(dtype),
            "gpu_memory_utilization": gpu_memory_utilization,
            "tensor_parallel_size": tensor_parallel_size,
            "enable_prefix_caching": enable_prefix_caching,
            "enforce_eager": enforce_eager,
            "seed": seed,
        }
        if kv_cache_memory_bytes is not None:  # a fixed KV cache instead of a memory fraction (vLLM's CPU build)
            self._engine_options["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        self.processor, self.tokenizer = _load_renderer(self.source)
        self._stop_ids = [i for i in (self.tokenizer.convert_tokens_to_ids(t) for t in END_TOKENS) if i is not None]
        self._llm: Any = None
        #: (images per prompt, context length) of the engine now built
        self.limits = (0, 0)

    # ------------------------------------------------------------------ prompts

    def render(self, messages: Messages) -> str:
        """The prompt text, as the transformers engine renders it (the model's chat template)."""
        return render_prompt(self.processor, self.tokenizer, messages)

    def _without_bos(self, text: str) -> str:
        """The rendered prompt without its leading ``<bos>``: vLLM's tokenizer adds one (two change the answer)."""
        bos = self.tokenizer.bos_token
        return text[len(bos) :] if bos and text.startswith(bos) else text

    def prompt_tokens(self, text: str, n_images: int) -> int:
        """Tokens of ``text`` once each image placeholder is expanded (no image is processed to count)."""
        if n_images and self.processor is not None:
            text = text.replace(self.processor.boi_token, self.processor.full_image_sequence)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ engine

    def _ensure_engine(self, images: int, length: int) -> None:
        """Build (or rebuild, larger) the engine so a prompt of ``images`` images and ``length`` tokens fits."""
        want_images = self._fixed["max_images"] or max(images, self.limits[0], 1)
        want_length = self._fixed["max_model_len"] or max(-(-length // _LENGTH_STEP) * _LENGTH_STEP, self.limits[1])
        if self._fixed["max_images"] and images > want_images:
            raise MedlensError(f"a request has {images} images, more than max_images={want_images}")
        if self._fixed["max_model_len"] and length > want_length:
            raise MedlensError(f"a request needs {length} tokens, more than max_model_len={want_length}")
        if self._llm is not None and (want_images, want_length) == self.limits:
            return
        self.close()
        options = dict(self._engine_options)
        if self.source.gguf_file is not None:
            model, tokenizer = str(self.source.gguf_file), str(self.source.tokenizer_dir or self.source.path)
        else:
            model, tokenizer = self.model_path, self.model_path
        if self.adapter is not None:
            options.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_limit(self.adapter.rank))
        if self.processor is not None:
            options["limit_mm_per_prompt"] = {"image": want_images}
            options["mm_processor_kwargs"] = {"do_pan_and_scan": False}
        self._llm = self._vllm.LLM(model=model, tokenizer=tokenizer, max_model_len=want_length, **options)
        self.limits = (want_images, want_length)

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationOutput]:
        """Submit every request at once (the engine batches and shares prefixes); outputs in input order."""
        if not requests:
            return []
        start = time.perf_counter()
        prompts, lengths, caps = [], [], []
        for number, request in enumerate(requests):
            images = [to_pil(image) for image in image_parts(request.messages)]
            if images and self.processor is None:
                raise MedlensError(f"{self.model_name} is a text-only model and cannot read images (request {number})")
            text = self.render(request.messages)
            prompt: dict[str, Any] = {"prompt": self._without_bos(text)}
            if images:
                prompt["multi_modal_data"] = {"image": images}
            prompts.append(prompt)
            lengths.append(self.prompt_tokens(text, len(images)))
            caps.append(request.max_new_tokens or self.default_max_new_tokens)
        self._check_context(lengths, caps)
        most_images = max(len(p.get("multi_modal_data", {}).get("image", [])) for p in prompts)
        self._ensure_engine(most_images, max(n + cap for n, cap in zip(lengths, caps, strict=True)))
        params = [self._sampling(request, cap) for request, cap in zip(requests, caps, strict=True)]
        prepared = time.perf_counter()
        if self.adapter is None:
            results = self._llm.generate(prompts, params, use_tqdm=False)
        else:
            results = self._generate_with_adapter(prompts, params, self.adapter)
        seconds = (time.perf_counter() - prepared) / len(requests)
        outputs = []
        for result, cap in zip(results, caps, strict=True):
            completion = result.outputs[0]
            ids = list(completion.token_ids)
            ended = bool(ids) and ids[-1] in self._stop_ids
            outputs.append(
                GenerationOutput(
                    text=clean_completion(completion.text),
                    prompt_tokens=len(result.prompt_token_ids or []),
                    completion_tokens=len(ids),
                    finish_reason="length" if not ended and len(ids) >= cap else "stop",
                    timings={"preprocess": (prepared - start) / len(requests), "generate": seconds},
                )
            )
            if progress is not None:
                progress(1)
        return outputs

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self.generate([request])[0]

    def _generate_with_adapter(self, prompts: list[dict[str, Any]], params: list[Any], adapter: AdapterInfo) -> Any:
        """``LLM.generate`` with the adapter's ``LoRARequest``; vLLM loads it at the first request and refuses
        one whose modules or shapes the model lacks (a ValueError), which becomes an :class:`AdapterError`."""
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.name, 1, str(adapter.path))
        try:
            return self._llm.generate(prompts, params, use_tqdm=False, lora_request=request)
        except ValueError as exc:
            raise AdapterError(
                f"vLLM cannot load the adapter: {' '.join(str(exc).split())[:300]}", str(adapter.path)
            ) from None

    def _sampling(self, request: GenerationRequest, cap: int) -> Any:
        options: dict[str, Any] = {"max_tokens": cap, "stop_token_ids": self._stop_ids, "skip_special_tokens": False}
        if request.temperature > 0:
            options.update(temperature=request.temperature, seed=request.seed)
        else:
            options.update(temperature=0.0)
        return self._vllm.SamplingParams(**options)

    def _check_context(self, lengths: list[int], caps: list[int]) -> None:
        """A request longer than the model's context is an error naming it, before anything runs."""
        limit = self._fixed["max_model_len"] or _context_of(self.source)
        for number, (length, cap) in enumerate(zip(lengths, caps, strict=True)):
            if limit and length + cap > limit:
                error = MedlensError(
                    f"the prompt needs {length} tokens + {cap} new tokens, more than the {limit}-token context "
                    f"of {self.model_name}"
                )
                raise GenerationFailed.wrap(error, number, {}, len(lengths))

    def close(self) -> None:
        """Drop the engine (and its GPU memory)."""
        if self._llm is not None:
            self._llm = None
            import gc

            gc.collect()


def _load_renderer(source: ModelSource) -> tuple[Any, Any]:
    """The processor (multimodal models) and the tokenizer used to render and count prompts."""
    from medlens.models.hf import import_torch_transformers, loader_errors
    from medlens.models.resolve import DOWNLOAD_HINTS

    _, transformers = import_torch_transformers("the vllm engine")
    with progress_bars(False), loader_errors(source.name, DOWNLOAD_HINTS[GENERATE]):
        if source.gguf_file is not None:
            from medlens.models.gguf import load_gguf_tokenizer

            return None, load_gguf_tokenizer(source.gguf_file, source.tokenizer_dir)
        config = transformers.AutoConfig.from_pretrained(source.path, local_files_only=True)
        if source.text_only or getattr(config, "vision_config", None) is None:
            return None, transformers.AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        processor = transformers.AutoProcessor.from_pretrained(source.path, local_files_only=True)
        return processor, processor.tokenizer


def _context_of(source: ModelSource) -> int | None:
    """The model's context length from its config (None when it does not say)."""
    import json

    try:
        config = json.loads((source.path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    text = config.get("text_config", config)
    value = text.get("max_position_embeddings") if isinstance(text, dict) else None
    return int(value) if value else None
