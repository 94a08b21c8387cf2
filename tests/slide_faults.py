"""Slides for the worker-pool tests: pixels computed from coordinates, with decoder faults at chosen places.

Openers here are module-level functions (picklable), so worker processes can import and call them.
"""

from __future__ import annotations

import os
import time

import numpy as np

from medlens.io.slide import Slide, SlideLevel

#: level-0 size of the computed slide and its pyramid
WIDTH, HEIGHT = 8192, 6144
DOWNSAMPLES = (1.0, 4.0, 16.0)


def expected_region(x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
    """What :class:`ComputedSlide` returns: R and G encode the level-0 position, B the level."""
    ds = DOWNSAMPLES[level]
    xs = (x0 + np.arange(width) * ds).astype(np.int64)
    ys = (y0 + np.arange(height) * ds).astype(np.int64)
    out = np.empty((height, width, 3), np.uint8)
    out[..., 0] = (xs[None, :] // 64) % 256
    out[..., 1] = (ys[:, None] // 64) % 256
    out[..., 2] = level * 40
    return out


class ComputedSlide(Slide):
    """A slide whose pixels are a function of position; ``faults`` maps a level-0 (x0, y0) to what the
    "decoder" does when a read starts there: raise, crash (abort), hang, or exhaust memory."""

    backend = "computed"

    def __init__(self, path: str, faults: dict[tuple[int, int], str] | None = None):
        levels = [SlideLevel(round(WIDTH / d), round(HEIGHT / d), d) for d in DOWNSAMPLES]
        super().__init__(path, levels, mpp=0.25, objective_power=40.0)
        self.faults = faults or {}

    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        fault = self.faults.get((x0, y0))
        if fault == "raise":
            raise OSError("JPEG decoder: corrupt data in tile")
        if fault == "crash":
            os.abort()
        if fault == "hang":
            time.sleep(3600)
        if fault == "oom":
            blocks = []
            while True:  # until the worker's address-space limit stops it
                blocks.append(np.ones(2**27, np.uint8))
        return expected_region(x0, y0, level, width, height)


def open_computed(path: str, backend: str | None = None, files: tuple[str, ...] | None = None, **faults: str):
    """Opener for SlideSpec: ``functools.partial(open_computed, **{"1792_0": "crash"})`` puts a fault at
    level-0 (1792, 0)."""
    parsed = {tuple(int(v) for v in key.split("_")): kind for key, kind in faults.items()}
    return ComputedSlide(path, parsed)
