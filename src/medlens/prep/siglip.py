"""MedSigLIP input preparation (docs/siglip.md, Preparation): 448x448, bilinear resize WITHOUT antialiasing (as the
published numbers were computed, unlike PIL's bilinear, which antialiases when shrinking), then pixels mapped
from 0..255 to -1..1. Pure numpy."""

from __future__ import annotations

import numpy as np

MEDSIGLIP_SIZE = 448


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres and no antialiasing (the behaviour of
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False)`` and of
    ``tf.image.resize(method="bilinear", antialias=False)``). (H, W[, C]) in, float32 (height, width[, C]) out."""
    values = np.asarray(image, dtype=np.float32)
    rows, row_weights = _taps(values.shape[0], height)
    cols, col_weights = _taps(values.shape[1], width)
    shape = (-1,) + (1,) * (values.ndim - 1)
    top, bottom = values[rows[0]], values[rows[1]]
    w = row_weights.reshape(shape)
    vertical = top + (bottom - top) * w
    left, right = vertical[:, cols[0]], vertical[:, cols[1]]
    w = col_weights.reshape((1, -1) + (1,) * (values.ndim - 2))
    return (left + (right - left) * w).astype(np.float32)


def _taps(size_in: int, size_out: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """Source indices (lower, upper) and the weight of the upper one, per output position."""
    scale = size_in / size_out
    source = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    lower = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
    upper = np.minimum(lower + 1, size_in - 1)
    return (lower, upper), (source - lower).astype(np.float32)


def medsiglip_pixels(image: np.ndarray, size: int = MEDSIGLIP_SIZE) -> np.ndarray:
    """An RGB uint8 image (H, W, 3) -> float32 (3, size, size) in [-1, 1], ready for MedSigLIP's vision tower."""
    rgb = np.asarray(image)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=-1)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    resized = resize_bilinear(rgb, size, size)
    return np.transpose(resized / np.float32(127.5) - np.float32(1.0), (2, 0, 1)).astype(np.float32)
