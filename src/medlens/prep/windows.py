"""Pure intensity transforms: HU windows, min-max scaling, DICOM VOI functions. Arrays in, arrays out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medlens.io.types import VOI, TableVOI, WindowVOI

#: MedGemma 1.5 CT windows in HU, in channel order R, G, B (technical report 2.3.1; official CT notebook)
MEDGEMMA_CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))
#: the HAI-DEF serving container's CT windows: centre/width 0/2048, 175/80, 40/80 as centre -/+ width // 2
#: (python/data_accessors/local_file_handlers/generic_dicom_handler.py); the green one is 135..215, not -135..215
HAI_DEF_CT_WINDOWS: tuple[tuple[float, float], ...] = ((-1024.0, 1024.0), (135.0, 215.0), (0.0, 80.0))


def window_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to [low, high], scale linearly to 0..255 and round to the nearest integer (half to even)."""
    out = np.clip(values, low, high).astype(np.float32, copy=False)
    out -= np.float32(low)
    out /= np.float32(high - low)
    out *= np.float32(255.0)
    return np.rint(out, out=out).astype(np.uint8)


def ct_to_rgb(
    hu: np.ndarray, windows: Sequence[tuple[float, float]] = MEDGEMMA_CT_WINDOWS, out: np.ndarray | None = None
) -> np.ndarray:
    """(..., H, W) Hounsfield units -> (..., H, W, 3) uint8, one window per channel.

    Works slice by slice in one float32 scratch buffer (same arithmetic as :func:`window_to_uint8`), so a
    whole volume costs no temporaries of its own size; ``out`` may be given to fill an existing array.
    """
    if out is None:
        out = np.empty((*hu.shape, len(windows)), np.uint8)
    if out.shape != (*hu.shape, len(windows)) or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous uint8 array of shape hu.shape + (channels,)")
    height, width = hu.shape[-2:]
    planes, targets = hu.reshape(-1, height, width), out.reshape(-1, height, width, len(windows))
    scratch = np.empty((height, width), np.float32)
    for plane, target in zip(planes, targets, strict=True):
        for channel, (low, high) in enumerate(windows):
            np.clip(plane, low, high, out=scratch, casting="unsafe")
            scratch -= np.float32(low)
            scratch /= np.float32(high - low)
            scratch *= np.float32(255.0)
            np.rint(scratch, out=scratch)
            target[..., channel] = scratch  # whole numbers in 0..255: the cast is exact
    return out


def interp_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """The HAI-DEF container's window arithmetic: clip to [low, high], ``np.interp`` onto 0..255 in float64,
    round half to even (``image_utils.window_accurate``)."""
    clipped = np.clip(values, low, high)
    return np.rint(np.interp(clipped, (low, high), (0.0, 255.0))).astype(np.uint8)


def minmax_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of [low, high] to 0..255 (all zeros when the range is empty)."""
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    return window_to_uint8(values, low, high)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    """Replicate a grey (..., H, W) uint8 image into R, G and B."""
    return np.repeat(gray[..., None], 3, axis=-1)


def apply_voi(values: np.ndarray, voi: VOI) -> np.ndarray:
    """DICOM VOI (PS3.3 C.11.2.1.2) to display values in [0, 1]."""
    x = values.astype(np.float64, copy=False)
    if isinstance(voi, TableVOI):
        table = voi.table.astype(np.float64)
        idx = np.clip(np.rint(x - voi.first_mapped), 0, len(table) - 1).astype(np.int64)
        low, high = float(table.min()), float(table.max())
        return (table[idx] - low) / (high - low) if high > low else np.zeros_like(x)
    return _window(x, voi)


def _window(x: np.ndarray, voi: WindowVOI) -> np.ndarray:
    c, w = voi.center, voi.width
    if voi.function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if voi.function == "LINEAR_EXACT":
        return np.clip((x - c) / w + 0.5, 0.0, 1.0)
    w = max(w, 1.0)  # LINEAR requires width >= 1
    if w == 1.0:
        return (x > c - 0.5).astype(np.float64)
    return np.clip((x - (c - 0.5)) / (w - 1.0) + 0.5, 0.0, 1.0)


def unit_to_uint8(unit: np.ndarray) -> np.ndarray:
    """[0, 1] -> 0..255 rounded."""
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
