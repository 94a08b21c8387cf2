"""The Hugging Face transformers engine: ``AutoProcessor`` + ``AutoModelForImageTextToText``, offline.

torch and transformers are imported inside functions so that a missing install gives a clear error.
"""

from __future__ import annotations

import contextlib
import difflib
import gc
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, Messages
from medlens.backends.models import BUILTIN_MODELS, DOWNLOAD_HINT, MARKER_FILE
from medlens.errors import BackendUnavailableError, MedlensError, ModelNotAvailableError

#: tokens removed from a completion; ``<unused94>``/``<unused95>`` (thinking markers) are kept
DROPPED_TOKENS = ("<eos>", "<end_of_turn>", "<pad>", "<bos>")
_DROPPED_RE = re.compile("|".join(re.escape(t) for t in DROPPED_TOKENS))
_END_TOKENS = ("<eos>", "<end_of_turn>")

_DTYPES = {
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
}


def clean_completion(text: str) -> str:
    """Drop end/padding markers and trailing whitespace; keep everything else, thinking markers included."""
    return _DROPPED_RE.sub("", text).rstrip()


def _import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise BackendUnavailableError(
            f"the transformers backend needs torch and transformers ({exc.name} is missing): "
            "pip install 'medlens[models]'"
        ) from None
    return torch, transformers


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """Switch transformers' and huggingface_hub's progress bars on or off for the duration of the block."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def resolve_model(model: str) -> tuple[str, dict[str, Any]]:
    """Map a built-in name, a local directory or a cached HF id to what ``from_pretrained`` takes.

    Returns ``(path_or_id, info)``; ``info`` may hold ``is_test_model`` and ``default_max_new_tokens``.
    Raises :class:`ModelNotAvailableError` when the model is nowhere on this machine (nothing is downloaded).
    """
    if model in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS.get(model)
        directory = builtin()
        return str(directory), _read_marker(directory)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(f"{path} is not a model directory (no config.json); {DOWNLOAD_HINT}")
        return str(path), _read_marker(path)
    if _in_hf_cache(model):
        return model, {}
    raise ModelNotAvailableError(_not_available_message(model))


def _read_marker(directory: Path) -> dict[str, Any]:
    marker = directory / MARKER_FILE
    if not marker.is_file():
        return {}
    info = json.loads(marker.read_text())
    return info if isinstance(info, dict) else {}


def _in_hf_cache(model_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        found = try_to_load_from_cache(model_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str)


def _not_available_message(model: str) -> str:
    close = difflib.get_close_matches(model, BUILTIN_MODELS.names(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    looks_like_path = model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1
    where = "no such directory" if looks_like_path else "not a built-in, a local directory or in the local HF cache"
    return f"model {model!r} is not available offline{hint}: {where}; {DOWNLOAD_HINT}"


def _torch_dtype(torch: Any, dtype: str | None, device: str) -> Any:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype == "auto":
        return "auto"
    try:
        return getattr(torch, _DTYPES[dtype.lower()])
    except KeyError:
        known = ", ".join(sorted(_DTYPES))
        raise MedlensError(f"unknown dtype {dtype!r} (known: auto, {known})") from None


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
    """MedGemma (or the built-in ``test-tiny``) on transformers, one request at a time."""

    engine = "transformers"

    def __init__(self, model: str, device: str | None = None, dtype: str | None = None, progress: bool = False) -> None:
        torch, transformers = _import_torch_transformers()
        self._torch = torch
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = _torch_dtype(torch, dtype, self.device)
        with progress_bars(progress):
            self.model_path, info = resolve_model(model)
            self.processor, self.model = self._load(transformers)
        self.is_test_model = bool(info.get("is_test_model", False))
        self.default_max_new_tokens = int(info.get("default_max_new_tokens", 512))
        tokenizer = self.processor.tokenizer
        self._stop_ids = sorted(self._end_token_ids(tokenizer))
        self._pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self._stop_ids[0]

    def _load(self, transformers: Any) -> tuple[Any, Any]:
        options: dict[str, Any] = {"local_files_only": True}
        try:
            processor = transformers.AutoProcessor.from_pretrained(self.model_path, **options)
            model = transformers.AutoModelForImageTextToText.from_pretrained(
                self.model_path, dtype=self.dtype, device_map=self.device, **options
            )
        except OSError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotAvailableError(
                f"model {self.model_name!r} could not be loaded offline ({reason}); {DOWNLOAD_HINT}"
            ) from exc
        return processor, model.eval()

    def _end_token_ids(self, tokenizer: Any) -> set[int]:
        ids = set()
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is not None:
            ids.update(configured if isinstance(configured, list) else [configured])
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in _END_TOKENS if t in vocab)
        return ids

    def prepare(self, messages: Messages) -> Any:
        """Render the chat template and run the processor: the model inputs for one request, on device."""
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        images = [_to_pil(image) for image in _images(messages)]
        bos = self.processor.tokenizer.bos_token
        inputs = self.processor(
            text=text,
            images=images or None,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),  # the template already wrote <bos>
        )
        if self.dtype == "auto":
            return inputs.to(self.model.device)
        return inputs.to(self.model.device, dtype=self.dtype)

    def generate_one(self, request: GenerationRequest) -> GenerationOutput:
        torch = self._torch
        start = time.perf_counter()
        inputs = self.prepare(request.messages)
        prepared = time.perf_counter()
        max_new_tokens = request.max_new_tokens or self.default_max_new_tokens
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "eos_token_id": self._stop_ids,
            "pad_token_id": self._pad_id,
        }
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
        text = self.processor.tokenizer.decode(new_tokens, skip_special_tokens=False)
        ended = bool(new_tokens) and new_tokens[-1] in self._stop_ids
        return GenerationOutput(
            text=clean_completion(text),
            prompt_tokens=prompt_tokens,
            completion_tokens=len(new_tokens),
            finish_reason="length" if not ended and len(new_tokens) >= max_new_tokens else "stop",
            timings={"preprocess": prepared - start, "generate": time.perf_counter() - prepared},
        )

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        for name in ("model", "processor"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()
