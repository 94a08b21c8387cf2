"""Test-only writers of synthetic whole-slide images with known geometry (no downloaded data, no patient data).

Three containers, one content model:

- :func:`write_svs`: an Aperio SVS (OpenSlide vendor ``aperio``, tiffslide vendor ``aperio``), with
  thumbnail, label and macro pages; mpp and objective power in the Aperio ImageDescription.
- :func:`write_generic_tiff`: a plain tiled pyramidal TIFF (OpenSlide ``generic-tiff``), mpp only in the
  XResolution / YResolution tags (centimetre unit).
- :func:`write_dicom_wsi`: a DICOM VL Whole Slide Microscopy Image series (one file per level, TILED_FULL,
  JPEG baseline YBR_FULL_422 frames) plus a LABEL instance, readable with ``wsidicom.WsiDicom.open``.

The pixels of every level come from :func:`slide_pixels`, an exact area average of one analytic level-0 image
(glass + H&E-like tissue rectangles), computed per tile: no builder ever holds a whole level in memory, so
levels agree with each other up to JPEG error and big bench slides stay cheap
(``write_svs(width=40960, height=30720)``: ~20 s, 230 MB on 2 cores).

Label and macro images show the fake patient :data:`FAKE_PATIENT_NAME` / :data:`FAKE_PATIENT_ID`, and the DICOM
files carry them as PatientName / PatientID, so tests can prove that none of it is passed on.

Reader quirks found while writing these (OpenSlide 4.0.1, tiffslide 3.0.1 on tifffile 2026.3, wsidicom 0.36.1):

- After a failed tile decode an ``openslide.OpenSlide`` handle is in a sticky error state: every later call
  (any region, any level, ``get_thumbnail``) raises ``OpenSlideError`` with the first error message. Recover
  by reopening the slide. tiffslide raises ``imagecodecs.Jpeg8Error`` (a ``RuntimeError``) for that tile
  only and keeps working.
- OpenSlide ``generic-tiff`` reports ``openslide.mpp-x`` / ``-y`` from the resolution tags only when
  ResolutionUnit is centimetre or inch (centimetre here); tiffslide derives its mpp from the same tags (and
  also from millimetre). Neither has an objective power for a plain TIFF; tiffslide's vendor is ``None``.
- tiffslide sees the lower levels of a plain TIFF only when tifffile "pyramidizes" the pages: they must be
  marked reduced-resolution and each be 2, 3 or 4 times smaller than the previous one, with one factor for
  the whole pyramid. Downsamples (1, 8, 32) give OpenSlide three levels and tiffslide one.
- tifffile (hence tiffslide) takes page 1 of an SVS as the thumbnail whatever it is, so an SVS must have a
  stripped thumbnail page between level 0 and the other levels; OpenSlide names the stripped pages after page
  1 by the first word of the second line of their ImageDescription (``label``, ``macro``).
- wsidicom numbers levels by log2 of the downsample (``wsi.levels[i].level`` is 0, 2, 4 for 1, 4, 16) and
  ``read_region`` takes the location in that level's pixels; OpenSlide takes level indices and level-0
  locations.
- OpenSlide 4 opens the DICOM series too (vendor ``dicom``, from any one file of the folder; the label becomes
  the associated image ``label``) and passes patient attributes on as properties (``dicom.PatientName``,
  ``dicom.PatientID``, ...).
"""

from __future__ import annotations

import functools
import itertools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import imagecodecs
import numpy as np
import tifffile
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

Rect = tuple[int, int, int, int]

#: Level-0 size of the default slides.
DEFAULT_WIDTH = 8192
DEFAULT_HEIGHT = 6144
#: Tissue rectangles (x0, y0, x1, y1) on the default 8192x6144 level 0: three blocks of different sizes, not
#: aligned to tiles; the third touches the right edge. About 42 % of the slide is tissue.
DEFAULT_TISSUE: tuple[Rect, ...] = (
    (600, 900, 3500, 4100),
    (4700, 700, 7300, 2500),
    (5300, 3300, 8192, 5800),
)
#: Fake patient shown on labels / macros and stored in the DICOM files.
FAKE_PATIENT_NAME = "DOE^JANE"
FAKE_PATIENT_ID = "TEST-123"

