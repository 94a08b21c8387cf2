"""Decode DICOM frames to modality values (float32, HU for CT) or RGB uint8, only the frames asked for.

Frames stored uncompressed are read in this process (a single grey little-endian frame straight from the
file). Compressed ones (JPEG, JPEG-LS, JPEG 2000, RLE, deflate ...) and any syntax with a decoder in
:data:`PIXEL_DECODERS` are decoded in the worker processes of :mod:`medlens.io.worker_pool`: a decoder that
aborts, panics, hangs or exhausts memory fails only its file, with a :class:`CorruptFileError` naming it.
A :class:`FrameReader` told the frames a recipe will load (``prefetch``) keeps a bounded number of them
decoding ahead of the one being windowed, so every core decodes while peak memory stays at the frames in
flight.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import warnings
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from medlens.errors import CorruptFileError, MedlensError
from medlens.io import worker_pool
from medlens.io.dicom_header import DicomInstance, FrameGeometry
from medlens.io.dicom_values import integer
from medlens.io.limits import check_decoded_size
from medlens.warnings_capture import native_stderr

_PIXEL_DATA = 0x7FE00010
_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")  # Implicit and Explicit VR Little Endian
#: transfer syntaxes whose pixel data is stored as is: decoded in this process, no worker started
UNCOMPRESSED = frozenset({*_NATIVE_LE, "1.2.840.10008.1.2.2"})
#: transfer syntax UID -> ``"module:function"`` of a frame decoder ``f(task: FrameTask) -> list[array]``
#: run in the workers (a decoder pydicom lacks; the tests' faulty ones); other syntaxes use pydicom's plugins
PIXEL_DECODERS: dict[str, str] = {}
DEFAULT_DECODER = "medlens.io.dicom_pixels:pydicom_frames"
#: frames of one multi-frame object decoded by one task (single-frame files: one task per file)
FRAMES_PER_TASK = 4


@dataclass(frozen=True)
class FrameEntry:
    """One 2-D image of a series: an instance and, for multi-frame objects, the frame index."""

    instance: DicomInstance
    frame: int | None
    geometry: FrameGeometry


@dataclass(frozen=True)
class FrameTask:
    """What a worker needs to decode frames of one file (picklable; no dataset travels)."""

    path: str
    frames: tuple[int, ...]
    n_frames: int
    #: the file has a preamble, meta information and a pixel-data offset: pydicom may read only the frames
    by_path: bool
    transfer_syntax: str
    decoder: str = DEFAULT_DECODER
    #: file offset of the pixel data value and pydicom's decoding options read from the header already
    #: (:func:`decode_options`): the decoder starts there instead of parsing the header again; () when unknown
    offset: int | None = None
    options: tuple[tuple[str, Any], ...] = ()


def decode(entries: Sequence[FrameEntry], color: bool) -> np.ndarray:
    """Decode ``entries`` in order: float32 (k, H, W) after rescale, or uint8 (k, H, W, 3) for colour."""
    if not entries:
        raise ValueError("nothing to decode")
    return FrameReader(entries, color).load(range(len(entries)))


class FrameReader:
    """Decodes frames of ``entries`` by index; :meth:`prefetch` with the indices a recipe will load keeps up to
    a window of them decoding in the workers ahead of :meth:`load`. ``loader``/``prefetch`` of an ImageStack."""

    def __init__(self, entries: Sequence[FrameEntry], color: bool) -> None:
        self.entries = list(entries)
        self.color = color
        self._plan: deque[_Unit] = deque()  # pooled units not started yet, in order of need
        self._unit_for: dict[tuple[int, int], _Unit] = {}  # (instance id, frame) -> its planned unit
        self._running: dict[_Key, Future] = {}
        self._ready: dict[_Key, dict[tuple[int, int], np.ndarray]] = {}  # decoded units with frames still to use
        self._pool: worker_pool.WorkerPool | None = None

    def prefetch(self, indices: Sequence[int]) -> None:
        """Plan the decoding of these frames (in this order) and start the first window of them."""
        self.cancel()
        for unit in _units([self.entries[i] for i in indices]):
            for frame in unit.wanted:
                self._unit_for[(id(unit.instance), frame)] = unit
            if unit.pooled:
                self._plan.append(unit)
        self._top_up()

    def load(self, indices: Iterable[int]) -> np.ndarray:
        chosen = [self.entries[i] for i in indices]
        if not chosen:
            raise ValueError("nothing to decode")
        first = chosen[0].instance
        rows, cols = first.image_rows, first.image_columns
        check_decoded_size(len(chosen) * rows * cols * (3 if self.color else 4), first.display, "the slices")
        out = np.empty(
            (len(chosen), rows, cols, 3) if self.color else (len(chosen), rows, cols),
            np.uint8 if self.color else np.float32,
        )
        try:
            units = self._units_for(chosen)
            for unit in units:  # start every pooled unit of this chunk not started yet, then read the rest here
                if unit.pooled and unit.key not in self._running and unit.key not in self._ready:
                    self._start(unit)
            arrays: dict[tuple[int, int], np.ndarray] = {}
            for unit in units:
                arrays.update(self._ready.get(unit.key) or self._frames(unit))
                self._top_up()  # a task came back: the next planned one goes out now, not after the chunk
            for pos, entry in enumerate(chosen):
                inst = entry.instance
                key = (id(inst), entry.frame or 0)
                raw = arrays[key]
                out[pos] = _to_rgb8(raw, inst) if self.color else _to_modality(raw, inst, entry.geometry)
                self._consumed(key)
        except BaseException:
            self.cancel()
            raise
        self._top_up()
        return out

    def cancel(self) -> None:
        """Drop the plan and the frames decoding (a failed file: its other frames are not needed)."""
        self._plan.clear()
        self._unit_for.clear()
        self._ready.clear()
        for future in self._running.values():
            future.cancel()
        self._running.clear()

    # -- internals

    def _units_for(self, chosen: list[FrameEntry]) -> list[_Unit]:
        planned = [self._unit_for.get((id(e.instance), e.frame or 0)) for e in chosen]
        units = list({u.key: u for u in planned if u is not None}.values())
        return units + _units([e for e, u in zip(chosen, planned, strict=True) if u is None])

    def _consumed(self, key: tuple[int, int]) -> None:
        unit = self._unit_for.pop(key, None)
        if unit is not None and not any((id(unit.instance), f) in self._unit_for for f in unit.wanted):
            self._ready.pop(unit.key, None)

    def _window(self) -> int:
        pool = self._pool
        return 0 if pool is None else pool.size * (pool.in_flight + 1)

    def _start(self, unit: _Unit) -> None:
        if self._pool is None:
            self._pool = worker_pool.shared_pool()
            if self._pool is None:  # workers=0: decoded here, when loaded
                return
        self._running[unit.key] = self._pool.submit(
            DICOM_FRAMES,
            with_decode_options(unit.task, unit.instance),
            nbytes=unit.nbytes,
            timeout_s=worker_pool.task_timeout(),
        )

    def _top_up(self) -> None:
        if self._plan and self._pool is None and worker_pool.pool_workers() > 0:
            self._pool = worker_pool.shared_pool()
        while self._plan and len(self._running) < self._window():
            unit = self._plan.popleft()
            if unit.key not in self._running and unit.key not in self._ready:
                self._start(unit)

    def _frames(self, unit: _Unit) -> dict[tuple[int, int], np.ndarray]:
        """Stored values of the unit's frames by (instance id, frame), tiles of a MOSAIC cut out; kept while
        planned frames of it are still to be loaded."""
        inst = unit.instance
        future = self._running.pop(unit.key, None)
        if unit.pooled and self._plan:
            self._plan = deque(u for u in self._plan if u.key != unit.key)
        raw = (
            _from_pool(future, inst) if future is not None else _raw_frames(inst, with_decode_options(unit.task, inst))
        )
        if inst.mosaic is not None:
            frames = {(id(inst), f): inst.mosaic.tile(raw[0], f) for f in unit.wanted}
        else:
            frames = {(id(inst), f): raw[i] for i, f in enumerate(unit.task.frames)}
        if any(key in self._unit_for for key in frames):
            self._ready[unit.key] = frames
        return frames


_Key = tuple[int, tuple[int, ...]]


@dataclass(frozen=True)
class _Unit:
    """One decoding task: frames of one instance (the whole stored image of a MOSAIC)."""

    instance: DicomInstance
    task: FrameTask
    wanted: tuple[int, ...]  # the frames asked for (MOSAIC tiles; else the task's frames)
    pooled: bool
    nbytes: int

    @property
    def key(self) -> tuple[int, tuple[int, ...]]:
        return (id(self.instance), self.task.frames)


def _units(entries: Sequence[FrameEntry]) -> list[_Unit]:
    """The decoding tasks for ``entries``, in order of first need."""
    by_instance: dict[int, tuple[DicomInstance, list[int]]] = {}
    for entry in entries:
        inst, frames = by_instance.setdefault(id(entry.instance), (entry.instance, []))
        if (entry.frame or 0) not in frames:
            frames.append(entry.frame or 0)
    units = []
    pool_on = worker_pool.pool_workers() > 0  # once: it reads the CPU affinity and the cgroup quota
    for inst, frames in by_instance.values():
        pooled = pool_on and _pooled(inst)
        if inst.mosaic is not None:
            groups = [((0,), tuple(frames))]
        else:
            ordered = sorted(frames)
            step = FRAMES_PER_TASK if pooled else len(ordered)
            groups = [(tuple(ordered[i : i + step]),) * 2 for i in range(0, len(ordered), step)]
        for stored, wanted in groups:
            task = _task(inst, stored)
            units.append(_Unit(inst, task, wanted, pooled, _nbytes(inst, len(stored))))
    return units


def _pooled(inst: DicomInstance) -> bool:
    """Whether the instance's frames are decoded in a worker (when there are workers): compressed, or with a
    registered decoder.

    RLE too, though a frame decodes in 0.2 ms: decoded in this process instead, a 300-slice RLE series
    prepared in 0.259 s against 0.254 s through the pool (medians of 5, fresh processes, docs/performance.md),
    so isolating its Rust decoder costs nothing."""
    syntax = _syntax(inst)
    return syntax in PIXEL_DECODERS or syntax not in UNCOMPRESSED


def _syntax(inst: DicomInstance) -> str:
    return str(inst.dataset.file_meta.get("TransferSyntaxUID", "")) if hasattr(inst.dataset, "file_meta") else ""


def _task(inst: DicomInstance, frames: tuple[int, ...]) -> FrameTask:
    ds = inst.dataset
    syntax = _syntax(inst)
    by_path = bool(ds.preamble is not None and "TransferSyntaxUID" in ds.file_meta and inst.pixels.offset)
    decoder = PIXEL_DECODERS.get(syntax, DEFAULT_DECODER)
    return FrameTask(str(inst.path), frames, inst.n_frames, by_path, syntax, decoder)


def with_decode_options(task: FrameTask, inst: DicomInstance) -> FrameTask:
    """``task`` with the instance's pixel data offset and :func:`decode_options`, added when the task is sent
    or decoded (not when the whole series is planned: the first tasks go out sooner)."""
    options = decode_options(inst) if task.by_path and not task.options else ()
    return replace(task, offset=inst.pixels.offset, options=options) if options else task


def decode_options(inst: DicomInstance) -> tuple[tuple[str, Any], ...]:
    """pydicom's decoding options for the instance's encapsulated pixel data, from the header read already
    (Image Pixel values, extended offsets), as plain values; () when not applicable.

    With them a decoder starts at the pixel data offset instead of ``pixel_array(path)`` parsing the header
    again: a worker's task for a 512x512 RLE frame took 0.58-0.76 ms instead of 1.33-1.75 ms (the decode
    itself is 0.2 ms); for JPEG 2000 it saves ~0.5 ms of ~19 ms. The pixels are the same (tested on every
    encapsulated corpus file): pydicom builds the same options from the same elements."""
    syntax = _syntax(inst)
    if inst.pixels.offset is None or inst.pixels.tag != _PIXEL_DATA or syntax in UNCOMPRESSED:
        return ()
    from pydicom.pixels import as_pixel_options
    from pydicom.uid import UID

    try:
        if not UID(syntax).is_encapsulated:
            return ()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            options = as_pixel_options(inst.dataset)
        plain = tuple((key, _plain(value)) for key, value in options.items())
    except Exception:  # a damaged value: the decoder reads the header itself, and reports it
        return ()
    return (*plain, ("pixel_keyword", "PixelData"))


def _plain(value: Any) -> Any:
    """An option value as a plain int, str or bytes (a pair for the extended offsets); ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bytes):
        return bytes(value)
    if isinstance(value, tuple) and len(value) == 2:
        return (_plain(value[0]), _plain(value[1]))
    raise ValueError(f"unexpected option value {type(value).__name__}")


