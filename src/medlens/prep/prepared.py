"""What a recipe returns: the images in prompt order, where each came from, and what the user should know."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medlens.io.types import SliceRef


@dataclass
class Prepared:
    """The images in prompt order, where each came from, and what the user should know."""

    recipe: str
    modality: str
    family: str
    images: list[np.ndarray]
    slices: list[SliceRef]
    source: str
    series_uid: str | None
    n_source_slices: int
    warnings: list[str] = field(default_factory=list)
    acquired: str | None = None  # when the study was made (YYYYMMDDHHMMSS), from the DICOM header
    #: patient (hashed), body part, view, laterality from the DICOM header; empty for NIfTI/PNG
    identity: dict[str, str] = field(default_factory=dict)
    #: per-image manifest entries when the images are not slices (whole-slide patches), prompt order
    image_meta: list[dict[str, Any]] | None = None
    #: recipe facts for the manifest and the prompt (whole slides: magnification, level, tissue ...)
    meta: dict[str, Any] = field(default_factory=dict)
    #: a picture of what was chosen (whole slides: thumbnail, tissue mask, patch outlines), RGB uint8
    overview: np.ndarray | None = None

    @property
    def is_volume(self) -> bool:
        return len(self.images) > 1 and self.family in ("ct", "mr")

    def manifest(self, files: list[str]) -> dict[str, Any]:
        """The ``manifest.json`` of ``medlens prepare`` (image files given in prompt order)."""
        if self.image_meta is not None:
            return {
                "recipe": self.recipe,
                "modality": self.modality,
                "family": self.family,
                "source": self.source,
                **self.meta,
                "images": [{"file": f, **m} for f, m in zip(files, self.image_meta, strict=True)],
                "warnings": self.warnings,
            }
        return {
            "recipe": self.recipe,
            "modality": self.modality,
            "family": self.family,
            "series_uid": self.series_uid,
            "n_source_slices": self.n_source_slices,
            "images": [
                {"file": f, "source": s.file, "sop_instance_uid": s.sop_instance_uid, "frame": s.frame, "z": s.z}
                for f, s in zip(files, self.slices, strict=True)
            ],
            "warnings": self.warnings,
        }
