"""Ordinary image files (PNG, JPEG, BMP) through Pillow: grey or RGB, 8 or 16 bit."""

from __future__ import annotations

import numpy as np

from medlens.errors import CorruptFileError
from medlens.io.discover import FoundFile
from medlens.io.limits import check_decoded_size, check_image_size
from medlens.io.types import ImageStack, SliceRef


def read_raster(found: FoundFile, modality: str | None = None) -> ImageStack:
    """One image; grey images stay single-channel (float32) so the radiograph recipe can scale them."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(found.path) as img:
            width, height = img.size
            check_image_size(height, width, found.display)
            check_decoded_size(width * height * 4, found.display)
            mode = img.mode
            if mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA", "PA"):
                array = np.asarray(img.convert("RGB"), dtype=np.uint8)[None]
                color = True
            else:  # L, I;16, I, F, 1
                array = np.asarray(img, dtype=np.float32)[None]
                color = False
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise CorruptFileError(f"cannot read image ({exc})", found.display) from None
    return ImageStack(
        modality=modality or "OT",
        source=found.display,
        slices=[SliceRef(file=found.display)],
        loader=lambda idx: array[list(idx)],
        rows=height,
        columns=width,
        is_color=color,
        notes=[] if modality else ["image file without metadata: treated as a 2-D picture (set --modality)"],
    )