def _nbytes(inst: DicomInstance, n: int) -> int:
    """Likely size of ``n`` decoded frames (stored values; colour as 3 samples)."""
    bits = integer(inst.dataset, "BitsAllocated") or 16
    per_sample = max(1, (bits + 7) // 8)
    return n * inst.rows * inst.columns * max(1, inst.samples_per_pixel) * per_sample


def _syntax_name(inst: DicomInstance) -> str:
    tsyntax = inst.dataset.file_meta.get("TransferSyntaxUID")
    return str(getattr(tsyntax, "name", str(tsyntax)))


def _from_pool(future: Future, inst: DicomInstance) -> np.ndarray:
    """A worker's frames, or the typed error for the file; what the decoder wrote to stderr is replayed here."""
    try:
        result = future.result()
    except worker_pool.TaskFailed as exc:
        if isinstance(exc.error, MedlensError):
            raise type(exc.error)(exc.error.reason, inst.display) from None
        raise CorruptFileError(f"cannot decode pixel data ({_syntax_name(inst)}): {exc.reason}", inst.display) from None
    if result.stderr.strip():
        with native_stderr(_decoder_name(inst)):
            os.write(2, result.stderr.encode())
    return result.array


def _raw_frames(inst: DicomInstance, task: FrameTask) -> list[np.ndarray]:
    """Stored pixel values of the given frames, decoded here (YBR already converted to RGB by pydicom)."""
    native = read_native_frame(inst)
    if native is not None:
        return [native]
    try:
        with warnings.catch_warnings(), native_stderr(_decoder_name(inst)):
            warnings.simplefilter("ignore")
            return list(_resolve(task.decoder)(task))
    except (MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a decoder's Rust panic is a BaseException
        detail = " ".join(str(exc).split())  # decoder messages span lines; errors are one line
        raise CorruptFileError(f"cannot decode pixel data ({_syntax_name(inst)}): {detail}", inst.display) from None


def _decoder_name(inst: DicomInstance) -> str:
    """Who speaks on descriptor 2 while decoding: the JPEG 2000 decoder (openjpeg) or another pixel plugin."""
    syntax = _syntax(inst)
    return "openjpeg" if syntax.startswith(_J2K_PREFIXES) else "pydicom"


_DECODERS: dict[str, Any] = {}


def _resolve(target: str) -> Any:
    """``"module:function"`` -> the function (imported once per process)."""
    if target not in _DECODERS:
        module, _, attr = target.partition(":")
        _DECODERS[target] = getattr(importlib.import_module(module), attr)
    return _DECODERS[target]


#: JPEG 2000 transfer syntaxes (and HTJ2K): decoded with pylibjpeg-openjpeg first, see :func:`pydicom_frames`
_J2K_PREFIXES = ("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")


def decoding_plugin_for(syntax: str) -> str:
    """The pydicom decoding plugin to ask for first (``""``: pydicom's own order, GDCM first).

    JPEG 2000 goes to pylibjpeg-openjpeg, in the workers and in-process alike (the same pixels either way):
    pydicom's default, GDCM, runs OpenJPEG with threads (per 512x512 frame 14.1 ms wall for 22.4 ms of CPU,
    against 18.8 ms single-threaded for pylibjpeg), so two workers decoding with it share the two cores with
    its threads; with pylibjpeg a 300-slice series prepared in 0.93 s against 1.15 s (docs/performance.md)."""
    if syntax.startswith(_J2K_PREFIXES) and importlib.util.find_spec("openjpeg") is not None:
        return "pylibjpeg"
    return ""


def pydicom_frames(task: FrameTask) -> list[np.ndarray]:
    """Decode through pydicom's plugins, reading the file again (only the requested frames where it can)."""
    plugin = decoding_plugin_for(task.transfer_syntax)
    if plugin:
        try:
            return _pydicom_frames(task, plugin)
        except Exception:  # whatever that plugin cannot decode, pydicom's own order may
            pass
    return _pydicom_frames(task, "")


def _pydicom_frames(task: FrameTask, plugin: str) -> list[np.ndarray]:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import iter_pixels, pixel_array

    frames = list(task.frames)
    if task.options and task.offset is not None:
        try:
            return _frames_at_offset(task, plugin)
        except (InvalidDicomError, ValueError, KeyError, AttributeError, NotImplementedError, TypeError):
            pass  # read as pydicom reads the file itself, below
    # Reading from the path decodes only the needed frames; it cannot inflate deflated files (offset None)
    # and is stricter than a full read on some encapsulated files (e.g. an offset table ending in a zero tag).
    if task.by_path:
        try:
            if task.n_frames > 1:
                return list(iter_pixels(task.path, indices=frames, decoding_plugin=plugin))
            return [pixel_array(task.path, decoding_plugin=plugin)]
        except (InvalidDicomError, ValueError, KeyError, AttributeError, NotImplementedError):
            pass  # fall back to the full read below, which pydicom's own pixel_array uses
    full = pydicom.dcmread(task.path, force=True)  # files without preamble or meta information
    full.file_meta.TransferSyntaxUID = task.transfer_syntax
    return [pixel_array(full, index=f if task.n_frames > 1 else None, decoding_plugin=plugin) for f in frames]


def _frames_at_offset(task: FrameTask, plugin: str) -> list[np.ndarray]:
    """The task's frames decoded from the pixel data value at ``task.offset`` with the header's options (what
    ``pixel_array(path)`` does after parsing the header)."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID

    decoder = get_decoder(task.transfer_syntax)
    options = {**dict(task.options), "transfer_syntax_uid": UID(task.transfer_syntax)}
    with open(task.path, "rb") as fh:
        fh.seek(task.offset or 0)
        if task.n_frames > 1:
            found = decoder.iter_array(fh, indices=list(task.frames), decoding_plugin=plugin, **options)
            return [array for array, _ in found]
        return [decoder.as_array(fh, decoding_plugin=plugin, **options)[0]]


def _decode_task(task: FrameTask, state: dict) -> np.ndarray:
    """The worker's part: the task's frames stacked (k, ...) as stored values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frames = _resolve(task.decoder)(task)
    if len(frames) != len(task.frames) or len({f.shape for f in frames}) != 1:
        raise ValueError(f"the decoder gave {len(frames)} frame(s) of shapes {sorted({f.shape for f in frames})}")
    return frames[0][None] if len(frames) == 1 else np.stack(frames)  # one frame: no copy before the slot


#: the worker pool's task kind for compressed DICOM frames
DICOM_FRAMES = worker_pool.TaskKind(run=_decode_task)


def read_native_frame(inst: DicomInstance) -> np.ndarray | None:
    """A single grey frame stored uncompressed little endian, read straight from the file: the same values
    pydicom returns (unused high bits corrected as it does), several times faster. None when not applicable."""
    ds, pixels = inst.dataset, inst.pixels
    if inst.n_frames != 1 or inst.samples_per_pixel != 1 or ds.file_meta.TransferSyntaxUID not in _NATIVE_LE:
        return None
    bits = integer(ds, "BitsAllocated")
    stored = integer(ds, "BitsStored") or bits
    if bits not in (8, 16, 32) or stored is None or not 0 < stored <= bits or pixels.offset is None:
        return None
    dtype = np.dtype(f"<{'i' if integer(ds, 'PixelRepresentation') == 1 else 'u'}{bits // 8}")
    count = inst.rows * inst.columns
    values = np.fromfile(inst.path, dtype=dtype, count=count, offset=pixels.offset)
    if values.size != count:
        return None  # let pydicom report the problem
    values = values.reshape(inst.rows, inst.columns)
    if stored < bits:
        np.left_shift(values, bits - stored, out=values)
        np.right_shift(values, bits - stored, out=values)  # arithmetic shift: sign-extends signed values
    return values


def _to_modality(raw: np.ndarray, inst: DicomInstance, geometry: FrameGeometry) -> np.ndarray:
    """Stored values -> modality values (rescale slope/intercept or a Modality LUT)."""
    if raw.ndim != 2:
        raise CorruptFileError(f"expected a grey-level frame, got an array of shape {raw.shape}", inst.display)
    if inst.has_modality_lut:
        from pydicom.pixels import apply_modality_lut

        try:
            return apply_modality_lut(raw, inst.dataset).astype(np.float32)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CorruptFileError(f"cannot apply the Modality LUT: {exc}", inst.display) from None
    values = raw.astype(np.float32)
    if geometry.slope != 1.0:
        values *= np.float32(geometry.slope)
    if geometry.intercept != 0.0:
        values += np.float32(geometry.intercept)
    return values


def _to_rgb8(raw: np.ndarray, inst: DicomInstance) -> np.ndarray:
    """Colour frames (RGB, YBR, palette) -> RGB uint8."""
    if inst.photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            raw = apply_color_lut(raw, inst.dataset)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise CorruptFileError(f"cannot apply the palette: {exc}", inst.display) from None
    if raw.ndim != 3 or raw.shape[-1] != 3:
        raise CorruptFileError(f"expected an RGB frame, got an array of shape {raw.shape}", inst.display)
    if raw.dtype == np.uint8:
        return raw
    top = float(raw.max())
    bits = int(inst.dataset.get("BitsStored", 8 * raw.dtype.itemsize) or 8)
    scale = 255.0 / max(top if inst.photometric == "PALETTE COLOR" else 2**bits - 1, 1.0)
    return np.clip(np.rint(raw.astype(np.float32) * scale), 0, 255).astype(np.uint8)
