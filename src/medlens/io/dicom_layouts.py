"""Multi-frame layouts that are not slices of a volume, recognised from the header (docs/recipe.md, Reading).

* Siemens MOSAIC (ImageType contains MOSAIC): one stored image holding a grid of tiles, one slice each; the
  number of slices is the CSA image header's NumberOfImagesInMosaic. Untiled into its slices in tile order.
* Cine clips (ultrasound multi-frame, or frames timed by FrameTime/FrameTimeVector/CineRate) and multi-frame
  secondary captures, without per-frame positions: frames in time, not slices; refused as a volume.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from medlens.io.dicom_values import text

#: Secondary Capture Image Storage; the multi-frame SC classes extend it (…1.7.1 to …1.7.4)
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: FrameTime (0018,1063) and FrameTimeVector (0018,1065): a FrameIncrementPointer to these means time
_TIME_POINTERS = {0x00181063, 0x00181065}
_CSA_IMAGE_HEADER = (0x0029, 0x10)  # (0029,xx10) in the "SIEMENS CSA HEADER" private block


@dataclass(frozen=True)
class Mosaic:
    """A Siemens MOSAIC: ``count`` slices in a ``grid`` x ``grid`` tiling, row-major, the first ``count`` used."""

    count: int
    grid: int
    tile_rows: int
    tile_columns: int

    def tile(self, image: np.ndarray, index: int) -> np.ndarray:
        """Slice ``index`` (0-based, tile order) of the stored mosaic ``image`` (H, W) or (H, W, 3)."""
        r, c = divmod(index, self.grid)
        return image[r * self.tile_rows : (r + 1) * self.tile_rows, c * self.tile_columns : (c + 1) * self.tile_columns]


def is_mosaic(ds: Any) -> bool:
    value = ds.get("ImageType") or []
    return "MOSAIC" in [str(v).strip().upper() for v in ([value] if isinstance(value, str) else value)]


def mosaic_layout(ds: Any, rows: int, columns: int) -> tuple[Mosaic | None, str | None]:
    """(the mosaic's tiling, None), or (None, why it cannot be untiled) for a MOSAIC image."""
    count = _csa_mosaic_count(ds)
    if count is None:
        return None, "a Siemens MOSAIC without NumberOfImagesInMosaic in its CSA header (0029,1010): cannot untile it"
    grid = math.ceil(math.sqrt(count))
    if count < 1 or rows % grid or columns % grid:
        return None, f"a Siemens MOSAIC of {count} images that does not tile {columns}x{rows} in a {grid}x{grid} grid"
    return Mosaic(count, grid, rows // grid, columns // grid), None


def not_a_volume(ds: Any, modality: str, n_frames: int, positioned: bool) -> str | None:
    """Why a multi-frame object's frames are not slices of a volume (a cine clip, a secondary capture), or None."""
    if n_frames < 2 or positioned:
        return None
    timed = any(k in ds for k in ("FrameTime", "FrameTimeVector", "CineRate")) or bool(
        _TIME_POINTERS & set(_pointers(ds))
    )
    if modality == "US" or timed:
        kind = "ultrasound" if modality == "US" else modality
        return f"a {n_frames}-frame {kind} cine clip, not slices of a volume{_ADVICE}"
    sop = text(ds, "SOPClassUID")
    if sop == _SECONDARY_CAPTURE or sop.startswith(_SECONDARY_CAPTURE + "."):
        return f"a {n_frames}-frame secondary capture without slice positions, not slices of a volume{_ADVICE}"
    return None


#: what the user can do instead, said in every not-a-volume refusal
_ADVICE = " (medlens reads multi-frame objects only as volumes: export one frame as an image to ask about it)"


def _pointers(ds: Any) -> list[int]:
    value = ds.get("FrameIncrementPointer")
    try:
        return [] if value is None else [int(value)] if isinstance(value, int) else [int(v) for v in value]
    except (TypeError, ValueError):  # a damaged value points nowhere
        return []


def _csa_mosaic_count(ds: Any) -> int | None:
    """NumberOfImagesInMosaic from the CSA image header, parsed by nibabel; None when absent or unreadable."""
    try:
        block = ds.private_block(_CSA_IMAGE_HEADER[0], "SIEMENS CSA HEADER")
        raw = block[_CSA_IMAGE_HEADER[1]].value
    except (KeyError, ValueError):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nibabel warns that its DICOM readers are experimental
            from nibabel.nicom import csareader

            value = csareader.get_n_mosaic(csareader.read(bytes(raw)))
    except Exception:  # any damage in the private header means the count is unknown
        return None
    return int(value) if isinstance(value, (int, float, np.integer, np.floating)) and value >= 1 else None
