"""The Hugging Face transformers engine, offline.

Multimodal models (MedGemma 4B, ``test-tiny``) load with ``AutoProcessor`` + ``AutoModelForImageTextToText``;
text-only ones (MedGemma 27B text, GGUF files, the built-in ``gemma-3-270m``) with ``AutoTokenizer`` +
``AutoModelForCausalLM``. Requests of one ``generate`` call that share their prefix (several questions about
one volume) share one image encoding and one prefill; other greedy requests run in left-padded batches of up
to ``batch_size``: see :meth:`TransformersBackend.generate`.

torch and transformers are imported inside functions so that a missing install gives a clear error.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from medlens.backends.base import (
    Backend,
    GenerationOutput,
    GenerationRequest,
    Messages,
    OutputCallback,
    ProgressCallback,
    TextCallback,
)
from medlens.backends.prefix_cache import common_prefix_length, group_by_prefix, images_processed_once
from medlens.backends.rendering import (
    END_TOKENS,
    clean_completion,
    image_parts,
    message_text,
    render_prompt,
    to_pil,
)
from medlens.errors import MedlensError
from medlens.models import GENERATE, ModelSource, model_fingerprint, resolve_model, select_device, select_dtype
from medlens.models.adapter import attach_adapter, read_adapter
from medlens.models.hf import import_torch_transformers, loader_errors, progress_bars
from medlens.models.quantization import quantization_config, quantized_revision
from medlens.models.resolve import DOWNLOAD_HINTS

#: a shared prefix shorter than this is not worth a separate prefill
MIN_SHARED_PREFIX_TOKENS = 16
#: ``tie_margin`` when none is given: float32 (and float64) batches are checked against perturbations far
#: larger than their measured rounding differences (see docs/performance.md); half precision only catches
#: the closest ties, since its one-at-a-time answers are themselves rounding-dependent
DEFAULT_TIE_MARGINS = {"float32": 1e-4, "float64": 1e-4, "bfloat16": 1e-2, "float16": 1e-2}
#: per-token inputs a batch left-pads, with their padding value (``None``: the tokenizer's pad id)
_PADDED_INPUTS: dict[str, int | None] = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0}
#: per-image inputs a batch concatenates in row order (the model fills image tokens row by row)
_STACKED_INPUTS = ("pixel_values",)


class TransformersBackend(Backend):
    """A model on transformers: MedGemma, a text-only model (GGUF files included) or a built-in.

    The constructor's keywords are the engine's ``--model-arg`` keys:

    - ``device``, ``dtype``: where and in what precision (``auto``: the first GPU in bfloat16, else the CPU in
      float32); ``progress``: show loading progress bars; ``attn_implementation``: ``sdpa``, ``eager`` ...
    - ``share_prefix`` (default true): requests of one call that share everything but the trailing question
      encode their images and prefill that prefix once.
    - ``batch_size`` (default 8): greedy requests that share no prefix run left-padded, up to this many per
      ``model.generate`` call; 1 runs every request on its own. Sampled requests always run on their own, so
      that each keeps its seed's answer.
    - ``tie_margin``: a batched greedy answer is recomputed on its own when, at some step it kept, its two
      best logits came closer than this fraction of the largest logit's magnitude (where padding's rounding
      could have changed the choice); default 1e-4 in float32, 1e-2 in bfloat16/float16; 0 never recomputes.
    - ``adapter``: a PEFT adapter folder (LoRA ...; ``medlens finetune`` writes one) put on the model with peft;
      every generate path (shared prefixes, batches) then runs through it, and the backend's ``fingerprint``
      names base and adapter (:mod:`medlens.models.adapter`).
    - ``quantization``: ``4bit`` (NF4, QLoRA's base) or ``8bit`` with bitsandbytes, CUDA only; part of the
      fingerprint (:mod:`medlens.models.quantization`).

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
        batch_size: int = 8,
        tie_margin: float | None = None,
        adapter: str | None = None,
        quantization: str | None = None,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MedlensError(f"batch_size must be a whole number of at least 1, not {batch_size!r}")
        if tie_margin is not None and (isinstance(tie_margin, bool) or not 0 <= tie_margin <= 1):
            raise MedlensError(f"tie_margin must be a number from 0 to 1, not {tie_margin!r}")
        adapter_info = read_adapter(adapter) if adapter is not None else None  # a bad folder fails before loading
        torch, transformers = import_torch_transformers()
        self._torch = torch
        self.model_name = model
        self.device = select_device(torch, device)
        self.dtype = select_dtype(torch, dtype, self.device)
        #: encode and prefill a prefix shared by several requests of one ``generate`` call once
        self.share_prefix = share_prefix
        #: most greedy requests per ``model.generate`` call (1: one at a time)
        self.batch_size = batch_size
        #: relative closeness of the top two logits below which a batched answer is recomputed alone
        default_margin = DEFAULT_TIE_MARGINS.get(str(self.dtype).removeprefix("torch."), 1e-2)
        self.tie_margin = default_margin if tie_margin is None else float(tie_margin)
        #: what ``from_pretrained`` gets besides the files (``attn_implementation``: sdpa, eager ...)
        self._load_options: dict[str, Any] = {"dtype": self.dtype, "device_map": self.device, "local_files_only": True}
        if attn_implementation:
            self._load_options["attn_implementation"] = attn_implementation
        if quantization is not None:
            self._load_options["quantization_config"] = quantization_config(quantization, self.device, self.dtype)
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
        #: the base weights' fingerprint (``fingerprint`` adds the adapter's hash when one is loaded)
        self.base_fingerprint = model_fingerprint(source.path)
        self.fingerprint = self.base_fingerprint
        if adapter_info is not None:
            adapter_info.check_base(model, self.base_fingerprint)
            self.model = attach_adapter(self.model, adapter_info)
            self.adapter = adapter_info
            self.fingerprint = adapter_info.fingerprint(self.base_fingerprint)
        self.fingerprint = quantized_revision(self.fingerprint, quantization)
        self.is_test_model = source.is_test_model
        self.default_max_new_tokens = source.default_max_new_tokens
        self.model_warning = source.warning
        self._stop_ids = sorted(self._end_token_ids(self.tokenizer))
        pad_id = self.tokenizer.pad_token_id
        self._pad_id = pad_id if pad_id is not None else self._stop_ids[0]
        #: prompt tokens per image, for ordering requests by length before batching
        self._image_tokens = int(getattr(self.model.config, "mm_tokens_per_image", 256) or 256)

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
        ids.update(vocab[t] for t in END_TOKENS if t in vocab)
        return ids

    def render(self, messages: Messages) -> str:
        """The prompt text (:func:`~medlens.backends.rendering.render_prompt`)."""
        return render_prompt(self.processor, self.tokenizer, messages)

    def prepare(self, messages: Messages) -> Any:
        """Render the prompt and run the processor (or tokenizer): the model inputs for one request, on device."""
        self._refuseimage_parts(messages)
        images = [to_pil(image) for image in image_parts(messages)]
        return self._on_device(self._encode(self.render(messages), images))

    def _refuseimage_parts(self, messages: Messages) -> None:
        if self.text_only and (n := len(image_parts(messages))):
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
        self,
        requests: Sequence[GenerationRequest],
        progress: ProgressCallback | None = None,
        on_output: OutputCallback | None = None,
        on_text: TextCallback | None = None,
    ) -> list[GenerationOutput]:
        """Complete every request; outputs in input order, ``on_output(index, output)`` and ``progress(1)`` as
        each one is done (a batch's rows when the batch ends, a shared-prefix group's one by one).
        ``on_text(index, delta)`` gets the text of requests that run on their own as it is decoded, and the
        whole text of batched rows when their batch ends; it never changes what is generated.

        Requests that share everything but the trailing question text (same texts, same images by content)
        are grouped: their images are processed and encoded once and their common prefix is prefilled once;
        each question then continues from a copy of that KV cache. Their ``timings`` say ``prefix_reused: 1.0``
        and ``prefix_tokens``, and spread the shared ``preprocess`` and ``prefill`` seconds over the group.

        The other greedy requests run in batches of up to ``batch_size`` (sorted by length, so that rows of one
        batch need little padding): each request is encoded on its own (its exact token ids), the batch is
        left-padded (position ids follow the attention mask; image features fill the image tokens row by row)
        and one ``model.generate`` runs it to the largest ``max_new_tokens``; every row then ends at its own
        cap or end token. An answer whose top two logits came within ``tie_margin`` at a step it kept is
        recomputed on its own (``timings["tie_rerun"]``). Their ``timings`` spread the batch's ``preprocess``
        and ``generate`` seconds over its rows and say ``batch_size``. Sampled requests run one at a time.

        Greedy (and seeded) answers are those of one request at a time.
        """
        for request in requests:
            self._refuseimage_parts(request.messages)
        batch = [request.messages for request in requests]
        groups = group_by_prefix(batch) if self.share_prefix else [[i] for i in range(len(requests))]
        outputs: dict[int, GenerationOutput] = {}
        streamed: set[int] = set()

        def stream_for(index: int) -> Callable[[str], None] | None:
            if on_text is None:
                return None

            def emit(delta: str) -> None:
                streamed.add(index)
                on_text(index, delta)

            return emit

        def finish(index: int, output: GenerationOutput) -> None:
            outputs[index] = output
            if on_text is not None and index not in streamed:
                on_text(index, output.text)
            if on_output is not None:
                on_output(index, output)
            if progress is not None:
                progress(1)

        apart: list[_Pending] = []
        for group in groups:
            members = [requests[i] for i in group]
            if len(members) == 1:
                apart.append(_Pending(group[0], members[0]))
                continue
            shared = self._encode_group(members)
            if shared.prefix_tokens == 0:  # nothing worth sharing: like requests of their own, already encoded
                share = shared.seconds / len(members)
                apart.extend(_Pending(i, r, e, share) for i, r, e in zip(group, members, shared.encoded, strict=True))
                continue
            streams = [stream_for(i) for i in group]
            for index, output in zip(group, self._generate_shared(members, shared, streams), strict=True):
                finish(index, output)
        self._generate_apart(apart, finish, stream_for)
        return [outputs[i] for i in range(len(requests))]

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        return self._generate_one(request)

    def _generate_one(
        self, request: GenerationRequest, stream: Callable[[str], None] | None = None
    ) -> GenerationOutput:
        start = time.perf_counter()
        inputs = self.prepare(request.messages)
        prepared = time.perf_counter()
        output = self._complete(request, inputs, stream=stream)
        output.timings = {"preprocess": prepared - start, "generate": time.perf_counter() - prepared}
        return output

    def _encode_request(self, messages: Messages) -> Any:
        """One request's model inputs, on the CPU."""
        return self._encode(self.render(messages), [to_pil(image) for image in image_parts(messages)])

    def _encode_group(self, requests: list[GenerationRequest]) -> _SharedGroup:
        """Every request's exact token ids (the images resized and normalised once) and how many leading tokens
        they share; 0 when that is not worth a separate prefill."""
        start = time.perf_counter()
        images = [to_pil(image) for image in image_parts(requests[0].messages)]
        once = images_processed_once(self.processor) if self.processor is not None else contextlib.nullcontext()
        with once:
            encoded = [self._encode(self.render(request.messages), images) for request in requests]
        ids = [inputs["input_ids"][0].tolist() for inputs in encoded]
        shared = min(common_prefix_length(ids), min(len(i) for i in ids) - 1)  # each request keeps a token
        image_token = getattr(self.model.config, "image_token_id", None)
        if shared < MIN_SHARED_PREFIX_TOKENS or (image_token is not None and image_token in ids[0][shared:]):
            shared = 0
        return _SharedGroup(encoded, shared, time.perf_counter() - start)

    def _generate_shared(
        self,
        requests: list[GenerationRequest],
        group: _SharedGroup,
        streams: Sequence[Callable[[str], None] | None] | None = None,
    ) -> Iterator[GenerationOutput]:
        """One group of requests with a shared prefix (see :meth:`generate`), yielded one by one."""
        streams = streams or [None] * len(requests)
        prepared = time.perf_counter()
        cache = self._prefill(self._on_device(group.encoded[0]), group.prefix_tokens)
        prefilled = time.perf_counter()
        for n, (request, inputs) in enumerate(zip(requests, group.encoded, strict=True)):
            began = time.perf_counter()
            # The images are in the cache. Token types only let image tokens see each other both ways; the
            # continuation is text only, so its mask is the plain causal one (and much cheaper to build).
            inputs.pop("pixel_values", None)
            inputs.pop("token_type_ids", None)
            with self._torch.inference_mode():
                own = cache if n == len(requests) - 1 else copy.deepcopy(cache)
            output = self._complete(request, self._on_device(inputs), cache=own, stream=streams[n])
            output.timings = {
                "preprocess": group.seconds / len(requests),
                "prefill": (prefilled - prepared) / len(requests),
                "generate": time.perf_counter() - began,
                "prefix_reused": 1.0,
                "prefix_tokens": float(group.prefix_tokens),
            }
            yield output

    def _generate_apart(
        self,
        pending: list[_Pending],
        finish: Callable[[int, GenerationOutput], None],
        stream_for: Callable[[int], Callable[[str], None] | None] = lambda index: None,
    ) -> None:
        """Requests that share no prefix: greedy ones in batches, sampled ones (and all with ``batch_size`` 1)
        one at a time."""
        greedy = [p for p in pending if p.request.temperature <= 0] if self.batch_size > 1 else []
        chosen = {id(p) for p in greedy}
        for item in pending:
            if id(item) not in chosen:
                finish(item.index, self._generate_alone(item, stream_for(item.index)))
        for chunk in self._batches(greedy):
            for item, output in zip(chunk, self._generate_batch(chunk, stream_for), strict=True):
                finish(item.index, output)

    def _generate_alone(self, item: _Pending, stream: Callable[[str], None] | None = None) -> GenerationOutput:
        """One request on its own (as :meth:`generate_one`, reusing its inputs when already encoded)."""
        if item.inputs is None:
            return self._generate_one(item.request, stream)
        began = time.perf_counter()
        output = self._complete(item.request, self._on_device(item.inputs), stream=stream)
        output.timings = {"preprocess": item.preprocess, "generate": time.perf_counter() - began}
        return output

    def _batches(self, pending: list[_Pending]) -> list[list[_Pending]]:
        """``pending`` sorted by (estimated) prompt length and cut into as few batches of at most
        ``batch_size`` as possible, of even sizes."""
        if not pending:
            return []
        ordered = sorted(pending, key=self._length_estimate)
        count = math.ceil(len(ordered) / self.batch_size)
        size, extra = divmod(len(ordered), count)
        batches, start = [], 0
        for n in range(count):
            end = start + size + (n < extra)
            batches.append(ordered[start:end])
            start = end
        return batches

    def _length_estimate(self, item: _Pending) -> int:
        if item.inputs is not None:
            return int(item.inputs["input_ids"].shape[1])
        characters = sum(len(message_text(message)) for message in item.request.messages)
        return characters // 3 + len(image_parts(item.request.messages)) * self._image_tokens

    def _generate_batch(
        self,
        chunk: list[_Pending],
        stream_for: Callable[[int], Callable[[str], None] | None] = lambda index: None,
    ) -> list[GenerationOutput]:
        """One batch of greedy requests (see :meth:`generate`); a batch of one, or inputs that cannot be
        batched (other model inputs, images of other sizes), run one at a time."""
        if len(chunk) == 1:
            return [self._generate_alone(chunk[0], stream_for(chunk[0].index))]
        start = time.perf_counter()
        for item in chunk:
            item.encoded_before = item.inputs is not None
            if item.inputs is None:
                began = time.perf_counter()
                item.inputs = self._encode_request(item.request.messages)
                item.preprocess = time.perf_counter() - began
        collated = self._collate([item.inputs for item in chunk])
        if collated is None:
            return [self._generate_alone(item, stream_for(item.index)) for item in chunk]
        inputs = self._on_device(collated)
        prepared = time.perf_counter()
        # spread evenly: what this call encoded and collated, and what a prefix group encoded beforehand
        earlier = sum(item.preprocess for item in chunk if item.encoded_before)
        preprocess = (prepared - start + earlier) / len(chunk)
        rows = self._complete_batch([item.request for item in chunk], inputs, [_width(item.inputs) for item in chunk])
        seconds = (time.perf_counter() - prepared) / len(chunk)
        outputs = []
        for item, row in zip(chunk, rows, strict=True):
            output = row if row is not None else self._generate_alone(item, stream_for(item.index))
            timings = {"preprocess": preprocess, "generate": seconds, "batch_size": float(len(chunk))}
            if row is None:
                timings["generate"] += output.timings["generate"]
                timings["tie_rerun"] = 1.0
            output.timings = timings
            outputs.append(output)
        return outputs

    def _collate(self, encoded: list[Any]) -> Any:
        """One left-padded batch of single-request inputs (on the CPU), or ``None`` when they cannot be one."""
        torch = self._torch
        keys = set().union(*encoded)
        if not keys <= {*_PADDED_INPUTS, *_STACKED_INPUTS} or not {"input_ids", "attention_mask"} <= keys:
            return None
        width = max(_width(inputs) for inputs in encoded)
        data: dict[str, Any] = {}
        for key, value in _PADDED_INPUTS.items():
            if key not in keys:
                continue
            pad = self._pad_id if value is None else value
            rows = []
            for inputs in encoded:
                row = inputs[key] if key in inputs else torch.zeros_like(inputs["input_ids"])
                rows.append(torch.nn.functional.pad(row, (width - row.shape[1], 0), value=pad))
            data[key] = torch.cat(rows)
        for key in _STACKED_INPUTS:
            parts = [inputs[key] for inputs in encoded if key in inputs]
            if parts and len({tuple(part.shape[1:]) for part in parts}) > 1:
                return None
            if parts:
                data[key] = torch.cat(parts)
        return type(encoded[0])(data)

    def _complete_batch(
        self, requests: list[GenerationRequest], inputs: Any, lengths: list[int]
    ) -> list[GenerationOutput | None]:
        """One ``model.generate`` over a left-padded greedy batch; each row ends at its own cap or end token.
        ``None`` for a row that came within ``tie_margin`` of another choice (to be recomputed alone)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        torch = self._torch
        caps = [request.max_new_tokens or self.default_max_new_tokens for request in requests]
        width = int(inputs["input_ids"].shape[1])
        closeness = _Closeness()
        options: dict[str, Any] = {
            "max_new_tokens": max(caps),
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
            "cache_implementation": None,
            "do_sample": False,
            "temperature": None,
            "top_p": None,
            "top_k": None,
            "logits_processor": LogitsProcessorList([closeness]),
            "stopping_criteria": StoppingCriteriaList([_RowCaps(width, torch.tensor(caps, device=self.model.device))]),
        }
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **options)
        generated = sequences[:, width:].tolist()
        gaps = torch.stack(closeness.steps, dim=1).tolist() if closeness.steps else [[] for _ in requests]
        stops = set(self._stop_ids)
        rows: list[GenerationOutput | None] = []
        for tokens, gap, cap, length in zip(generated, gaps, caps, lengths, strict=True):
            tokens = tokens[:cap]
            end = next((n for n, token in enumerate(tokens) if token in stops), None)
            tokens = tokens if end is None else tokens[: end + 1]
            near_tie = bool(tokens) and min(gap[: len(tokens)]) < self.tie_margin
            rows.append(None if near_tie else self._output(tokens, length, cap))
        return rows

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

    def _complete(
        self, request: GenerationRequest, inputs: Any, cache: Any = None, stream: Callable[[str], None] | None = None
    ) -> GenerationOutput:
        """``model.generate`` on prepared inputs, continuing from ``cache`` (which holds a prefix) when given;
        ``stream`` gets the decoded text as it comes."""
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
        if stream is not None:
            options["streamer"] = _text_streamer()(self.tokenizer, stream)
        if request.temperature > 0:
            options.update(do_sample=True, temperature=request.temperature)
        else:
            options.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(request.seed)
            sequences = self.model.generate(**inputs, **options)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        return self._output(sequences[0, prompt_tokens:].tolist(), prompt_tokens, max_new_tokens)

    def _output(self, new_tokens: list[int], prompt_tokens: int, max_new_tokens: int) -> GenerationOutput:
        """The output for the tokens generated after a prompt of ``prompt_tokens``."""
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


def _width(inputs: Any) -> int:
    return int(inputs["input_ids"].shape[1])


@dataclass
class _Pending:
    """A request that shares no prefix, with its CPU inputs and their ``preprocess`` seconds once encoded."""

    index: int
    request: GenerationRequest
    inputs: Any = None
    preprocess: float = 0.0
    encoded_before: bool = False  # by its prefix group, before the batch


@dataclass
class _SharedGroup:
    """Requests of one prefix group, encoded: their inputs, the shared tokens (0: not worth sharing), seconds."""

    encoded: list[Any]
    prefix_tokens: int
    seconds: float


class _Closeness:
    """A logits processor that changes nothing and keeps, for every step and row, how close the two best
    scores came, as a fraction of the largest finite score's magnitude."""

    def __init__(self) -> None:
        self.steps: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        best = scores.topk(2, dim=-1).values
        scale = scores.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).abs().amax(dim=-1).clamp_min(1e-30)
        self.steps.append((best[:, 0] - best[:, 1]) / scale)
        return scores


class _RowCaps:
    """A stopping criterion: each row of a batch is done after its own number of new tokens."""

    def __init__(self, width: int, caps: Any) -> None:
        self.width = width
        self.caps = caps

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        return self.caps <= input_ids.shape[1] - self.width


@functools.cache
def _text_streamer() -> type:
    """A transformers ``TextStreamer`` that hands each decoded piece to a callback (made on first use, so that
    transformers is imported only then). A failing callback stops the streaming, never the generation."""
    from transformers import TextStreamer

    class DeltaStreamer(TextStreamer):
        def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=False)
            self.emit: Callable[[str], None] | None = emit

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text and self.emit is not None:
                try:
                    self.emit(text)
                except Exception:
                    self.emit = None

    return DeltaStreamer
