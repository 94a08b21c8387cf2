"""Model backends behind one adapter. Engines register themselves by name; heavy imports stay inside them."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
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
    import importlib

    engine, model, options = parse_model_spec(model, engine, options)
    module_name, _, attr = ENGINES.get(engine).partition(":")
    factory: BackendFactory = getattr(importlib.import_module(module_name), attr)
    check_engine_options(engine, factory, options)
    return factory(model, **options)


def check_engine_options(engine: str, factory: BackendFactory, options: dict[str, Any]) -> None:
    """Every key of ``options`` is a keyword the engine's factory takes (its signature says which)."""
    parameters = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return
    known = [name for name in parameters if name != "model"]
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
    "ENGINES",
    "Backend",
    "GenerationOutput",
    "GenerationRequest",
    "Messages",
    "engine_options",
    "load_backend",
]
