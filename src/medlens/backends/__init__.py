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


def load_backend(model: str, engine: str = "transformers", **options: Any) -> Backend:
    """Load ``model`` (a built-in name such as ``test-tiny``, a local directory or a cached HF id)."""
    import importlib

    module_name, _, attr = ENGINES.get(engine).partition(":")
    factory: BackendFactory = getattr(importlib.import_module(module_name), attr)
    return factory(model, **options)


__all__ = ["ENGINES", "Backend", "GenerationOutput", "GenerationRequest", "Messages", "load_backend"]
