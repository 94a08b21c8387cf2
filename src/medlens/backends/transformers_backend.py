"""The Hugging Face transformers engine, offline.

Multimodal models (MedGemma 4B, ``test-tiny``) load with ``AutoProcessor`` + ``AutoModelForImageTextToText``;
text-only ones (MedGemma 27B text, GGUF files, the built-in ``gemma-3-270m``) with ``AutoTokenizer`` +
``AutoModelForCausalLM``. Requests of one ``generate`` call that share their prefix (several questions about
one volume) share one image encoding and one prefill: see :meth:`TransformersBackend.generate`.

torch and transformers are imported inside functions so that a missing install gives a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, Messages, ProgressCallback
from medlens.backends.prefix_cache import common_prefix_length, group_by_prefix, images_processed_once
from medlens.errors import MedlensError
from medlens.models import GENERATE, ModelSource, model_fingerprint, resolve_model, select_device, select_dtype
from medlens.models.hf import import_torch_transformers, loader_errors, progress_bars
from medlens.models.resolve import DOWNLOAD_HINTS

#: tokens removed from a completion; ``<unused94>``/``<unused95>`` (thinking markers) are kept
DROPPED_TOKENS = ("<eos>", "<end_of_turn>", "<pad>", "<bos>")
_DROPPED_RE = re.compile("|".join(re.escape(t) for t in DROPPED_TOKENS))
_END_TOKENS = ("<eos>", "<end_of_turn>")
#: a shared prefix shorter than this is not worth a separate prefill
MIN_SHARED_PREFIX_TOKENS = 16


def clean_completion(text: str) -> str:
    """Drop end/padding markers and trailing whitespace; keep everything else, thinking markers included."""
    return _DROPPED_RE.sub("", text).rstrip()


def _to_pil(image: Any) -> Any:
    """An RGB uint8 array (or a PIL image) as an RGB PIL image, pixel for pixel (no lossy encoding)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3))):
        raise MedlensError(
            f"image parts must be RGB uint8 arrays (H x W x 3); got {array.dtype} with shape {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    pil = Image.fromarray(np.ascontiguousarray(array))
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def gemma_chat_prompt(messages: Messages, bos: str = "<bos>") -> str:
    """The Gemma turn format, for tokenizers without a chat template. As Gemma 3's own template: a system
    message opens the first user turn, text parts are trimmed and joined, the prompt ends with the model turn."""
    turns, system = list(messages), ""
    if turns and turns[0].get("role") == "system":
        system = _message_text(turns.pop(0)) + "\n\n"
    prompt = [bos]
    for n, message in enumerate(turns):
        role = "model" if message.get("role") == "assistant" else str(message.get("role"))
        prompt.append(f"<start_of_turn>{role}\n{system if n == 0 else ''}{_message_text(message)}<end_of_turn>\n")
    prompt.append("<start_of_turn>model\n")
    return "".join(prompt)


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content.strip()
    return "".join(p["text"].strip() for p in content if isinstance(p, dict) and p.get("type") == "text")


def _images(messages: Messages) -> list[Any]:
    found = []
    for message in messages:
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                if part.get("image") is None:
                    raise MedlensError("an image part has no 'image' array")
                found.append(part["image"])
    return found


class TransformersBackend(Backend):
    """A model on transformers: MedGemma, a text-only model (GGUF files included) or a built-in.

    Generation always uses transformers' dynamic (sliding-window aware) cache, whatever the model's
    ``generation_config`` asks for, so that a shared prefix's cache can be copied into every request.
    """

    engine = "transformers"

    def __init__(
        self,
        model: str,
        device: str | None = "auto",
        dtype: str | None = "auto",
        progress: bool = False,
        share_prefix: bool = True,
        attn_implementation: str | None = None,
    ) -> None:
        torch, transformers = import_torch_transformers()
        self._torch = torch
        self.model_name = model
        self.device = select_device(torch, device)
        self.dtype = select_dtype(torch, dtype, self.device)
        #: encode and prefill a prefix shared by several requests of one ``generate`` call once
        self.share_prefix = share_prefix
        #: what ``from_pretrained`` gets besides the files (``attn_implementation``: sdpa, eager ...)
        self._load_options: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device, "local_files_only": True}
        if attn_implementation:
            self._load_options["attn_implementation"] = attn_implementation
        with progress_bars(progress):
            source = resolve_model(model, GENERATE)
            self.model_path = str(source.path)
            #: no vision tower: requests with images are refused
            self.text_only = self._is_text_only(transformers, source)
            if self.text_only:
                self.processor: Any = None
                self.tokenizer, self.model = self._load_text(transformers, source)
            else:
                self.processor, self.model = self._load(transformers)
                self.tokenizer = self.processor.tokenizer
        self.fingerprint = model_fingerprint(source.path)
        self.is_test_model = source.is_test_model
        self.default_max_new_tokens = source.default_max_new_tokens
        self.model_warning = source.warning
        self._stop_ids = sorted(self._end_token_ids(self.tokenizer))
        pad_id = self.tokenizer.pad_token_id
        self._pad_id = pad_id if pad_id is not None else self._stop_ids[0]

    def _loading(self) -> contextlib.AbstractContextManager[None]:
        return loader_errors(self.model_name, DOWNLOAD_HINTS[GENERATE])

    def _is_text_only(self, transformers: Any, source: ModelSource) -> bool:
        if source.text_only is not None:
            return source.text_only
        with self._loading():
            config = transformers.AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        return getattr(config, "vision_config", None) is None

    def _load(self, transformers: Any) -> tuple[Any, Any]:
        with self._loading():
            processor = transformers.AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
            model = transformers.AutoModelForImageTextToText.from_pretrained(self.model_path, **self._load_options)
        return processor, model.eval()

    def _load_text(self, transformers: Any, source: ModelSource) -> tuple[Any, Any]:
        """``AutoTokenizer`` + ``AutoModelForCausalLM``; GGUF files through :mod:`medlens.models.gguf`."""
        with self._loading():
            if source.gguf_file is not None:
                from medlens.models.gguf import load_gguf_causal_lm, load_gguf_tokenizer

                tokenizer = load_gguf_tokenizer(source.gguf_file, source.tokenizer_dir)
                return tokenizer, load_gguf_causal_lm(source.gguf_file, self.dtype, self.device)
            tokenizer = transformers.AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_pretrained(self.model_path, **self._load_options)
        return tokenizer, model.eval()

    def _end_token_ids(self, tokenizer: Any) -> set[int]:
        ids = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
        return ids

    def render(self, messages: Messages) -> str:
        """The prompt text: the processor's chat template; for text-only models the tokenizer's, else
        :func:`gemma_chat_prompt`."""
        if self.processor is not None:
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return gemma_chat_prompt(messages, self.tokenizer.bos_token or "")

    def prepare(self, messages: Messages) -> Any:
        """Render the prompt and run the processor (or tokenizer): the model inputs for one request, on device."""
        self._refuse_images(messages)
        images = [_to_pil(image) for image in _images(messages)]
        return self._on_device(self._encode(self.render(messages), images))

    def _refuse_images(self, messages: Messages) -> None:
        if self.text_only and (n := len(_images(messages))):
            raise MedlensError(
                f"{self.model_name} is a text-only model and cannot read images ({n} in this request); "
                "use a multimodal model such as MedGemma 4B (or test-tiny to try the plumbing)"
            )

    def _encode(self, text: str, images: list[Any]) -> Any:
        bos = self.tokenizer.bos_token
        add_special_tokens = not (bos and text.startswith(bos))  # the template already wrote <bos>
        if self.processor is None:
            return self.tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)
        return self.processor(
            text=text, images=images or None, return_tensors="pt", add_special_tokens=add_special_tokens
        )

    def _on_device(self, inputs: Any) -> Any:
        if self.processor is None:
            return inputs.to(self.model.device)
        return inputs.to(self.model.device, dtype=self.dtype)

    def generate(
        self, requests: Sequence[GenerationRequest], progress: ProgressCallback | None = None
    ) -> list[GenerationOutput]:
        """Complete every request; outputs in input order.

        Requests that share everything but the trailing question text (same texts, same images by content)
        are grouped: their images are processed and encoded once and their common prefix is prefilled once;
        each question then continues from a copy of that KV cache. Greedy (and seeded) answers are those of
        one request at a time. Their ``timings`` say ``prefix_reused: 1.0`` and ``prefix_tokens``, and spread
        the shared ``preprocess`` and ``prefill`` seconds evenly over the group.
        """
        for request in requests:
            self._refuse_images(request.messages)
        batch = [request.messages for request in requests]
        groups = group_by_prefix(batch) if self.share_prefix else [[i] for i in range(len(requests))]
        outputs: dict[int, GenerationOutput] = {}
        for group in groups:
            members = [requests[i] for i in group]
            results = self._generate_shared(members) if len(members) > 1 else iter([self.generate_one(members[0])])
            for index, output in zip(group, results, strict=True):
                outputs[index] = output
                if progress is not None:
                    progress(1)
        return [outputs[i] for i in range(len(requests))]

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        start = time.perf_counter()
        inputs = self.prepare(request.messages)
        prepared = time.perf_counter()
        output = self._complete(request, inputs)
        output.timings = {"preprocess": prepared - start, "generate": time.perf_counter() - prepared}
        return output

    def _generate_shared(self, requests: list[GenerationRequest]) -> Iterator[GenerationOutput]:
        """One group of requests with a shared prefix (see :meth:`generate`), yielded one by one."""
        start = time.perf_counter()
        images = [_to_pil(image) for image in _images(requests[0].messages)]
        once = images_processed_once(self.processor) if self.processor is not None else contextlib.nullcontext()
        with once:  # every request's exact token ids, the images resized and normalised once
            encoded = [self._encode(self.render(request.messages), images) for request in requests]
        ids = [inputs["input_ids"][0].tolist() for inputs in encoded]
        shared = min(common_prefix_length(ids), min(len(i) for i in ids) - 1)  # each request keeps a token
        image_token = getattr(self.model.config, "image_token_id", None)
        if shared < MIN_SHARED_PREFIX_TOKENS or (image_token is not None and image_token in ids[0][shared:]):
            for request, inputs in zip(requests, encoded, strict=True):
                began = time.perf_counter()
                output = self._complete(request, self._on_device(inputs))
                output.timings = {
                    "preprocess": (began - start) / len(requests),
                    "generate": time.perf_counter() - began,
                }
                yield output
            return
        prepared = time.perf_counter()
        cache = self._prefill(self._on_device(encoded[0]), shared)
        prefilled = time.perf_counter()
        for n, (request, inputs) in enumerate(zip(requests, encoded, strict=True)):
            began = time.perf_counter()
            # The images are in the cache. Token types only let image tokens see each other both ways; the
            # continuation is text only, so its mask is the plain causal one (and much cheaper to build).
            inputs.pop("pixel_values", None)
            inputs.pop("token_type_ids", None)
            with self._torch.inference_mode():
                own = cache if n == len(requests) - 1 else copy.deepcopy(cache)
            output = self._complete(request, self._on_device(inputs), cache=own)
            output.timings = {
                "preprocess": (prepared - start) / len(requests),
                "prefill": (prefilled - prepared) / len(requests),
                "generate": time.perf_counter() - began,
                "prefix_reused": 1.0,
                "prefix_tokens": float(shared),
            }
            yield output

    def _prefill(self, inputs: Any, length: int) -> Any:
        """Run the first ``length`` tokens (and every image) through the model; returns their KV cache, of
        the class ``generate`` itself makes (sliding-window layers keep only their window)."""
        from transformers import DynamicCache

        prefix = {key: value[:, :length] for key, value in inputs.items() if key != "pixel_values"}
        if "pixel_values" in inputs:
            prefix["pixel_values"] = inputs["pixel_values"]
        cache = DynamicCache(config=self.model.config.get_text_config(decoder=True))
        with self._torch.inference_mode():
            self.model(**prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    def _complete(self, request: GenerationRequest, inputs: Any, cache: Any = None) -> GenerationOutput:
        """``model.generate`` on prepared inputs, continuing from ``cache`` (which holds a prefix) when given."""
        torch = self._torch
        max_new_tokens = request.max_new_tokens or self.default_max_new_tokens
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
            "cache_implementation": None,  # the dynamic cache, also where a generation_config asks for "hybrid"
        }
        if cache is not None:
            options["past_key_values"] = cache
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(request.seed)
            sequences = self.model.generate(**inputs, **options)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        new_tokens = sequences[0, prompt_tokens:].tolist()
        text = self.tokenizer.decode(new_tokens, skip_special_tokens=False)
        ended = bool(new_tokens) and new_tokens[-1] in self._stop_ids
        return GenerationOutput(
            text=clean_completion(text),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
            finish_reason="length" if not ended and len(new_tokens) >= max_new_tokens else "stop",
        )

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        for name in ("model", "processor", "tokenizer"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
