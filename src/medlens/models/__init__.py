"""The models layer: which model a name means, building the built-in test models, device and dtype choice,
and one fingerprint of the weights. MedGemma backends and MedSigLIP both load through it.

Importing this package is cheap: torch and transformers are imported by the functions that need them.
"""

from __future__ import annotations

from medlens.models.builtins import BUILTIN_MODELS, EMBED, GENERATE, BuiltinModel
from medlens.models.cache import MARKER_FILE, build_once, medlens_cache_dir
from medlens.models.device import DEVICE_CHOICES, DTYPE_CHOICES, select_device, select_dtype
from medlens.models.fingerprint import model_fingerprint
from medlens.models.resolve import ModelSource, resolve_model

__all__ = [
    "BUILTIN_MODELS",
    "DEVICE_CHOICES",
    "DTYPE_CHOICES",
    "EMBED",
    "GENERATE",
    "MARKER_FILE",
    "BuiltinModel",
    "ModelSource",
    "build_once",
    "medlens_cache_dir",
    "model_fingerprint",
    "resolve_model",
    "select_device",
    "select_dtype",
]