#: Mean colour of blank glass (RGB) and the noise amplitudes (level 0, uniform +-amp) of glass and tissue.
GLASS_RGB = (244.0, 243.0, 245.0)
_GLASS_NOISE = 3.0
_TISSUE_NOISE = 10.0
#: Tissue colours: eosin pink HSV(325 deg, 0.40, 0.80) mixed with hematoxylin purple HSV(305 deg, 0.55, 0.62).
_PINK = np.array([204.0, 122.4, 170.0])
_PURPLE = np.array([158.1, 71.1, 150.9])
#: Grey (luminance) modulation amplitude of tissue, in RGB units.
_SHADE = 14.0

_APERIO_HEADER = "Aperio Image Library v12.0.16"
_NOISE_SHAPE = (251, 257)  # primes: the periodic noise never lines up with 256-pixel tiles

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class SyntheticSlide:
    """What a builder wrote: the file (or DICOM folder), its geometry and where its metadata lives."""

    path: Path
    width: int
    height: int
    mpp: float | None
    objective_power: float | None
    downsamples: tuple[int, ...]
    tile: int
    tissue: tuple[Rect, ...]
    #: "aperio", "generic-tiff" or "dicom".
    format: str = "aperio"
    #: Where mpp is stored: "aperio-description", "tiff-resolution", "dicom-pixel-spacing" or "none".
    mpp_source: str = "none"
    seed: int = 0
    quality: int = 90
    #: Names of the associated images written ("label", "macro", "thumbnail").
    associated: tuple[str, ...] = ()
    #: The DICOM files (level files first, in level order, then the label), empty for TIFF.
    files: tuple[Path, ...] = ()

    @property
    def level_count(self) -> int:
        return len(self.downsamples)

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) per level: ceil(level-0 size / downsample)."""
        return tuple((-(-self.width // d), -(-self.height // d)) for d in self.downsamples)

    def pixels(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Expected RGB of a region; ``x, y, w, h`` in pixels of ``level``."""
        return slide_pixels(
            self.width, self.height, self.tissue, x, y, w, h, seed=self.seed, downsample=self.downsamples[level]
        )

    def is_tissue(self, x: float, y: float) -> bool:
        """Whether the level-0 point lies inside a tissue rectangle."""
        return any(x0 <= x < x1 and y0 <= y < y1 for x0, y0, x1, y1 in self.tissue)


