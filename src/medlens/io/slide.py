"""Whole-slide images: one small interface over OpenSlide, tiffslide and wsidicom.

A :class:`Slide` exposes its pyramid levels, microns per pixel, objective power and the magnification of
each level, and reads RGB uint8 regions. Only the image pyramid is ever read: label and macro/overview
images (which can carry a patient's name) and free-text properties are never opened or passed on.
"""

from __future__ import annotations

import functools
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medlens.errors import CorruptFileError, MedlensError, NotFoundError, UnsupportedInputError
from medlens.io.dicomweb import is_dicomweb
from medlens.registry import Registry

if TYPE_CHECKING:
    from medlens.io.discover import Found

#: formats only OpenSlide (or tiffslide) reads; .tif/.tiff too, and DICOM WSI through wsidicom
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".tif", ".tiff")
#: read by tiffslide first (faster on these), the others by OpenSlide first
TIFFSLIDE_FIRST_SUFFIXES = (".svs", ".tif", ".tiff")
#: DICOM VL Whole Slide Microscopy Image Storage
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
#: Conventional conversion: magnification ~= 10 / microns-per-pixel (0.25 mpp ~ 40x, 0.5 mpp ~ 20x).
_MPP_TIMES_MAGNIFICATION = 10.0


def base_magnification(objective_power: float | None = None, mpp: float | None = None) -> float | None:
    """The slide's level-0 magnification: ``objective_power`` if given, else ``10 / mpp``, else ``None``."""
    if objective_power is not None and objective_power > 0:
        return float(objective_power)
    if mpp is not None and mpp > 0:
        return _MPP_TIMES_MAGNIFICATION / float(mpp)
    return None


@dataclass(frozen=True)
class SlideLevel:
    """One pyramid level: its size in pixels and its downsample from level 0."""

    width: int
    height: int
    downsample: float


