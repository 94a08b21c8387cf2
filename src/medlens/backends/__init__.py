"""Model backends behind one adapter. Engines register themselves by name; heavy imports stay inside them."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, Messages
from medlens.errors import MedlensError
from medlens.registry import Registry

BackendFactory = Callable[..., Backend]

#: engine name -> factory(model: str, **options) -> Backend. Modules register on import (lazily below).
ENGINES: Registry[str] = Registry("backend")
ENGINES.add("transformers", "medlens.backends.transformers_backend:TransformersBackend")
ENGINES.add("openai", "medlens.backends.openai_backend:OpenAIBackend")
ENGINES.add("llamacpp", "medlens.backends.llamacpp_backend:LlamaCppBackend")
ENGINES.add("vllm", "medlens.backends.vllm_backend:VLLMBackend")


def load_backend(model: str, engine: str = "transformers", **options: Any) -> Backend:
    """Load ``model``: a built-in name (``test-tiny``), a local directory or a cached HF id for transformers;
    a served model name for ``openai``. ``ENGINE:MODEL`` (and ``ENGINE:MODEL@URL``) in ``model`` choose the
    engine (and server) in one string, e.g. ``openai:medgemma-27b-text-it@http://127.0.0.1:8000/v1``.

    ``options`` go to the engine (``device``, ``dtype`` for transformers; ``base_url``, ``api_key``,
    ``timeout`` for openai); one the engine does not take is an error naming those it does.
    """
    engine, model, options = parse_model_spec(model, engine, options)
    factory = _factory(engine)
    check_engine_options(engine, factory, options)
    return factory(model, **options)


def check_backend_options(model: str, engine: str = "transformers", **options: Any) -> None:
    """Refuse, without loading anything, options :func:`load_backend` would refuse (an unknown key,
    ``adapter`` for an engine that cannot load one)."""
    engine, model, options = parse_model_spec(model, engine, options)
    check_engine_options(engine, _factory(engine), options)


def _factory(engine: str) -> BackendFactory:
    import importlib

    module_name, _, attr = ENGINES.get(engine).partition(":")
    return getattr(importlib.import_module(module_name), attr)


#: how to use an adapter with an engine that cannot load one itself (``--adapter`` is refused there)
ADAPTER_HINTS: dict[str, str] = {
    "openai": "the server holds the weights: load the adapter there (vLLM: `vllm serve BASE --enable-lora "
    "--lora-modules NAME=DIR`, then --model openai:NAME@URL), or use --engine transformers or vllm",
    "llamacpp": "llama.cpp reads LoRA as GGUF: merge the adapter into the base (medlens finetune merge) and "
    "convert that folder to GGUF, or use --engine transformers or vllm",
}


class AdapterNotSupportedError(MedlensError):
    """``adapter=`` given to an engine that cannot put an adapter on its model."""


@dataclass(frozen=True)
class BackendIdentity:
    """What names a model's results (as a loaded :class:`Backend` would say it), known without loading it."""

    engine: str
    model_name: str
    revision: str
    default_max_new_tokens: int
    is_test_model: bool
    model_warning: str | None
    #: ``{"name", "sha256"}`` of the PEFT adapter on the weights (None: the base model alone)
    adapter: dict[str, str] | None = None


def _no_engine_warning() -> str | None:
    return None


def _vllm_version_warning() -> str | None:
    """What the vllm backend warns about the installed vLLM, read from its metadata (vLLM is not imported:
    a batch driver keys rows without a GPU engine of its own)."""
    from importlib.metadata import PackageNotFoundError, version

    from medlens.backends.vllm_backend import version_warning

    try:
        return version_warning(version("vllm"))
    except PackageNotFoundError:  # the replicas have it, the driver need not
        return None


#: engines whose revision is the fingerprint of the local weights folder (see :func:`identify_backend`),
#: with what each adds to the model's warning
_FOLDER_FINGERPRINT_ENGINES: dict[str, Callable[[], str | None]] = {
    "transformers": _no_engine_warning,
    "vllm": _vllm_version_warning,
}


def identify_backend(model: str, engine: str = "transformers", **options: Any) -> BackendIdentity | None:
    """The identity :func:`load_backend` would give ``model``, without importing torch or loading weights;
    None for engines that only know it once loaded (callers then load the backend)."""
    from medlens.models import GENERATE, model_fingerprint, resolve_model
    from medlens.models.adapter import read_adapter
    from medlens.models.quantization import quantized_revision

    engine, model, options = parse_model_spec(model, engine, options)
    if engine not in _FOLDER_FINGERPRINT_ENGINES:
        return None
    source = resolve_model(model, GENERATE)
    revision = model_fingerprint(source.path)
    adapter = None
    if options.get("adapter") is not None:
        info = read_adapter(options["adapter"])
        info.check_base(model, revision)
        revision, adapter = info.fingerprint(revision), info.identity()
    revision = quantized_revision(revision, options.get("quantization"))  # unchanged without quantization
    warnings = [w for w in (source.warning, _FOLDER_FINGERPRINT_ENGINES[engine]()) if w]
    return BackendIdentity(
        engine=engine,
        model_name=model,
        revision=revision,
        default_max_new_tokens=source.default_max_new_tokens,
        is_test_model=source.is_test_model,
        model_warning="; ".join(warnings) or None,
        adapter=adapter,
    )


def check_engine_options(engine: str, factory: BackendFactory, options: dict[str, Any]) -> None:
    """Every key of ``options`` is a keyword the engine's factory takes (its signature says which)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name in parameters if name != "model"]
    if "adapter" in options and "adapter" not in known:
        hint = ADAPTER_HINTS.get(engine, "use --engine transformers or vllm")
        raise AdapterNotSupportedError(f"engine {engine} cannot load --adapter {options['adapter']}: {hint}")
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise MedlensError(f"engine {engine} takes no option {key!r}{hint} (it takes: {', '.join(known)})")


def engine_options(
    device: str = "auto", dtype: str = "auto", model_args: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The options :func:`load_backend` gets from ``--device``, ``--dtype`` and ``--model-arg``: device and
    dtype only when not ``auto`` (engines that load weights choose them; a server takes neither)."""
    options = {key: value for key, value in (("device", device), ("dtype", dtype)) if value and value != "auto"}
    return {**options, **(model_args or {})}


def parse_model_spec(spec: str, engine: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Split ``ENGINE:MODEL@URL`` (engine prefix only when it is a registered engine)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ENGINES and not rest.startswith("//"):
        engine, spec = prefix, rest
    if engine == "openai" and "@" in spec:
        spec, _, url = spec.partition("@")
        options = {**options, "base_url": url}
    return engine, spec, options


__all__ = [
    "ADAPTER_HINTS",
    "ENGINES",
    "AdapterNotSupportedError",
    "Backend",
    "BackendIdentity",
    "GenerationOutput",
    "GenerationRequest",
    "Messages",
    "check_backend_options",
    "engine_options",
    "identify_backend",
    "load_backend",
]
