"""Model backends behind one adapter. Engines register themselves by name; heavy imports stay inside them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from medlens.backends.base import Backend, GenerationOutput, GenerationRequest, Messages
from medlens.registry import Registry

BackendFactory = Callable[..., Backend]

#: engine name -> factory(model: str, **options) -> Backend. Modules register on import (lazily below).
ENGINES: Registry[str] = Registry("backend")
ENGINES.add("transformers", "medlens.backends.transformers_backend:TransformersBackend")
ENGINES.add("openai", "medlens.backends.openai_backend:OpenAIBackend")


def load_backend(model: str, engine: str = "transformers", **options: Any) -> Backend:
    """Load ``model``: a built-in name (``test-tiny``), a local directory or a cached HF id for transformers;
    a served model name for ``openai``. ``ENGINE:MODEL`` (and ``ENGINE:MODEL@URL``) in ``model`` choose the
    engine (and server) in one string, e.g. ``openai:medgemma-27b-text-it@http://127.0.0.1:8000/v1``."""
    import importlib

    engine, model, options = parse_model_spec(model, engine, options)
    module_name, _, attr = ENGINES.get(engine).partition(":")
    factory: BackendFactory = getattr(importlib.import_module(module_name), attr)
    return factory(model, **options)


def parse_model_spec(spec: str, engine: str, options: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """Split ``ENGINE:MODEL@URL`` (engine prefix only when it is a registered engine)."""
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ENGINES and not rest.startswith("//"):
        engine, spec = prefix, rest
    if engine == "openai" and "@" in spec:
        spec, _, url = spec.partition("@")
        options = {**options, "base_url": url}
    return engine, spec, options


__all__ = ["ENGINES", "Backend", "GenerationOutput", "GenerationRequest", "Messages", "load_backend"]
