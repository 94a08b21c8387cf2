"""A study from disk to the images the model sees: read it (``medlens.io``), run the recipe, and write the
prepared images and their manifest for ``medlens prepare``."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

from medlens import DISCLAIMER, __version__
from medlens.errors import OutputFolderError, UnsupportedInputError
from medlens.files import write_json_atomic
from medlens.io import discover_input, open_input
from medlens.io.slide import find_slide
from medlens.prep.prepared import Prepared
from medlens.prep.recipes import DEFAULT_RECIPE, RECIPES, prepare
from medlens.prep.slide_recipe import SlideOptions
from medlens.progress import Reporter, Timer


def prepare_study(
    path: str | Path,
    recipe: str = DEFAULT_RECIPE,
    series: str | None = None,
    modality: str | None = None,
    reporter: Reporter | None = None,
    timer: Timer | None = None,
    slide: SlideOptions | None = None,
) -> Prepared:
    """Read ``path`` and turn it into the images the model sees. Whole-slide images (OpenSlide formats,
    DICOM WSI) go through the recipe's slide part with ``slide`` options."""
    spec = RECIPES.get(recipe)  # an unknown recipe fails before any file is read
    reporter = reporter or Reporter(False)
    timer = timer or Timer()
    with timer("read"):
        found = discover_input(path)
        slide_spec = find_slide(path, found)
    if slide_spec is not None:
        if spec.slide is None:
            raise UnsupportedInputError(f"recipe {recipe} has no whole-slide part", str(path))
        with timer("prepare"), reporter.stage(f"Reading slide patches ({recipe})") as update:
            return spec.slide(slide_spec, recipe, slide, update)
    with timer("read"), reporter.stage("Reading headers") as update:
        stack = open_input(path, series=series, modality=modality, progress=update, found=found)
    with timer("prepare"), reporter.stage(f"Preparing ({recipe})"):
        return prepare(stack, recipe)


#: written into every manifest so that a later prepare knows the folder is medlens's own
WRITTEN_BY = "medlens prepare"
MANIFEST = "manifest.json"
#: libdeflate level 1: the fastest level; PNG is lossless at every level
PNG_LEVEL = 1


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray) -> bytes:
    """An RGB uint8 (H, W, 3) array as PNG bytes: filter "none" on every row, the rows compressed by
    libdeflate (imagecodecs) at level 1. 3-4x faster than libpng or Pillow at their fastest settings (adaptive
    filtering dominates their time; docs/performance.md) and lossless: any PNG reader gives the array back."""
    import imagecodecs

    height, width, channels = image.shape
    rows = np.zeros((height, width * channels + 1), np.uint8)  # a leading 0 per row: filter type "none"
    rows[:, 1:] = image.reshape(height, -1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit truecolour, no interlace
    idat = imagecodecs.deflate_encode(rows, level=PNG_LEVEL)  # zlib stream, as IDAT wants it
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _earlier_prepare(folder: Path) -> bool:
    """True when every entry of ``folder`` is an earlier medlens prepare's: its manifest says medlens wrote
    it and every other file is one the manifest lists."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(manifest, dict) or not ("medlens_version" in manifest or manifest.get("written_by")):
        return False
    listed = {MANIFEST} | {v for v in manifest.values() if isinstance(v, str)}  # overview, summary ...
    texts = manifest.get("texts")
    listed |= {str(name) for name in texts} if isinstance(texts, list) else set()
    listed |= {str(i.get("file")) for i in manifest.get("images", []) if isinstance(i, dict)}
    return all(entry.name in listed and entry.is_file() for entry in folder.iterdir())


def _check_out_dir(out: Path, overwrite: bool) -> bool:
    """Whether ``out`` holds something to replace (an earlier prepare, allowed by ``overwrite``); raise when
    it may not be written."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputFolderError("exists and is not a folder", str(out))
    if not any(out.iterdir()):
        return False
    if not _earlier_prepare(out):
        raise OutputFolderError("holds files medlens did not write; choose an empty or new folder", str(out))
    if not overwrite:
        raise OutputFolderError("holds an earlier medlens prepare; pass --overwrite to replace it", str(out))
    return True


def write_prepared(
    prepared: Prepared, out_dir: str | Path, overwrite: bool = False, texts: dict[str, str] | None = None
) -> Path:
    """Write ``0001.png, 0002.png, ...`` (RGB, prompt order, before any resize) and ``manifest.json``; and
    ``overview.png`` when the recipe drew one (whole slides: thumbnail, tissue mask, chosen patches); and
    ``texts`` (file name -> text, e.g. a record's summary.txt), which the manifest lists under "texts".

    Everything is written into a temporary sibling folder first, then renamed into place: a new or empty
    ``out_dir`` is replaced; one holding an earlier medlens prepare only with ``overwrite`` (renamed aside,
    the new one renamed in, the old removed); one holding other files never. A crash on the way leaves the
    old folder as it was, so old images never sit beside a new manifest."""
    from concurrent.futures import ThreadPoolExecutor

    out = Path(out_dir).resolve()
    _check_out_dir(out, overwrite)  # fail before any work
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as exc:
        raise OutputFolderError(f"cannot write there ({exc.strerror or exc})", str(out)) from None
    names = [f"{i:04d}.png" for i in range(1, len(prepared.images) + 1)]

    def save(name: str, image: np.ndarray) -> None:
        (tmp / name).write_bytes(encode_png(np.ascontiguousarray(image)))

    try:
        os.chmod(tmp, 0o777 & ~_umask())
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:  # libdeflate releases the GIL
            list(pool.map(save, names, prepared.images))
        manifest = {
            **prepared.manifest(names),
            "medlens_version": __version__,
            "written_by": WRITTEN_BY,
            "disclaimer": DISCLAIMER,
        }
        if prepared.overview is not None:
            save("overview.png", prepared.overview)
            manifest["overview"] = "overview.png"
        for name, text in (texts or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        if texts:
            manifest["texts"] = sorted(texts)
        write_json_atomic(tmp / MANIFEST, manifest)
        _swap_in(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / MANIFEST


def _swap_in(tmp: Path, out: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``out``; an earlier prepare there is renamed aside first and removed after."""
    replace = _check_out_dir(out, overwrite)  # again: the folder may have changed while images were written
    if not replace:
        if out.exists():
            out.rmdir()  # empty
        os.rename(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    old.rmdir()
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        os.rename(old, out)  # put the earlier prepare back
        raise
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
