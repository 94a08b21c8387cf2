"""Device and dtype choice, the same for every model: ``auto|cpu|cuda|cuda:N`` and
``auto|float32|bfloat16|float16``. ``auto`` means the first CUDA GPU when there is one, else the CPU; and
bfloat16 on a GPU (MedGemma's own dtype), float32 on a CPU."""

from __future__ import annotations

import re
from typing import Any

from medlens.errors import MedlensError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
#: accepted spellings -> torch dtype name
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}
DTYPE_CHOICES = "auto, float32, bfloat16, float16"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")


def check_device_name(device: str) -> str:
    """``device`` lower-cased when it is a valid device spelling (without looking at the hardware)."""
    name = (device or "auto").strip().lower()
    if name not in ("auto", "cpu") and not _CUDA.match(name):
        raise MedlensError(f"unknown device {device!r} (use {DEVICE_CHOICES})")
    return name


def check_dtype_name(dtype: str) -> str:
    """The canonical dtype name (``auto``, ``float32``, ``bfloat16``, ``float16``) of a valid spelling."""
    name = (dtype or "auto").strip().lower()
    if name == "auto":
        return name
    if name not in DTYPE_NAMES:
        raise MedlensError(f"unknown dtype {dtype!r} (use {DTYPE_CHOICES})")
    return DTYPE_NAMES[name]


def select_device(torch: Any, device: str | None = "auto") -> str:
    """The torch device string for ``device``; CUDA that is not there is an error, not a silent CPU run."""
    name = check_device_name(device or "auto")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    match = _CUDA.match(name)
    if match:
        if not torch.cuda.is_available():
            raise MedlensError(f"device {device!r} was asked for but no CUDA GPU is available (use --device cpu)")
        index = int(match[1] or 0)
        if index >= torch.cuda.device_count():
            raise MedlensError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return name


def select_dtype(torch: Any, dtype: str | None, device: str) -> Any:
    """The torch dtype for ``dtype`` on ``device``. bfloat16 on a CPU without native bfloat16 support
    (AVX-512 or AMX) is refused: PyTorch would emulate it, slower than float32 and not what was asked."""
    name = check_dtype_name(dtype or "auto")
    on_cpu = not device.startswith("cuda")
    if name == "auto":
        name = "float32" if on_cpu else "bfloat16"
    if name == "bfloat16" and on_cpu and not cpu_supports_bfloat16(torch):
        raise MedlensError(
            "bfloat16 was asked for on a CPU without native bfloat16 support (AVX-512 or AMX): "
            "use --dtype float32 on this machine, or a GPU"
        )
    if name == "bfloat16" and not on_cpu and not torch.cuda.is_bf16_supported():
        raise MedlensError(f"the GPU {device} has no bfloat16 support: use --dtype float16 or float32")
    return getattr(torch, name)


def cpu_supports_bfloat16(torch: Any) -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (what ``torch.ops.mkldnn`` reports)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