def region_errors(read: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """A backend's ``read`` whose library errors (a damaged tile: imagecodecs, tifffile, OpenSlide, wsidicom
    each raise their own types; found by fuzzing) become a :class:`CorruptFileError` naming the slide."""

    @functools.wraps(read)
    def typed(self: Slide, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        try:
            return read(self, x0, y0, level, width, height)
        except MedlensError:
            raise
        except Exception as exc:
            detail = " ".join(str(exc).split())[:200]
            raise CorruptFileError(
                f"cannot decode the region at ({x0}, {y0}) level {level} ({type(exc).__name__}: {detail})", self.path
            ) from None

    return typed


class Slide(ABC):
    """An open whole-slide image. Coordinates are level-0 pixels unless a name says otherwise."""

    backend: str = ""

    def __init__(self, path: str, levels: list[SlideLevel], mpp: float | None, objective_power: float | None):
        if not levels:
            raise CorruptFileError("the slide has no image pyramid", path)
        self.path = path
        self.levels = levels
        self.mpp = mpp
        self.objective_power = objective_power

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height)."""
        return self.levels[0].width, self.levels[0].height

    @property
    def base_magnification(self) -> float | None:
        """Level-0 magnification: the objective power, else 10 / mpp, else unknown."""
        return base_magnification(self.objective_power, self.mpp)

    def magnification(self, level: int) -> float | None:
        base = self.base_magnification
        return None if base is None else base / self.levels[level].downsample

    @abstractmethod
    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height, width, 3) at ``level``, top-left at level-0 ``(x0, y0)``; outside the slide or
        on transparent (unscanned) areas the pixels are white."""

    def _read_clipped(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        """For readers that refuse or blacken regions past the edge: read the part inside the level (through
        :meth:`_read_inside`, level coordinates) and leave the rest white."""
        ds = self.levels[level].downsample
        lx, ly = round(x0 / ds), round(y0 / ds)
        cx0, cy0 = max(lx, 0), max(ly, 0)
        cx1, cy1 = min(lx + width, self.levels[level].width), min(ly + height, self.levels[level].height)
        if (cx0, cy0, cx1, cy1) == (lx, ly, lx + width, ly + height):
            return self._read_inside(lx, ly, level, width, height)
        out = np.full((height, width, 3), 255, np.uint8)
        if cx1 > cx0 and cy1 > cy0:
            out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = self._read_inside(cx0, cy0, level, cx1 - cx0, cy1 - cy0)
        return out

    def _read_inside(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Release file handles."""

    def summary(self) -> dict[str, Any]:
        """What the manifest says about the slide: geometry only, never properties or associated images."""
        return {
            "backend": self.backend,
            "width": self.levels[0].width,
            "height": self.levels[0].height,
            "mpp": self.mpp,
            "objective_power": self.objective_power,
            "base_magnification": self.base_magnification,
            "levels": [
                {
                    "width": lv.width,
                    "height": lv.height,
                    "downsample": lv.downsample,
                    "magnification": self.magnification(i),
                }
                for i, lv in enumerate(self.levels)
            ],
        }

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_rgb(array: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA from a reader -> RGB uint8; non-premultiplied alpha composited onto white (OpenSlide
    marks unscanned areas transparent)."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    rgb, alpha = array[..., :3], array[..., 3:]
    if alpha.size == 0 or alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint16)
    return ((rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _positive(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


class _OpenSlideLike(Slide):
    """OpenSlide and tiffslide share one API; only the module, class and property prefix (the module's
    name) differ."""

    module = ""
    handle_class = ""

    def __init__(self, path: str):
        module = importlib.import_module(self.module)
        try:  # the libraries read lazily: metadata errors surface only here
            self._handle = h = getattr(module, self.handle_class)(path)
            levels = [
                SlideLevel(int(w), int(ht), float(d))
                for (w, ht), d in zip(h.level_dimensions, h.level_downsamples, strict=True)
            ]
            props = dict(h.properties)
        except Exception as exc:  # each library raises its own types for unreadable files
            raise CorruptFileError(f"{self.backend} cannot open it ({type(exc).__name__}: {exc})", path) from None
        super().__init__(
            path,
            levels,
            _positive(props.get(f"{self.module}.mpp-x")),
            _positive(props.get(f"{self.module}.objective-power")),
        )

    @region_errors
    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        return _as_rgb(self._handle.read_region((int(x0), int(y0)), int(level), (int(width), int(height))))

    def close(self) -> None:
        self._handle.close()


class OpenSlideSlide(_OpenSlideLike):
    backend = "openslide"
    module = "openslide"
    handle_class = "OpenSlide"


class TiffSlideSlide(_OpenSlideLike):
    backend = "tiffslide"
    module = "tiffslide"
    handle_class = "TiffSlide"

    @region_errors
    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        return self._read_clipped(x0, y0, level, width, height)  # tiffslide fills past the edge with black

    def _read_inside(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        page = self._tiled_page(level)
        if page is not None:
            return _decode_tiles(page, lx, ly, width, height)
        ds = self.levels[level].downsample
        location = (round(lx * ds), round(ly * ds))
        return _as_rgb(self._handle.read_region(location, int(level), (int(width), int(height)), as_array=True))

    def _tiled_page(self, level: int) -> Any:
        """The TIFF page of ``level`` when its tiles can be decoded straight into the output (tiled, 8-bit,
        3 samples interleaved): ~1.6x faster than going through tiffslide's zarr store. Else ``None``."""
        cache = self.__dict__.setdefault("_pages", {})
        if level not in cache:
            page = None
            try:
                series = self._handle.ts_tifffile.series[int(self._handle.properties["tiffslide.series-index"])]
                candidate = series.levels[level].keyframe
                if (
                    candidate.is_tiled
                    and candidate.dtype == np.uint8
                    and candidate.samplesperpixel == 3
                    and candidate.planarconfig == 1
                    and candidate.imagedepth == 1
                ):
                    page = candidate
            except Exception:  # unusual layouts: tiffslide's own path
                page = None
            cache[level] = page
        return cache[level]


def _decode_tiles(page: Any, lx: int, ly: int, width: int, height: int) -> np.ndarray:
    """Decode the tiles of a TIFF page under a region (in its pixels) with tifffile/imagecodecs and paste them;
    missing (sparse) tiles stay white."""
    th, tw = page.tilelength, page.tilewidth
    across = -(-page.imagewidth // tw)
    out = np.full((height, width, 3), 255, np.uint8)
    fh = page.parent.filehandle
    for row in range(ly // th, (ly + height - 1) // th + 1):
        for col in range(lx // tw, (lx + width - 1) // tw + 1):
            index = row * across + col
            offset, count = page.dataoffsets[index], page.databytecounts[index]
            if not count:
                continue
            fh.seek(offset)
            data = fh.read(count)  # before touching page.decode: building it may move the file position
            tile = page.decode(data, index, jpegtables=page.jpegtables)[0]
            tile = np.asarray(tile).reshape(th, tw, -1)[..., :3]
            y0, x0 = row * th - ly, col * tw - lx
            sy, sx = max(0, -y0), max(0, -x0)
            ey, ex = min(th, height - y0), min(tw, width - x0)
            out[y0 + sy : y0 + ey, x0 + sx : x0 + ex] = tile[sy:ey, sx:ex]
    return out


class DicomSlide(Slide):
    """DICOM WSI (one pyramid of VL Whole Slide Microscopy instances) through wsidicom; labels and
    overviews in the same folder are never read."""

    backend = "wsidicom"

    def __init__(self, path: str, files: list[Path] | None = None):
        from wsidicom import WsiDicom

        self._attach(path, lambda: WsiDicom.open(files if files else path))

    def _attach(self, path: str, open_wsi: Callable[[], Any]) -> None:
        """Open the pyramid with ``open_wsi`` (files here, a DICOMweb source in io/dicomweb_slide.py) and read
        its geometry; any library error is a :class:`CorruptFileError` naming ``path``."""
        try:
            self._wsi = open_wsi()
            pyramid = self._wsi.levels
            self._pyramid_levels = [lv.level for lv in pyramid.levels]
            levels = [SlideLevel(lv.size.width, lv.size.height, float(2**lv.level)) for lv in pyramid.levels]
        except MedlensError:  # a DICOMweb server that failed: its own typed error
            raise
        except Exception as exc:
            raise CorruptFileError(f"wsidicom cannot open it ({type(exc).__name__}: {exc})", path) from None
        try:
            mpp = _positive(self._wsi.mpp.width)
        except Exception:  # no pixel spacing in the files
            mpp = None
        super().__init__(path, levels, mpp, self._objective_power())

    def _objective_power(self) -> float | None:
        try:
            for optical_path in self._wsi.metadata.optical_paths:
                if optical_path.objective is not None:
                    return _positive(optical_path.objective.objective_power)
        except Exception:  # metadata is optional and varies by writer
            return None
        return None

    @region_errors
    def read(self, x0: int, y0: int, level: int, width: int, height: int) -> np.ndarray:
        return self._read_clipped(x0, y0, level, width, height)  # wsidicom refuses regions past the edge

    def _read_inside(self, lx: int, ly: int, level: int, width: int, height: int) -> np.ndarray:
        return _as_rgb(self._wsi.read_region((lx, ly), self._pyramid_levels[level], (width, height), as_array=True))

    def close(self) -> None:
        self._wsi.close()


# --------------------------------------------------------------------------------------------------------------
# Opening
# --------------------------------------------------------------------------------------------------------------

SlideOpener = Callable[..., Slide]
SLIDE_BACKENDS: Registry[SlideOpener] = Registry("slide backend")
SLIDE_BACKENDS.add("openslide", OpenSlideSlide)
SLIDE_BACKENDS.add("tiffslide", TiffSlideSlide)
SLIDE_BACKENDS.add("wsidicom", DicomSlide)


#: scheme -> "module:function(reference) -> SlideSpec | None" finding a slide on a server (module:attr, imported
#: when used: io/dicomweb_slide.py builds on this module)
REMOTE_SLIDE_FINDERS: Registry[str] = Registry("remote slide source")
REMOTE_SLIDE_FINDERS.add("dicomweb", "medlens.io.dicomweb_slide:find_remote_slide")


def resolve(target: str) -> Any:
    """The object a ``"module:attr"`` registry entry names."""
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _is_wsi_dicom(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        return str(ds.get("SOPClassUID", "")) == WSI_SOP_CLASS
    except Exception:  # not DICOM, or a damaged SOP Class UID: not a DICOM slide
        return False


def wsi_dicom_files(paths: list[Path]) -> list[Path]:
    """The files among ``paths`` that are DICOM WSI instances (a quick header read each)."""
    return [p for p in paths if _is_wsi_dicom(p)]


def slide_backend_for(path: Path) -> str | None:
    """``openslide``/``wsidicom`` when ``path`` is a slide file or a DICOM WSI file, else ``None``.

    Folders are decided by the caller (after discovering their files)."""
    if path.is_file():
        if path.name.lower().endswith(OPENSLIDE_SUFFIXES):
            return "openslide"
        if _is_wsi_dicom(path):
            return "wsidicom"
    return None


def backend_order(path: Path) -> tuple[str, ...]:
    """The readers to try, in order, for a slide file. Aperio SVS and plain tiled TIFF go to tiffslide first:
    it decodes their tiles about 3x faster than OpenSlide's ``read_region`` (docs/wsi.md); every other format
    (NDPI, MRXS, SCN, VMS ...) to OpenSlide first. Each falls back to the other."""
    if path.name.lower().endswith(TIFFSLIDE_FIRST_SUFFIXES):
        return ("tiffslide", "openslide")
    return ("openslide", "tiffslide")


def open_slide(path: str | Path, backend: str | None = None, files: list[Path] | None = None) -> Slide:
    """Open a slide with ``backend``, or (None) with the first reader of :func:`backend_order` that can:
    DICOM WSI (a folder, or ``files``) always through wsidicom."""
    p = Path(path)
    if not p.exists():
        raise NotFoundError("no such file or folder", str(path))
    if backend is not None:
        SLIDE_BACKENDS.get(backend)  # an unknown name fails with "did you mean"
        return _open_with(backend, str(path), files)
    if files or p.is_dir() or slide_backend_for(p) == "wsidicom":
        return _open_with("wsidicom", str(path), files)
    errors: list[Exception] = []
    for name in backend_order(p):
        try:
            return _open_with(name, str(path), None)
        except (ImportError, OSError, CorruptFileError) as exc:  # not installed, or cannot read this file
            errors.append(exc)
    corrupt = [e for e in errors if isinstance(e, CorruptFileError)]
    if corrupt:
        raise corrupt[0] from None
    raise UnsupportedInputError("no slide library can read it", str(path)) from None


@dataclass(frozen=True)
class SlideSpec:
    """How to open a slide again in another process: picklable, with the files of a DICOM WSI.

    ``opener`` (a module-level function ``opener(path, backend=..., files=...)``) replaces
    :func:`open_slide`; the tests use it to inject decoder faults."""

    path: str
    backend: str | None = None
    files: tuple[str, ...] | None = None
    opener: Callable[..., Slide] | None = None
    #: keeps a temporary folder (an unpacked zip) alive while the slide is read; not sent to workers
    keepalive: object = field(default=None, compare=False, repr=False)

    def open(self) -> Slide:
        if self.opener is not None:
            return self.opener(self.path, backend=self.backend, files=self.files)
        return open_slide(self.path, self.backend, [Path(f) for f in self.files] if self.files else None)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "backend": self.backend, "files": self.files, "opener": self.opener}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in {**state, "keepalive": None}.items():
            object.__setattr__(self, key, value)


def find_slide(path: str | Path, found: Found | None = None) -> SlideSpec | None:
    """A :class:`SlideSpec` when ``path`` is a whole-slide image (an OpenSlide-format file, a DICOM WSI file,
    a folder/zip holding one slide, or a ``dicomweb://`` study or series of one), else ``None`` (an ordinary
    study). ``found``: the folder's or zip's
    files when already discovered."""
    p = Path(path)
    if found is None and is_dicomweb(path) and not p.exists():  # a study on a configured DICOMweb server
        return resolve(REMOTE_SLIDE_FINDERS.get("dicomweb"))(str(path))
    if found is None:
        if not p.is_file() or p.name.lower().endswith(".zip"):
            return None
        backend = slide_backend_for(p)
        if backend is None:
            return None
        return SlideSpec(str(p), files=(str(p),) if backend == "wsidicom" else None)
    slides = [f for f in found.dicom if f.display.lower().endswith(OPENSLIDE_SUFFIXES)]
    if len(slides) > 1:
        raise UnsupportedInputError(f"{len(slides)} slide files found; give one slide at a time", str(path))
    if slides:
        return SlideSpec(str(slides[0].path), keepalive=found.tempdir)
    head = [f.path for f in found.dicom[:3]]
    if not wsi_dicom_files(head):
        return None
    files = wsi_dicom_files([f.path for f in found.dicom])
    return SlideSpec(str(path), files=tuple(str(f) for f in files), keepalive=found.tempdir)


def _open_with(backend: str, path: str, files: list[Path] | None) -> Slide:
    opener = SLIDE_BACKENDS.get(backend)
    return opener(path, files) if backend == "wsidicom" else opener(path)


__all__ = [
    "SLIDE_BACKENDS",
    "WSI_SOP_CLASS",
    "DicomSlide",
    "OpenSlideSlide",
    "Slide",
    "SlideLevel",
    "SlideSpec",
    "TiffSlideSlide",
    "backend_order",
    "find_slide",
    "open_slide",
    "slide_backend_for",
    "wsi_dicom_files",
]