# --------------------------------------------------------------------------------------------------------------
# Pixel content
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _texture(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Plane waves of the tissue texture and the noise table for ``seed``.

    Returns ``kx, ky`` (K,) angular frequencies, ``weights`` (K, 3) complex RGB weights such that tissue
    colour = Re(sum_k weights[k] * exp(i (kx x + ky y))) (term 0 is the constant mean colour), and a noise
    table in [-1, 1]."""
    rng = np.random.default_rng(seed)
    mix = _PURPLE - _PINK
    # (period in px, amplitude, colour direction): pink->purple mix waves (amplitudes sum to 0.45, so the
    # mix stays in [0.05, 0.95]), then grey shading waves; directions spread by the golden angle.
    periods = (13, 23, 37, 61, 97, 157, 263, 641)
    amps = (0.05, 0.07, 0.08, 0.07, 0.06, 0.05, 0.04, 0.03)
    waves = [(p, a, mix) for p, a in zip(periods, amps, strict=True)]
    waves += [(19, 0.6 * _SHADE, -np.ones(3)), (181, 0.4 * _SHADE, -np.ones(3))]
    kx, ky, weights = [0.0], [0.0], [(_PINK + 0.5 * mix).astype(np.complex128)]
    start = rng.uniform(0, np.pi)
    for i, (period, amp, direction) in enumerate(waves):
        theta, phase = start + i * np.pi * 0.618034, rng.uniform(0, 2 * np.pi)
        k = 2 * np.pi / period
        kx.append(k * np.cos(theta))
        ky.append(k * np.sin(theta))
        weights.append(amp * np.exp(1j * phase) * direction)
    noise = rng.uniform(-1.0, 1.0, _NOISE_SHAPE)
    return np.array(kx), np.array(ky), np.array(weights), noise


def _pixel_bounds(start: int, n: int, d: int, extent: int) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 interval [lo, hi) of level pixels ``start .. start+n-1`` at downsample ``d``, clipped to the
    slide (pixels wholly outside it, i.e. tile padding, keep their unclipped interval)."""
    lo = np.arange(start, start + n, dtype=np.float64) * d
    hi = lo + d
    clipped = np.minimum(hi, extent)
    return lo, np.where(clipped > lo, clipped, hi)


def _wave_integrals(k: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(K, n) integrals of exp(i k t) dt over [lo, hi] (exact, stable for k = 0 and short intervals)."""
    length = hi - lo
    return np.exp(1j * np.outer(k, (lo + hi) / 2)) * (length * np.sinc(np.outer(k, length) / (2 * np.pi)))


def _noise3(seed: int, x: int, y: int, w: int, h: int, d: int) -> np.ndarray:
    """(h, w*3) noise in [-1, 1] for level pixels [x, x+w) x [y, y+h) at downsample ``d``, each value repeated
    for the three channels (periodic, with a per-level phase)."""
    r0 = (y + 7919 * d) % _NOISE_SHAPE[0]
    c0 = (x + 104729 * d) % _NOISE_SHAPE[1]
    if r0 + h <= _NOISE_SHAPE[0] + 512 and c0 + w <= _NOISE_SHAPE[1] + 512:
        return _wrapped_noise3(seed)[r0 : r0 + h, 3 * c0 : 3 * (c0 + w)]
    rows = np.arange(r0, r0 + h) % _NOISE_SHAPE[0]
    cols = np.arange(c0, c0 + w) % _NOISE_SHAPE[1]
    return np.repeat(_texture(seed)[3][rows][:, cols], 3, axis=1)


@functools.lru_cache(maxsize=16)
def _wrapped_noise3(seed: int) -> np.ndarray:
    """The noise table, channel-repeated and tiled so that any window up to 512 pixels a side is a slice."""
    table = np.tile(_texture(seed)[3], (4, 4))[: _NOISE_SHAPE[0] + 512, : _NOISE_SHAPE[1] + 512]
    return np.repeat(table, 3, axis=1)


def _render(
    width: int, height: int, tissue: Sequence[Rect], x: int, y: int, w: int, h: int, d: int, seed: int
) -> np.ndarray:
    """Float RGB (h, w, 3) of level pixels at downsample ``d``: the exact box average of the level-0 image,
    plus noise whose amplitude shrinks as 1/d (as averaging d*d independent noises roughly would).

    Everything but the noise is a sum of separable terms (row factor x column-and-channel factor), so the
    whole region is one small matrix product: rows (h, terms) @ columns (terms, w*3)."""
    kx, ky, weights, _ = _texture(seed)
    xlo, xhi = _pixel_bounds(x, w, d, width)
    ylo, yhi = _pixel_bounds(y, h, d, height)
    xlen, ylen = xhi - xlo, yhi - ylo
    glass = np.asarray(GLASS_RGB)
    # Term 0: glass over the whole pixel box (row factor 1, column factor glass colour).
    rows: list[np.ndarray] = [np.ones((h, 1))]
    cols: list[np.ndarray] = [np.tile(glass, w)[None, :]]
    cover_rows: list[np.ndarray] = []
    cover_cols: list[np.ndarray] = []
    for rx0, ry0, rx1, ry1 in tissue:
        if rx0 >= xhi[-1] or rx1 <= xlo[0] or ry0 >= yhi[-1] or ry1 <= ylo[0]:
            continue
        cxlo, cxhi = np.clip(xlo, rx0, rx1), np.clip(xhi, rx0, rx1)
        cylo, cyhi = np.clip(ylo, ry0, ry1), np.clip(yhi, ry0, ry1)
        fy, fx = (cyhi - cylo) / ylen, np.repeat((cxhi - cxlo) / xlen, 3)  # covered fractions per axis
        cover_rows.append(fy[:, None])
        cover_cols.append(fx[None, :])
        # Tissue replaces glass on the covered part: - glass * coverage + mean of the texture over the box.
        iy = _wave_integrals(ky, cylo, cyhi) / ylen  # (K, h)
        ix = (_wave_integrals(kx, cxlo, cxhi) / xlen)[:, :, None] * weights[:, None, :]  # (K, w, 3)
        ix = ix.reshape(len(kx), w * 3)
        rows += [fy[:, None], iy.T.real, -iy.T.imag]
        cols += [-(fx * np.tile(glass, w))[None, :], ix.real, ix.imag]
    # float64 throughout: a pixel's value must not depend on the region it was computed in (BLAS blocking
    # changes float32 results by ~1e-4, enough to flip a rounding now and then).
    rgb = np.concatenate(rows, axis=1) @ np.concatenate(cols)
    noise = _noise3(seed, x, y, w, h, d)
    if cover_rows:
        amp = np.concatenate(cover_rows, axis=1) @ np.concatenate(cover_cols)
        amp *= (_TISSUE_NOISE - _GLASS_NOISE) / d
        amp += _GLASS_NOISE / d
        amp *= noise
        rgb += amp
    else:
        rgb += noise * (_GLASS_NOISE / d)
    return rgb.reshape(h, w, 3)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
    """uint8 of float RGB, rounded half up and clipped."""
    rgb += 0.5
    return np.clip(rgb, 0, 255, out=rgb).astype(np.uint8)


def slide_pixels(
    width: int,
    height: int,
    tissue: Sequence[Rect],
    x0: int = 0,
    y0: int = 0,
    w: int | None = None,
    h: int | None = None,
    seed: int = 0,
    *,
    downsample: int = 1,
) -> np.ndarray:
    """RGB uint8 (h, w, 3) content of a region of the synthetic slide, deterministic and computable per tile.

    Outside ``tissue`` (level-0 rectangles ``(x0, y0, x1, y1)``) near-white glass (about 241-247, grey),
    inside H&E-like texture: pink/purple (hue about 305-325 deg, saturation 0.37-0.6, value 0.55-0.86) made
    of plane waves (periods 13-641 px) plus noise. ``x0, y0, w, h`` are in pixels of the level at
    ``downsample`` (default level 0; ``w``/``h`` default to the rest of that level); a pixel at downsample
    ``d`` is the area average of the level-0 image over its ``d x d`` box, clipped to the slide.
    """
    if downsample < 1:
        raise ValueError("downsample must be >= 1")
    lw, lh = -(-width // downsample), -(-height // downsample)
    w = lw - x0 if w is None else w
    h = lh - y0 if h is None else h
    if w <= 0 or h <= 0:
        raise ValueError(f"empty region {w}x{h}")
    return _to_uint8(_render(width, height, tissue, x0, y0, w, h, downsample, seed))


def scaled_tissue(width: int, height: int, tissue: Sequence[Rect] = DEFAULT_TISSUE) -> tuple[Rect, ...]:
    """``tissue`` (given on the default 8192x6144 slide) scaled to a ``width`` x ``height`` slide."""
    sx, sy = width / DEFAULT_WIDTH, height / DEFAULT_HEIGHT
    return tuple(
        (round(x0 * sx), round(y0 * sy), min(round(x1 * sx), width), min(round(y1 * sy), height))
        for x0, y0, x1, y1 in tissue
    )


def _check_geometry(width: int, height: int, tissue: Sequence[Rect], downsamples: Sequence[int], tile: int) -> None:
    if width < 1 or height < 1:
        raise ValueError("slide must be at least 1x1")
    if tile < 16 or tile % 16:
        raise ValueError("tile side must be a positive multiple of 16")
    if not downsamples or downsamples[0] != 1 or any(b <= a for a, b in itertools.pairwise(downsamples)):
        raise ValueError(f"downsamples must start at 1 and increase, got {tuple(downsamples)}")
    for i, (x0, y0, x1, y1) in enumerate(tissue):
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"tissue rectangle {tissue[i]} is empty or outside the {width}x{height} slide")
        for a0, b0, a1, b1 in tissue[:i]:
            if x0 < a1 and a0 < x1 and y0 < b1 and b0 < y1:
                raise ValueError(f"tissue rectangles {(a0, b0, a1, b1)} and {tissue[i]} overlap")


# --------------------------------------------------------------------------------------------------------------
# Tiles, JPEG, associated images
# --------------------------------------------------------------------------------------------------------------


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, in order, with a bounded number of results in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _jpeg(rgb: np.ndarray, quality: int, subsampling: str) -> bytes:
    """Baseline JPEG of an RGB uint8 array, stored as YCbCr with the given chroma subsampling."""
    return imagecodecs.jpeg8_encode(
        rgb, level=quality, colorspace="RGB", outcolorspace="YCBCR", subsampling=subsampling
    )


def _level_tiles(
    width: int,
    height: int,
    tissue: Sequence[Rect],
    d: int,
    tile: int,
    seed: int,
    quality: int,
    subsampling: str,
    workers: int,
) -> Iterator[bytes]:
    """JPEG tiles of the level at downsample ``d``, row-major, edge tiles padded by edge replication."""
    lw, lh = -(-width // d), -(-height // d)
    origins = [(c * tile, r * tile) for r in range(-(-lh // tile)) for c in range(-(-lw // tile))]

    def encode(origin: tuple[int, int]) -> bytes:
        x, y = origin
        w, h = min(tile, lw - x), min(tile, lh - y)
        px = _to_uint8(_render(width, height, tissue, x, y, w, h, d, seed))
        if (w, h) != (tile, tile):
            px = np.pad(px, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
        return _jpeg(px, quality, subsampling)

    return _ordered_map(encode, origins, workers)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def label_image(width: int = 480, height: int = 400) -> np.ndarray:
    """A slide label (RGB uint8): white paper with the fake patient name and ID and a fake barcode."""
    img = Image.new("RGB", (width, height), (252, 252, 248))
    draw = ImageDraw.Draw(img)
    size = max(12, height // 8)
    draw.text((width // 12, height // 10), FAKE_PATIENT_NAME, fill=(0, 0, 0), font=_font(size))
    draw.text((width // 12, height // 10 + size * 3 // 2), FAKE_PATIENT_ID, fill=(0, 0, 0), font=_font(size))
    rng = np.random.default_rng(99)
    x, top = width // 12, height // 2 + height // 10
    while x < width - width // 12:
        bar = int(rng.integers(1, 5))
        draw.rectangle((x, top, x + bar - 1, height - height // 10), fill=(0, 0, 0))
        x += bar + int(rng.integers(1, 4))
    return np.asarray(img)


def _thumbnail(width: int, height: int, tissue: Sequence[Rect], seed: int, longest: int) -> np.ndarray:
    d = max(1, -(-max(width, height) // longest))
    return slide_pixels(width, height, tissue, seed=seed, downsample=d)


def macro_image(width: int, height: int, tissue: Sequence[Rect], seed: int = 0) -> np.ndarray:
    """A macro (overview) photo: the label (with the fake name) on the left of a thumbnail of the slide."""
    thumb = _thumbnail(width, height, tissue, seed, 640)
    th, tw = thumb.shape[:2]
    label = np.asarray(Image.fromarray(label_image()).resize((th * 6 // 5, th)))
    canvas = np.full((th + 32, label.shape[1] + tw + 48, 3), 40, np.uint8)  # dark scanner background
    canvas[16 : 16 + th, 16 : 16 + label.shape[1]] = label
    canvas[16 : 16 + th, 32 + label.shape[1] : 32 + label.shape[1] + tw] = thumb
    return canvas


# --------------------------------------------------------------------------------------------------------------
# TIFF writers
# --------------------------------------------------------------------------------------------------------------


def _write_tiled(
    tw: tifffile.TiffWriter,
    tiles: Iterator[bytes],
    size: tuple[int, int],
    tile: int,
    quality: int,
    **kwargs: Any,
) -> None:
    """One tiled JPEG (YCbCr 4:2:0) page from pre-encoded tiles."""
    tw.write(
        tiles,
        shape=(size[1], size[0], 3),
        dtype=np.uint8,
        photometric="rgb",
        tile=(tile, tile),
        compression="jpeg",
        compressionargs={"level": quality},
        subsampling=(2, 2),
        metadata=None,
        software=False,
        **kwargs,
    )


def _write_stripped(tw: tifffile.TiffWriter, rgb: np.ndarray, compression: str, **kwargs: Any) -> None:
    jpeg = compression == "jpeg"
    tw.write(
        rgb,
        photometric="rgb",
        compression=compression,
        compressionargs={"level": 90} if jpeg else None,
        subsampling=(2, 2) if jpeg else None,
        rowsperstrip=16 if jpeg else None,
        metadata=None,
        software=False,
        **kwargs,
    )


def _bigtiff(width: int, height: int) -> bool:
    return width * height * 3 > 2**31  # JPEG output is far smaller, but be safe beyond 2 GiB raw


def write_svs(
    path: str | os.PathLike,
    *,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    mpp: float | None = 0.25,
    objective_power: float | None = 40,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    tissue: Sequence[Rect] | None = None,
    quality: int = 90,
    label: bool = True,
    macro: bool = True,
    seed: int = 0,
    workers: int = 1,
) -> SyntheticSlide:
    """An Aperio SVS: level 0 (tiled, with the Aperio ImageDescription holding ``AppMag`` and ``MPP``), a
    stripped thumbnail, the other levels (tiled), then the label (LZW) and macro (JPEG) pages.

    ``tissue`` defaults to :data:`DEFAULT_TISSUE` scaled to the slide. Tiles are JPEG (YCbCr 4:2:0), made and
    encoded one at a time (``workers`` > 1 spreads that over threads; on 2 cores it does not pay). The default
    slide (8192x6144, 3 levels, 10 MB) takes about 0.8 s on 2 CPU cores here.
    """
    path = Path(path)
    tissue = tuple(scaled_tissue(width, height) if tissue is None else tissue)
    downsamples = tuple(int(d) for d in downsamples)
    _check_geometry(width, height, tissue, downsamples, tile)
    props = ""
    if objective_power is not None:
        props += f"|AppMag = {objective_power:g}"
    props += "|StripeWidth = 2048|ScanScope ID = SYNTHETIC|Filename = synthetic|Date = 01/01/24|Time = 12:00:00"
    if mpp is not None:
        props += f"|MPP = {mpp:.4f}"
    props += f"|Left = 20.0000|Top = 20.0000|OriginalWidth = {width}|OriginalHeight = {height}"
    head = f"{_APERIO_HEADER} \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile})"
    slide = SyntheticSlide(
        path=path,
        width=width,
        height=height,
        mpp=mpp,
        objective_power=objective_power,
        downsamples=downsamples,
        tile=tile,
        tissue=tissue,
        format="aperio",
        mpp_source="aperio-description" if mpp is not None else "none",
        seed=seed,
        quality=quality,
        associated=("thumbnail",) + ("label",) * label + ("macro",) * macro,
    )
    with tifffile.TiffWriter(path, bigtiff=_bigtiff(width, height)) as tw:
        for level, (d, size) in enumerate(zip(downsamples, slide.level_dimensions, strict=True)):
            tiles = _level_tiles(width, height, tissue, d, tile, seed, quality, "420", workers)
            shrink = "" if d == 1 else f" -> {size[0]}x{size[1]}"
            desc = f"{head}{shrink} JPEG/RGB Q={quality}{props}"
            _write_tiled(tw, tiles, size, tile, quality, description=desc)
            if level == 0:
                thumb = _thumbnail(width, height, tissue, seed, 1024)
                tdesc = f"{_APERIO_HEADER} \r\n{width}x{height} -> {thumb.shape[1]}x{thumb.shape[0]} - {props}"
                _write_stripped(tw, thumb, "jpeg", description=tdesc)
        if label:
            lab = label_image()
            desc = f"{_APERIO_HEADER}\nlabel {lab.shape[1]}x{lab.shape[0]}"
            _write_stripped(tw, lab, "lzw", description=desc, subfiletype=1)
        if macro:
            mac = macro_image(width, height, tissue, seed)
            desc = f"{_APERIO_HEADER}\nmacro {mac.shape[1]}x{mac.shape[0]}"
            _write_stripped(tw, mac, "jpeg", description=desc, subfiletype=9)
    return slide


def write_generic_tiff(
    path: str | os.PathLike,
    *,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    mpp: float | None = 0.25,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    tissue: Sequence[Rect] | None = None,
    quality: int = 90,
    seed: int = 0,
    workers: int = 1,
) -> SyntheticSlide:
    """A plain tiled pyramidal TIFF: one tiled JPEG page per level (lower levels marked reduced-resolution),
    no ImageDescription, no associated images. ``mpp`` goes into XResolution/YResolution (pixels per
    centimetre, scaled per level); ``mpp=None`` leaves the resolution tags out. There is no place for an
    objective power, so the result has ``objective_power=None``. tiffslide needs one factor of 2, 3 or 4
    between successive levels to see them (module docstring). Default slide: about 0.8 s, 10 MB."""
    path = Path(path)
    tissue = tuple(scaled_tissue(width, height) if tissue is None else tissue)
    downsamples = tuple(int(d) for d in downsamples)
    _check_geometry(width, height, tissue, downsamples, tile)
    slide = SyntheticSlide(
        path=path,
        width=width,
        height=height,
        mpp=mpp,
        objective_power=None,
        downsamples=downsamples,
        tile=tile,
        tissue=tissue,
        format="generic-tiff",
        mpp_source="tiff-resolution" if mpp is not None else "none",
        seed=seed,
        quality=quality,
    )
    with tifffile.TiffWriter(path, bigtiff=_bigtiff(width, height)) as tw:
        for d, size in zip(downsamples, slide.level_dimensions, strict=True):
            tiles = _level_tiles(width, height, tissue, d, tile, seed, quality, "420", workers)
            extra: dict[str, Any] = {"subfiletype": 0 if d == 1 else 1}
            if mpp is not None:
                per_cm = 10000.0 / (mpp * d)
                extra.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
            _write_tiled(tw, tiles, size, tile, quality, **extra)
    return slide


def corrupt_tile(path: str | os.PathLike, level: int = 0, tile_xy: tuple[int, int] = (0, 0)) -> None:
    """Overwrite the compressed bytes of one tile (``tile_xy`` = (column, row)) of a pyramid level in a TIFF/SVS
    with garbage of the same length, so that tile no longer decodes and everything else still does.

    Levels are the tiled pages in file order (the SVS thumbnail, label and macro are stripped, so skipped)."""
    path = Path(path)
    with tifffile.TiffFile(path) as tf:
        pages = [p for p in tf.pages if p.is_tiled]
        page = pages[level]
        across = -(-page.imagewidth // page.tilewidth)
        down = -(-page.imagelength // page.tilelength)
        col, row = tile_xy
        if not (0 <= col < across and 0 <= row < down):
            raise IndexError(f"tile {tile_xy} outside the {across}x{down} tiles of level {level}")
        index = row * across + col
        offset, count = page.dataoffsets[index], page.databytecounts[index]
    garbage = bytearray(np.random.default_rng(index).integers(0, 256, count, dtype=np.uint8).tobytes())
    garbage[:2] = b"\x00\x00"  # no JPEG SOI marker: libjpeg and imagecodecs both refuse it
    with path.open("r+b") as fh:
        fh.seek(offset)
        fh.write(garbage)


# --------------------------------------------------------------------------------------------------------------
# DICOM WSI writer
# --------------------------------------------------------------------------------------------------------------


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _seq(*items: Dataset) -> DicomSequence:
    return DicomSequence(list(items))


def _item(**values: Any) -> Dataset:
    ds = Dataset()
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


def _wsi_dataset(uids: dict[str, str], transfer_syntax: str, instance_number: int) -> Dataset:
    """Patient / study / series / equipment / slide-specimen attributes shared by every instance."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.SOPClassUID = VLWholeSlideMicroscopyImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20240101120000"
    ds.AccessionNumber = "ACC-0001"
    ds.Modality = "SM"
    ds.Manufacturer = "medlens test factory"
    ds.ManufacturerModelName = "synthetic"
    ds.DeviceSerialNumber = "0"
    ds.SoftwareVersions = "1"
    ds.ReferringPhysicianName = ""
    ds.PatientName = FAKE_PATIENT_NAME
    ds.PatientID = FAKE_PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids["series"]
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.ContainerIdentifier = "SLIDE-0001"
    ds.IssuerOfTheContainerIdentifierSequence = _seq()
    ds.ContainerTypeCodeSequence = _seq(_code("433466003", "SCT", "Microscope slide"))
    ds.SpecimenDescriptionSequence = _seq(
        _item(
            SpecimenIdentifier="SPECIMEN-0001",
            SpecimenUID=uids["specimen"],
            IssuerOfTheSpecimenIdentifierSequence=_seq(),
            SpecimenPreparationSequence=_seq(),
        )
    )
    ds.OpticalPathSequence = _seq(
        _item(
            OpticalPathIdentifier="0",
            IlluminationTypeCodeSequence=_seq(_code("111744", "DCM", "Brightfield illumination")),
            IlluminationColorCodeSequence=_seq(_code("414298005", "SCT", "Full Spectrum")),
        )
    )
    ds.NumberOfOpticalPaths = 1
    ds.VolumetricProperties = "VOLUME"
    ds.FocusMethod = "AUTO"
    ds.ExtendedDepthOfField = "NO"
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    ds.TotalPixelMatrixOriginSequence = _seq(
        _item(XOffsetInSlideCoordinateSystem=20.0, YOffsetInSlideCoordinateSystem=40.0)
    )
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.DimensionOrganizationSequence = _seq(_item(DimensionOrganizationUID=uids["dimension"]))
    return ds


def _set_matrix(ds: Dataset, image_type: list[str], size: tuple[int, int], tile: tuple[int, int], frames: int) -> None:
    ds.ImageType = image_type
    ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = size
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfFocalPlanes = 1
    ds.Columns, ds.Rows = tile
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0


def _shared_groups(image_type: list[str], spacing_mm: float | None) -> DicomSequence:
    group = _item(
        WholeSlideMicroscopyImageFrameTypeSequence=_seq(_item(FrameType=image_type)),
        OpticalPathIdentificationSequence=_seq(_item(OpticalPathIdentifier="0")),
    )
    if spacing_mm is not None:
        group.PixelMeasuresSequence = _seq(
            _item(PixelSpacing=[spacing_mm, spacing_mm], SliceThickness=0.001, SpacingBetweenSlices=0.0)
        )
    return _seq(group)


def write_dicom_wsi(
    folder: str | os.PathLike,
    *,
    width: int = DEFAULT_WIDTH,
    height: int = DEFAULT_HEIGHT,
    mpp: float = 0.25,
    objective_power: float | None = 40,
    downsamples: Sequence[int] = (1, 4, 16),
    tile: int = 256,
    tissue: Sequence[Rect] | None = None,
    quality: int = 90,
    label: bool = True,
    seed: int = 0,
    workers: int = 1,
) -> SyntheticSlide:
    """A DICOM VL Whole Slide Microscopy series in ``folder`` (created): ``level-<i>.dcm`` per pyramid level and
    ``label.dcm``.

    Levels: TILED_FULL, JPEG baseline frames (YCbCr 4:2:2, PhotometricInterpretation YBR_FULL_422, encapsulated
    with a basic offset table), PixelSpacing (mm) in the shared functional groups, ImageType
    ORIGINAL\\PRIMARY\\VOLUME\\NONE at level 0 and DERIVED\\PRIMARY\\VOLUME\\RESAMPLED below. The label:
    ORIGINAL\\PRIMARY\\LABEL\\NONE, one uncompressed RGB frame of :func:`label_image` (with the fake name).
    All instances share study, series, frame of reference, container and specimen, and carry
    PatientName ``DOE^JANE`` / PatientID ``TEST-123``. Default slide: about 0.8 s, 10 MB."""
    folder = Path(folder)
    tissue = tuple(scaled_tissue(width, height) if tissue is None else tissue)
    downsamples = tuple(int(d) for d in downsamples)
    _check_geometry(width, height, tissue, downsamples, tile)
    folder.mkdir(parents=True, exist_ok=True)
    keys = ("study", "series", "frame", "specimen", "dimension")
    uids = {key: generate_uid() for key in keys}
    files: list[Path] = []
    slide = SyntheticSlide(
        path=folder,
        width=width,
        height=height,
        mpp=mpp,
        objective_power=objective_power,
        downsamples=downsamples,
        tile=tile,
        tissue=tissue,
        format="dicom",
        mpp_source="dicom-pixel-spacing",
        seed=seed,
        quality=quality,
    )
    for level, (d, size) in enumerate(zip(downsamples, slide.level_dimensions, strict=True)):
        frames = list(_level_tiles(width, height, tissue, d, tile, seed, quality, "422", workers))
        ds = _wsi_dataset(uids, JPEGBaseline8Bit, level + 1)
        image_type = (
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if d == 1 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        )
        _set_matrix(ds, image_type, size, (tile, tile), len(frames))
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = round(len(frames) * tile * tile * 3 / sum(map(len, frames)), 2)
        ds.ImagedVolumeWidth = width * mpp / 1000
        ds.ImagedVolumeHeight = height * mpp / 1000
        ds.ImagedVolumeDepth = 0.001
        if objective_power is not None:
            ds.OpticalPathSequence[0].ObjectiveLensPower = objective_power
        ds.SharedFunctionalGroupsSequence = _shared_groups(image_type, mpp * d / 1000)
        ds.SpecimenLabelInImage = "NO"
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        out = folder / f"level-{level}.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    if label:
        lab = label_image()
        ds = _wsi_dataset(uids, ExplicitVRLittleEndian, len(downsamples) + 1)
        image_type = ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
        _set_matrix(ds, image_type, (lab.shape[1], lab.shape[0]), (lab.shape[1], lab.shape[0]), 1)
        ds.PhotometricInterpretation = "RGB"
        ds.LossyImageCompression = "00"
        ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = 25.0
        ds.ImagedVolumeDepth = 0.001
        ds.SharedFunctionalGroupsSequence = _shared_groups(image_type, 25.0 / lab.shape[1])
        ds.SpecimenLabelInImage = "YES"
        ds.BurnedInAnnotation = "YES"
        ds.PixelData = lab.tobytes()
        ds["PixelData"].VR = "OB"
        out = folder / "label.dcm"
        ds.save_as(out, enforce_file_format=True)
        files.append(out)
    return replace(slide, files=tuple(files), associated=("label",) * label)
