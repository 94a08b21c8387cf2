"""Document pages as images: PDF pages rendered with pypdfium2, or one page image (PNG/JPEG) read as is.

Checks happen before rendering: the ``%PDF-`` header and ``%%EOF`` trailer, the page count, and the decoded
size of every page (page size in points x dpi / 72) against the pixel budget of :mod:`medlens.io.limits`.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import numpy as np

from medlens.errors import CorruptFileError, MedlensError, NotFoundError, TooLargeError, UnsupportedInputError
from medlens.io.discover import kind_of
from medlens.io.limits import check_decoded_size, check_image_size

DEFAULT_DPI = 150
DEFAULT_MAX_PAGES = 20
#: the header may follow some junk bytes, the end-of-file marker may be followed by some (as readers allow)
_HEAD_BYTES = 1024
_TAIL_BYTES = 2048
#: PDFium's load error codes for a password or an unsupported security handler (the code can be stale, so
#: the file is also checked for an /Encrypt entry)
_ENCRYPTED_CODES = {4, 5}


def is_pdf(path: str | Path) -> bool:
    """True when the file starts (within its first kilobyte) with the ``%PDF-`` header."""
    with open(path, "rb") as fh:
        return b"%PDF-" in fh.read(_HEAD_BYTES)


def read_pages(path: str | Path, dpi: int = DEFAULT_DPI, max_pages: int = DEFAULT_MAX_PAGES) -> list[np.ndarray]:
    """The pages of a document as RGB uint8 (H, W, 3) arrays: a PDF rendered at ``dpi``, or one page image."""
    path = Path(path)
    _check_file(path)
    if is_pdf(path):
        return render_pdf(path, dpi, max_pages)
    if kind_of(path.name) == "raster":
        return [_page_image(path)]
    raise UnsupportedInputError("not a PDF (no %PDF- header) nor a page image (PNG/JPEG)", str(path))


def render_pdf(path: str | Path, dpi: int = DEFAULT_DPI, max_pages: int = DEFAULT_MAX_PAGES) -> list[np.ndarray]:
    """Render every page of a PDF as an RGB uint8 (H, W, 3) array, ``dpi`` pixels per inch.

    Raises CorruptFileError (empty, truncated, unreadable), UnsupportedInputError (not a PDF, encrypted) and
    TooLargeError (over ``max_pages`` pages, or pixels over the decoded-size budget), all naming the file.
    """
    if dpi <= 0:
        raise MedlensError(f"dpi must be positive, got {dpi}")
    path = Path(path)
    name = str(path)
    _check_envelope(path)
    pdfium = _pdfium()
    try:
        document = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as exc:
        if getattr(exc, "err_code", None) in _ENCRYPTED_CODES and _has_encrypt_entry(path):
            raise UnsupportedInputError("the PDF is encrypted (password protected); decrypt it first", name) from None
        raise CorruptFileError("PDFium cannot open the PDF (damaged, or it has no pages)", name) from None
    try:
        n_pages = len(document)
        if n_pages == 0:
            raise CorruptFileError("the PDF has no pages", name)
        if n_pages > max_pages:
            raise TooLargeError(f"the PDF has {n_pages} pages; at most {max_pages} are read (split it)", name)
        scale = dpi / 72
        pages: list[np.ndarray] = []
        total = 0
        for index in range(n_pages):
            try:
                width_pt, height_pt = document.get_page_size(index)
            except pdfium.PdfiumError as exc:
                raise CorruptFileError(f"cannot read page {index + 1} ({exc})", name) from None
            width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
            check_image_size(height, width, f"{name} (page {index + 1})")
            total += width * height * 3
            check_decoded_size(total, name, f"pages 1-{index + 1} at {dpi} dpi")
            pages.append(_render_page(document, index, scale, name))
        return pages
    finally:
        document.close()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise NotFoundError("no such file or folder", str(path))
    if not path.is_file():
        raise UnsupportedInputError("expected one PDF or page image (PNG/JPEG), not a folder", str(path))
    if path.stat().st_size == 0:
        raise CorruptFileError("empty file", str(path))


def _check_envelope(path: Path) -> None:
    """Header and trailer checks that PDFium does not make (it may silently recover a truncated file)."""
    _check_file(path)
    with open(path, "rb") as fh:
        head = fh.read(_HEAD_BYTES)
        size = fh.seek(0, 2)
        fh.seek(max(0, size - _TAIL_BYTES))
        tail = fh.read()
    if b"%PDF-" not in head:
        raise UnsupportedInputError("not a PDF (no %PDF- header)", str(path))
    if b"%%EOF" not in tail:
        raise CorruptFileError("truncated PDF (no %%EOF marker at the end)", str(path))


def _has_encrypt_entry(path: Path) -> bool:
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(b"/Encrypt") >= 0


def _render_page(document, index: int, scale: float, name: str) -> np.ndarray:
    pdfium = _pdfium()
    page = None
    bitmap = None
    try:
        page = document[index]
        bitmap = page.render(scale=scale, rev_byteorder=True)  # RGB on white
        array = np.array(bitmap.to_numpy(), dtype=np.uint8)  # copy out of PDFium's buffer
    except pdfium.PdfiumError as exc:
        raise CorruptFileError(f"cannot render page {index + 1} ({exc})", name) from None
    finally:
        if bitmap is not None:
            bitmap.close()
        if page is not None:
            page.close()
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def _page_image(path: Path) -> np.ndarray:
    """A page image through the ordinary image reader, as RGB uint8."""
    from medlens.io import open_input

    image = open_input(path).load([0])[0]
    if image.ndim == 3:
        return np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    peak = float(image.max()) if image.size else 0.0
    if peak > 255:  # 16-bit and other wide grey images
        image = image * (255.0 / peak)
    elif 0 < peak <= 1:  # bilevel (fax-like) scans come as 0/1
        image = image * 255.0
    grey = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _pdfium():
    import pypdfium2  # lazily: only PDF inputs need it

    return pypdfium2
