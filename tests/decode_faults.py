"""A faulty pixel decoder for the decode-pool tests: registered for one transfer syntax in
``medlens.io.dicom_pixels.PIXEL_DECODERS``, it misbehaves on files whose name says how, and decodes the others
with pydicom. It runs in the worker processes (imported there by name)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from medlens.io.dicom_pixels import FrameTask, pydicom_frames


class FakePanic(BaseException):
    """What a Rust decoder's panic looks like from Python."""


def faulty(task: FrameTask) -> list[np.ndarray]:
    name = Path(task.path).name
    if "abort" in name:
        os.abort()
    if "hang" in name:
        time.sleep(3600)
    if "oom" in name:
        hog = []
        while True:  # until the worker's address-space limit stops it
            hog.append(np.empty(32 * 2**20, np.uint8))  # address space, not pages: fast
    if "raise" in name:
        raise RuntimeError("the test decoder gave up\non two lines")
    if "panic" in name:
        raise FakePanic("called `Option::unwrap()` on a `None` value")
    return pydicom_frames(task)
