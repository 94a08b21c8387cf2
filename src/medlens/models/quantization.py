"""Loading a transformers model quantised with bitsandbytes (QLoRA's 4-bit NF4 base, or 8-bit), CUDA only.

The quantisation is part of a model's revision (``+nf4``, ``+int8``): outputs of a quantised model are never
mixed with those of the full-precision weights in an eval journal.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from medlens.errors import MedlensError

#: ``quantization`` option -> (revision suffix, BitsAndBytesConfig keywords; compute dtype added at load)
QUANTIZATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "4bit": ("nf4", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
    "8bit": ("int8", {"load_in_8bit": True}),
}


def _check_name(quantization: str) -> tuple[str, dict[str, Any]]:
    if quantization not in QUANTIZATIONS:
        raise MedlensError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    return QUANTIZATIONS[quantization]


def quantized_revision(revision: str, quantization: str | None) -> str:
    """``revision`` with the quantisation's suffix (unchanged without one)."""
    return revision if quantization is None else f"{revision}+{_check_name(quantization)[0]}"


def quantization_config(quantization: str, device: str, dtype: Any) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` on ``device``: a typed error without a CUDA
    device or without the bitsandbytes package (its kernels are CUDA kernels)."""
    _, keywords = _check_name(quantization)
    if not str(device).startswith("cuda"):
        raise MedlensError(f"quantization {quantization!r} needs a CUDA GPU (bitsandbytes); this run is on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MedlensError(f"quantization {quantization!r} needs bitsandbytes: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    extra = {"bnb_4bit_compute_dtype": dtype, "bnb_4bit_quant_storage": dtype} if "load_in_4bit" in keywords else {}
    return BitsAndBytesConfig(**keywords, **extra)
