"""Which inputs may carry text in their pixels: what must not go to a remote backend unless the user allows it.

Lab-report PDF pages are sent as page images, text and all. DICOM images follow the rule of ``medlens deid``
(:func:`medlens.io.deid.burned_in_reason`: BurnedInAnnotation YES, or absent for US, SC, XA, ES and secondary
captures). Only the images that are sent count: the series the task ran on when it is known, and of a
whole slide only its pyramid levels (labels and overviews are never read). Other images (PNG, JPEG) carry no
such flag and are not detected; pixels are never searched for text.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medlens.io.deid import burned_in_reason
from medlens.io.slide import WSI_SOP_CLASS
from medlens.privacy import short_hash

#: the header fields the rule reads
_TAGS = ["BurnedInAnnotation", "Modality", "SOPClassUID", "SeriesInstanceUID", "ImageType"]


def burned_in_inputs(paths: Sequence[str | Path], series: str | None = None) -> list[tuple[str, str]]:
    """``(input, reason)`` for each input whose images sent to the model may carry text; ``series``: the
    hashed SeriesInstanceUID of the series sent (an envelope's ``details.series``), to skip the others."""
    found = []
    for path in paths:
        reason = _reason(path, series)
        if reason:
            found.append((str(path), reason))
    return found


def _reason(path: str | Path, series: str | None) -> str | None:
    from medlens.io.dicomweb import header_datasets, is_dicomweb
    from medlens.io.pdf import is_pdf

    if is_dicomweb(path) and not Path(path).exists():
        return _first(header_datasets(path), series)
    p = Path(path)
    if p.is_file() and is_pdf(p):  # a lab report (also one in a DICOM wrapper)
        return "a PDF page, sent as an image with its text"
    return _first(_headers(p), series)


def _headers(path: Path) -> Iterable[Any]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    from medlens.io.discover import discover

    found = discover(path)
    try:
        for file in found.dicom:
            try:
                yield pydicom.dcmread(file.path, stop_before_pixels=True, specific_tags=_TAGS)
            except (InvalidDicomError, OSError, ValueError):
                continue  # unreadable files are not sent either (the reader skips them)
    finally:
        if found.tempdir is not None:
            found.tempdir.cleanup()


def _first(datasets: Iterable[Any], series: str | None) -> str | None:
    for ds in datasets:
        if series and short_hash(str(ds.get("SeriesInstanceUID", ""))) != series:
            continue
        if str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS:  # only the pyramid is sent
            kind = [str(v) for v in ds.get("ImageType", [])]
            if len(kind) < 3 or kind[2] != "VOLUME":
                continue
        reason = burned_in_reason(ds)
        if reason:
            return reason
    return None


__all__ = ["burned_in_inputs"]
