"""What the readers hand to the preparation recipes: an ordered stack of 2-D images plus metadata."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class WindowVOI:
    """A DICOM VOI window (C.11.2.1.2): centre/width and function LINEAR, LINEAR_EXACT or SIGMOID."""

    center: float
    width: float
    function: str = "LINEAR"


@dataclass(frozen=True)
class TableVOI:
    """A DICOM VOI LUT: input values from ``first_mapped`` on index into ``table``."""

    first_mapped: int
    table: np.ndarray = field(compare=False)


VOI = WindowVOI | TableVOI


@dataclass(frozen=True)
class SliceRef:
    """Where one 2-D image of a stack comes from (for the manifest) and how to display it."""

    file: str
    sop_instance_uid: str | None = None
    frame: int | None = None  # 0-based frame index in a multi-frame object, else None
    z: float | None = None  # position along the slice normal in mm, None when unknown or 2-D
    voi: VOI | None = None
    invert: bool = False  # MONOCHROME1 or an INVERSE presentation LUT: high values are dark
    instance_number: int | None = None  # the DICOM InstanceNumber, for recipes that order by it


Loader = Callable[[Sequence[int]], np.ndarray]


@dataclass
class ImageStack:
    """An ordered stack of 2-D images (a volume in geometric order, or a single image).

    ``load(indices)`` decodes only the requested slices and returns float32 (k, H, W) modality values
    (HU for CT, after rescale slope/intercept) or uint8 (k, H, W, 3) for colour images.
    """

    modality: str
    source: str
    slices: list[SliceRef]
    loader: Loader
    rows: int
    columns: int
    is_color: bool = False
    series_uid: str | None = None
    study_uid: str | None = None
    description: str | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_spacing: float | None = None
    orientation: tuple[float, ...] | None = None
    acquired: str | None = None  # YYYYMMDDHHMMSS digits (DICOM), None when unknown
    #: comparability fields from the header (io/dicom_identity.py): patient/issuer hashed; empty when unknown
    identity: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: keeps temporary files (an unpacked zip) alive as long as the stack can still load slices
    keepalive: object = field(default=None, repr=False)
    #: optional: start getting these slices (a DICOMweb stack retrieves them all at once, in parallel); ``load``
    #: still returns them. Recipes call it with every index they will load, before loading.
    prefetch: Callable[[Sequence[int]], None] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.slices)

    def load(self, indices: Sequence[int]) -> np.ndarray:
        """Decode the slices at ``indices`` (in the given order)."""
        return self.loader(list(indices))
