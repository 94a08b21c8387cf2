"""The memory a LoRA run needs, estimated before training, and a refusal when it cannot fit.

Terms (bytes): the base weights as loaded; the adapter's trainable parameters with their fp32 gradients and
AdamW's two fp32 moments (16 bytes each); activations for the longest sequence x ``batch_size``: per token and
layer about ``17 * hidden * b`` (``b`` bytes per activation value; the ``34 * hidden`` of Korthikanti et al.
2022 at 16 bits, attention scores left out as SDPA does not keep them), or ``hidden * b`` per layer plus one
full layer with gradient checkpointing; the vision encoder likewise over its patch tokens (when the adapter
reaches it), and the fp32 logits with their gradient (``2 * 4 * vocab`` per token). An estimate, not a
measurement: allocator overhead and framework buffers come on top.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from medlens.errors import MedlensError

GB = 1024**3
#: bytes per trainable parameter: fp32 weight, fp32 gradient, AdamW's two fp32 moments
TRAINABLE_BYTES = 16


class MemoryEstimateError(MedlensError):
    """The run's estimated memory exceeds what is available (``max_memory_gb`` or the device's memory)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated GiB per term, the longest sequence (tokens, images) and the limit it is checked against."""

    params_gb: float
    adapter_gb: float
    activations_gb: float
    vision_gb: float
    logits_gb: float
    longest_tokens: int
    longest_images: int
    batch_size: int
    limit_gb: float | None
    limit_source: str

    @property
    def total_gb(self) -> float:
        return self.params_gb + self.adapter_gb + self.activations_gb + self.vision_gb + self.logits_gb

    def summary(self) -> str:
        limit = f" of {self.limit_gb:.1f} GiB ({self.limit_source})" if self.limit_gb else ""
        return (
            f"memory estimate: {self.total_gb:.2f} GiB{limit} = weights {self.params_gb:.2f} + adapter/optimizer "
            f"{self.adapter_gb:.2f} + activations {self.activations_gb:.2f} + vision {self.vision_gb:.2f} + "
            f"logits {self.logits_gb:.2f}; longest sequence {self.longest_tokens} tokens ({self.longest_images} "
            f"images) x batch {self.batch_size}"
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "total_gb": self.total_gb}


def estimate(
    model: Any,
    trainable_params: int,
    longest_tokens: int,
    longest_images: int,
    batch_size: int,
    checkpointing: bool,
    vision_trained: bool,
    limit_gb: float | None = None,
    device: str = "cpu",
) -> MemoryEstimate:
    """The estimate for ``model`` (a loaded, possibly quantized, base model) and the run's settings."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    act_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    tokens = longest_tokens * batch_size
    activations = _stack(tokens, text.hidden_size, text.num_hidden_layers, act_bytes, checkpointing)
    vision = 0.0
    vision_config = getattr(config, "vision_config", None)
    if vision_config is not None and longest_images and vision_trained:
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        vision_tokens = patches * longest_images * batch_size
        vision = _stack(
            vision_tokens, vision_config.hidden_size, vision_config.num_hidden_layers, act_bytes, checkpointing
        )
    logits = tokens * text.vocab_size * 4 * 2
    limit, source = (limit_gb, "max_memory_gb") if limit_gb else device_memory_gb(device)
    return MemoryEstimate(
        params / GB,
        trainable_params * TRAINABLE_BYTES / GB,
        activations / GB,
        vision / GB,
        logits / GB,
        longest_tokens,
        longest_images,
        batch_size,
        limit,
        source,
    )


def _stack(tokens: int, hidden: int, layers: int, value_bytes: int, checkpointing: bool) -> float:
    """Bytes of activations kept for backward by a transformer stack."""
    full_layer = 17 * hidden * value_bytes * tokens
    if checkpointing:
        return hidden * value_bytes * tokens * layers + full_layer
    return full_layer * layers


def device_memory_gb(device: str) -> tuple[float | None, str]:
    """Total memory of the training device (a CUDA GPU's, else the machine's RAM) and where that came from."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or torch.cuda.current_device())
        return torch.cuda.get_device_properties(index).total_memory / GB, f"{device} memory"
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, "RAM"
    except (ValueError, OSError, AttributeError):
        return None, "unknown"


def check_fits(found: MemoryEstimate) -> None:
    """Raise :class:`MemoryEstimateError` when the estimate exceeds its limit."""
    if found.limit_gb is not None and found.total_gb > found.limit_gb:
        raise MemoryEstimateError(
            f"the run needs about {found.total_gb:.1f} GiB but {found.limit_gb:.1f} GiB ({found.limit_source}) "
            f"are available ({found.summary()}); lower train.batch_size, set train.gradient_checkpointing=true, "
            "use model.quantization=4bit on a GPU, or shorten the inputs"
        )


__all__ = ["MemoryEstimate", "MemoryEstimateError", "check_fits", "device_memory_gb", "estimate"]
