"""Benchmark: turning a 300-slice CT series into MedGemma 1.5's 85 RGB images, medlens against two baselines.

Run: ``.venv/bin/python bench/prepare_ct.py [--slices 300] [--size 512] [--repeat 3] [--syntax all] [--workdir DIR]
[--json FILE]``

``--syntax`` picks the encoding of the series: ``uncompressed`` (the default), ``j2k`` (JPEG 2000 lossless,
written with pylibjpeg-openjpeg through pydicom), ``rle`` (RLE lossless, pydicom's encoder), or ``all`` (the
three, one report each, side by side in one run). Compressed series are decoded in medlens's worker pool
(every usable core); their target is against the single-threaded tight floor (e) below.

The input is a synthetic CT phantom written once (cached in ``--workdir``, default ``bench/out/``) as a real,
uncompressed DICOM series whose file names and InstanceNumbers are shuffled, so neither follows the
geometry. Every approach reads the same files from the page cache: an untimed pass reads every file before
each round.

Timing: ``--repeat`` rounds; in each round every approach runs in its own fresh Python process (the order
rotated from round to round). The process warms its imports up on a tiny series, then runs the real series
twice: the first run ("1st run", what a one-study CLI call pays, fresh memory included) and the second run
(the steady state; the targets use it). Medians over the rounds are reported. Separate processes matter:
memory freed by one approach (and what the allocator and kernel do with it) otherwise changes the next
approach's time by up to 2x on a small VM.

What is measured:

(a) floor     ``pydicom.dcmread(path).pixel_array`` for every file, nothing else: the least any tool
              that looks at every file's pixels can do.
(b) notebook  the way of Google-Health/medgemma ``high_dimensional_ct_hugging_face.ipynb``, re-implemented
              here for local files: read every file with pydicom, order by InstanceNumber, keep 85 slices
              with the notebook's index formula ``round(i / 85 * (n - 1))`` for i = 1..85, rescale to HU
              with ``pydicom.pixels.apply_rescale``, window each slice into R/G/B (-1024..1024, -135..215,
              0..80 HU; float32, rounded, uint8), then JPEG-encode and base64 each slice for the chat message.
(c) medlens   ``medlens.api.prepare_study(folder)``: headers of every file, geometric order, 85 slices sampled
              equidistantly, only those decoded and windowed; the in-memory result, the equivalent of (b).
(c2)          ``prepare_study`` + ``write_prepared`` (PNG files and manifest, the CLI path), for information.
(e) tight     the least a one-core reader of this series can do: the headers of every file
              (``dcmread(stop_before_pixels=True)``) and ``pixel_array`` of the 85 sampled files only, with
              the single-threaded decoding plugin medlens asks for (for JPEG 2000 pylibjpeg-openjpeg: pydicom's
              default, GDCM, runs OpenJPEG with threads, ~1.6 cores per frame, so it is no one-core floor).

Peak memory is measured for each approach in fresh subprocesses (after imports and a warm-up on a tiny
series), each figure in its own process so tracemalloc's bookkeeping does not inflate the RSS one:
- the peak of Python and NumPy allocations seen by ``tracemalloc`` (NumPy reports its buffers to it;
  Pillow's internal image buffers are not seen);
- the peak RSS increase: peak RSS minus the RSS before the run. On Linux the peak is VmHWM, first reset to
  the current RSS through ``/proc/self/clear_refs``; ``ru_maxrss`` (the fallback elsewhere) would include
  the parent's peak, which the kernel carries across fork + exec.
Both are also given as a multiple of the decoded volume (slices x size x size x 2 bytes).

Correctness is checked in the same run: medlens's images must equal, bit for bit, the three-window mapping
(computed here, independently of medlens) of the phantom's slices ``rint(linspace(0, n - 1, 85))`` in
geometric order (phantom slice i lies at z = i * 2.5 mm).

Targets (PASS/FAIL lines): medlens within 1.5x of the floor, at least 3x faster than the notebook's way,
(c2) within 2x of (c), on compressed series at most 0.6x of the tight floor (e),
tracemalloc peak under 3x the decoded volume. The exit status is 1 when a target or the correctness check
fails.
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import gc
import io
import itertools
import json
import os
import platform
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import pydicom
from PIL import Image
from pydicom.pixels import apply_rescale, pixel_array

import medlens
from medlens.api import prepare_study, write_prepared
from medlens.demo.phantom import ct_phantom, write_ct_series
from medlens.io import worker_pool
from medlens.io.dicom_pixels import decoding_plugin_for
from medlens.prep import Prepared
from medlens.progress import Timer

DEFAULT_WORKDIR = Path(__file__).resolve().parent / "out"
MAX_IMAGES = 85
#: MedGemma 1.5's CT windows in HU, channel order R, G, B (docs/recipe.md, Intensities)
HU_WINDOWS = ((-1024, 1024), (-135, 215), (0, 80))
SPACING = (0.8, 0.8, 2.5)
SEED = 0
FLOOR_RATIO_TARGET = 1.5
NOTEBOOK_SPEEDUP_TARGET = 3.0
#: ``medlens prepare`` with its PNG files against the in-memory preparation
PNG_RATIO_TARGET = 2.0
MEMORY_RATIO_TARGET = 3.0
#: medlens against the one-core tight floor on compressed series (issue 16, 2 cores)
TIGHT_RATIO_TARGET = 0.6
MIB = 2**20
CASES = ("floor", "notebook", "medlens", "medlens+png", "tight")
#: --syntax name -> transfer syntax UID (None: uncompressed, as written)
SYNTAXES = {"uncompressed": None, "j2k": "1.2.840.10008.1.2.4.90", "rle": "1.2.840.10008.1.2.5"}
LABELS = {
    "floor": "(a) floor: dcmread + pixel_array, all files",
    "notebook": "(b) notebook way (sort, 85, window, JPEG+b64)",
    "medlens": "(c) medlens prepare_study (in memory)",
    "medlens+png": "(c2) medlens prepare + write_prepared PNG",
    "tight": "(e) tight floor: headers all, decode 85, 1 core",
}


# --------------------------------------------------------------------------------------------- the input


@dataclass(frozen=True)
class Series:
    """The cached benchmark input: the series folder, the HU volume it was written from, a tiny warm-up
    series, and where PNG output goes."""

    root: Path
    slices: int
    size: int
    syntax: str = "uncompressed"

    @property
    def folder(self) -> Path:
        return self.root / "series"

    @property
    def warmup(self) -> Path:
        return self.root / "warmup"

    @property
    def volume_file(self) -> Path:
        return self.root / "hu.npy"

    @property
    def png_dir(self) -> Path:
        return self.root / "png"

    @property
    def decoded_bytes(self) -> int:
        """Size of the whole decoded volume as int16: the unit for peak memory."""
        return self.slices * self.size * self.size * 2


def series_for(workdir: Path, slices: int, size: int, syntax: str = "uncompressed") -> Series:
    suffix = "" if syntax == "uncompressed" else f"-{syntax}"
    return Series(workdir / f"ct-{slices}x{size}x{size}-seed{SEED}{suffix}", slices, size, syntax)


def compress_folder(folder: Path, syntax: str) -> None:
    """Re-encode every file of ``folder`` in place with the transfer syntax ``syntax`` (lossless)."""
    uid = SYNTAXES[syntax]
    if uid is None:
        return
    for path in list_files(folder):
        ds = pydicom.dcmread(path)
        ds.compress(uid)
        ds.save_as(path, enforce_file_format=True)


def build_series(series: Series) -> bool:
    """Write the phantom series unless a complete one is cached; True when it was (re)built."""
    stamp_file = series.root / "stamp.json"
    stamp = {"slices": series.slices, "size": series.size, "seed": SEED, "spacing": list(SPACING), "shuffle": True}
    if series.syntax != "uncompressed":
        stamp["syntax"] = series.syntax
    if stamp_file.exists() and series.volume_file.exists() and series.folder.is_dir():
        cached = json.loads(stamp_file.read_text())
        if cached == stamp and len(list(series.folder.iterdir())) == series.slices:
            return False
    shutil.rmtree(series.root, ignore_errors=True)
    series.root.mkdir(parents=True)
    hu, _ = ct_phantom(series.slices, series.size, SEED)
    write_ct_series(hu, series.folder, spacing=SPACING, shuffle=True, seed=SEED)
    write_ct_series(
        hu[:: max(1, series.slices // 6)][:6, :: max(1, series.size // 64), :: max(1, series.size // 64)],
        series.warmup,
        spacing=SPACING,
        seed=SEED + 1,
    )
    compress_folder(series.folder, series.syntax)
    compress_folder(series.warmup, series.syntax)
    np.save(series.volume_file, hu)
    stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
    return True


def list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def warm_page_cache(folder: Path) -> None:
    for path in list_files(folder):
        path.read_bytes()


# ------------------------------------------------------------------------------------------ the approaches


def window_three(hu: np.ndarray) -> np.ndarray:
    """(H, W) HU -> (H, W, 3) uint8 with the three published windows: clip, float32, scale to 0..255, round.

    This is the script's own reference implementation, used for (b) and for the correctness check."""
    channels = []
    for low, high in HU_WINDOWS:
        scaled = np.clip(hu, low, high).astype(np.float32)
        scaled -= low
        scaled /= high - low
        scaled *= 255.0
        channels.append(scaled)
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def notebook_indices(n: int) -> list[int]:
    """The notebook's sampling: all slices when n <= 85, else round(i / 85 * (n - 1)) for i = 1..85."""
    if n <= MAX_IMAGES:
        return list(range(n))
    return [round(i / MAX_IMAGES * (n - 1)) for i in range(1, MAX_IMAGES + 1)]


def jpeg_data_url(rgb: np.ndarray) -> str:
    """A slice as the notebook puts it into the chat message: JPEG (Pillow defaults), base64, data URL."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG")
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def run_floor(folder: Path) -> None:
    for path in list_files(folder):
        pydicom.dcmread(path).pixel_array  # noqa: B018 - decoding is the point


def run_tight(folder: Path, timer: Timer | None = None) -> None:
    """Headers of every file, pixels of the 85 files medlens samples (geometric order), on one core; the two
    parts are timed as the stages "headers" and "decode"."""
    timer = timer or Timer()
    with timer("headers"):
        headers = [(pydicom.dcmread(path, stop_before_pixels=True), path) for path in list_files(folder)]
        headers.sort(key=lambda item: float(item[0].ImagePositionPatient[2]))
    n = len(headers)
    chosen = range(n) if n <= MAX_IMAGES else np.rint(np.linspace(0, n - 1, MAX_IMAGES)).astype(int)
    plugin = decoding_plugin_for(str(headers[0][0].file_meta.TransferSyntaxUID)) if headers else ""
    with timer("decode"):
        for i in chosen:
            pixel_array(headers[i][1], decoding_plugin=plugin)


def run_notebook(folder: Path) -> list[str]:
    datasets = [pydicom.dcmread(path) for path in list_files(folder)]
    datasets.sort(key=lambda ds: int(ds.InstanceNumber))
    chosen = [datasets[i] for i in notebook_indices(len(datasets))]
    windowed = [window_three(apply_rescale(ds.pixel_array, ds)) for ds in chosen]
    return [jpeg_data_url(rgb) for rgb in windowed]


def run_medlens(folder: Path, timer: Timer | None = None) -> Prepared:
    return prepare_study(folder, timer=timer)


def run_medlens_png(folder: Path, out_dir: Path, timer: Timer | None = None) -> Path:
    timer = timer or Timer()
    prepared = prepare_study(folder, timer=timer)
    with timer("write_png"):
        return write_prepared(prepared, out_dir, overwrite=True)  # replaces the previous run's folder


def case_function(case: str, folder: Path, png_dir: Path, timer: Timer | None = None) -> Callable[[], object]:
    """The approach ``case`` on ``folder`` as a function of nothing; medlens's stage times go to ``timer``."""
    functions: dict[str, Callable[[], object]] = {
        "floor": lambda: run_floor(folder),
        "notebook": lambda: run_notebook(folder),
        "medlens": lambda: run_medlens(folder, timer),
        "medlens+png": lambda: run_medlens_png(folder, png_dir, timer),
        "tight": lambda: run_tight(folder, timer),
    }
    return functions[case]


# ------------------------------------------------------------------------------------------------ timing


def child_time(case: str, series: Series) -> dict[str, Any]:
    """In a fresh process: warm the imports up on the tiny series, time the first run on the real series
    (what a one-study CLI call pays), then time a second run (the steady state the targets are about)."""
    case_function(case, series.warmup, series.root / "png-warmup")()
    seconds = []
    timer = Timer()
    for function in (
        case_function(case, series.folder, series.png_dir),
        case_function(case, series.folder, series.png_dir, timer),
    ):
        gc.collect()
        start = time.perf_counter()
        result = function()
        seconds.append(time.perf_counter() - start)
        del result
    return {"first_seconds": seconds[0], "seconds": seconds[1], "stages": timer.seconds}


def time_cases(
    series: Series, workdir: Path, repeat: int
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Any]]:
    """``repeat`` rounds; in each, every case runs in its own fresh process (order rotated per round).

    Separate processes keep one approach's allocations (what the allocator and the kernel hold on to) from
    changing the next one's time. Returns the steady and first-run seconds per case and the median seconds
    per stage of the medlens cases and of the tight floor."""
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    first_seconds: dict[str, list[float]] = {case: [] for case in CASES}
    stages: dict[str, dict[str, list[float]]] = {}
    for round_index in range(repeat):
        warm_page_cache(series.folder)
        shift = round_index % len(CASES)
        for case in CASES[shift:] + CASES[:shift]:
            out = run_child(case, "time", series, workdir)
            seconds[case].append(out["seconds"])
            first_seconds[case].append(out["first_seconds"])
            for name, value in out["stages"].items():
                stages.setdefault(case, {}).setdefault(name, []).append(value)
    stage_medians = {case: {n: statistics.median(v) for n, v in by.items()} for case, by in stages.items()}
    return seconds, first_seconds, stage_medians


# ------------------------------------------------------------------------------------------------ memory


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; else the peak so far)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far (since the last reset), in bytes.

    On Linux this is VmHWM of /proc/self/status: ``ru_maxrss`` would also carry the peak of the parent
    (the kernel keeps the pre-exec address space's peak across fork + exec), far above a small child's
    own."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_rss() -> bool:
    """Set the peak RSS back to the current RSS (Linux >= 4.0), so that imports and warm-up do not count."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child_memory(case: str, series: Series, mode: str) -> dict[str, int]:
    """In a fresh process: warm up on the tiny series, then run ``case`` once and report its peak memory."""
    case_function(case, series.warmup, series.root / "png-warmup")()
    function = case_function(case, series.folder, series.png_dir)
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
        result = function()
        traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del result
        return {"traced_peak": traced_peak}
    reset = reset_peak_rss()
    before = current_rss()
    result = function()
    after = peak_rss()
    del result
    return {"rss_before": before, "rss_peak_increase": max(0, after - before), "peak_reset": int(reset)}


def measure_memory(case: str, series: Series, workdir: Path) -> dict[str, int]:
    """Peak memory of ``case``: tracemalloc and RSS, each in its own fresh process."""
    return {**run_child(case, "tracemalloc", series, workdir), **run_child(case, "rss", series, workdir)}


def run_child(case: str, mode: str, series: Series, workdir: Path) -> dict[str, Any]:
    """Run this script as ``--child CASE --child-mode MODE`` and return the JSON it prints."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        *("--slices", str(series.slices), "--size", str(series.size), "--workdir", str(workdir)),
        *("--syntax", series.syntax),
        *("--child", case, "--child-mode", mode),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} measurement of {case} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- correctness


def check_medlens(series: Series) -> dict[str, Any]:
    """medlens's images against the windowed phantom slices rint(linspace(0, n-1, 85)) in geometric order."""
    hu = np.load(series.volume_file)
    n = len(hu)
    indices = np.arange(n) if n <= MAX_IMAGES else np.rint(np.linspace(0, n - 1, MAX_IMAGES)).astype(int)
    expected = np.stack([window_three(hu[i]) for i in indices])
    prepared = run_medlens(series.folder)
    got = np.stack(prepared.images)
    result: dict[str, Any] = {"n_images": len(prepared.images), "expected_images": len(indices)}
    if got.shape != expected.shape:
        result.update(max_abs_diff=None, shape=list(got.shape), expected_shape=list(expected.shape))
    else:
        result["max_abs_diff"] = int(np.abs(got.astype(np.int16) - expected.astype(np.int16)).max())
    z = np.array([s.z if s.z is not None else np.nan for s in prepared.slices], dtype=float)
    result["z_match"] = bool(len(z) == len(indices) and np.allclose(z, indices * SPACING[2]))
    result["ok"] = result["max_abs_diff"] == 0 and result["z_match"]
    return result


def check_notebook_order(series: Series) -> dict[str, Any]:
    """Which geometric slices the notebook's InstanceNumber ordering actually picks (headers only)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in list_files(series.folder)]
    headers.sort(key=lambda ds: int(ds.InstanceNumber))
    picked = [round(float(headers[i].ImagePositionPatient[2]) / SPACING[2]) for i in notebook_indices(len(headers))]
    n = len(headers)
    wanted = list(range(n)) if n <= MAX_IMAGES else [int(i) for i in np.rint(np.linspace(0, n - 1, MAX_IMAGES))]
    return {
        "same_slice_as_geometric": sum(a == b for a, b in zip(picked, wanted, strict=True)),
        "z_ascending": all(a < b for a, b in itertools.pairwise(picked)),
        "of": len(wanted),
    }


# ------------------------------------------------------------------------------------------------ report


@dataclass
class CaseResult:
    case: str
    seconds: list[float]
    median_s: float
    first_run_seconds: list[float]
    first_run_median_s: float
    vs_floor: float
    speedup_vs_notebook: float
    traced_peak_mib: float | None = None
    traced_peak_x_volume: float | None = None
    rss_peak_increase_mib: float | None = None
    rss_peak_x_volume: float | None = None


@dataclass
class Report:
    machine: dict[str, Any]
    config: dict[str, Any]
    cases: list[CaseResult] = field(default_factory=list)
    medlens_stages_median_s: dict[str, dict[str, float]] = field(default_factory=dict)
    correctness: dict[str, Any] = field(default_factory=dict)
    notebook_order: dict[str, Any] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)
    #: the least a reader that decodes on every usable core could take, as a ratio to the tight floor
    parallel_bound: dict[str, Any] = field(default_factory=dict)


def parallel_bound(stages: dict[str, dict[str, float]], cores: int) -> dict[str, Any]:
    """Amdahl's bound for the tight floor (e): its headers stay serial, its decoding is split over ``cores``.

    The headers of all files must be read before the slices to decode are known, so no reader gets below
    ``headers + decode / cores``; on a cheap codec (RLE) that is above the 0.6x target by itself."""
    tight = stages.get("tight", {})
    headers, decode = tight.get("headers"), tight.get("decode")
    if headers is None or decode is None or headers + decode <= 0:
        return {}
    least = headers + decode / cores
    return {"cores": cores, "headers_s": headers, "decode_s": decode, "ratio": least / (headers + decode)}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "pillow": PIL.__version__,
        "medlens": medlens.__version__,
        "transparent_hugepage": _read_text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "numpy_madvise_hugepage": os.environ.get("NUMPY_MADVISE_HUGEPAGE", "default"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def summarise(
    seconds: dict[str, list[float]],
    first_seconds: dict[str, list[float]],
    memory: dict[str, dict[str, int]],
    volume_bytes: int,
) -> list[CaseResult]:
    medians = {case: statistics.median(values) for case, values in seconds.items()}
    results = []
    for case in CASES:
        result = CaseResult(
            case=case,
            seconds=[round(s, 4) for s in seconds[case]],
            median_s=medians[case],
            first_run_seconds=[round(s, 4) for s in first_seconds[case]],
            first_run_median_s=statistics.median(first_seconds[case]),
            vs_floor=medians[case] / medians["floor"],
            speedup_vs_notebook=medians["notebook"] / medians[case],
        )
        mem = memory.get(case)
        if mem:
            result.traced_peak_mib = mem["traced_peak"] / MIB
            result.traced_peak_x_volume = mem["traced_peak"] / volume_bytes
            result.rss_peak_increase_mib = mem["rss_peak_increase"] / MIB
            result.rss_peak_x_volume = mem["rss_peak_increase"] / volume_bytes
        results.append(result)
    return results


def target_checks(report: Report) -> list[dict[str, Any]]:
    by_case = {r.case: r for r in report.cases}
    medlens_result = by_case["medlens"]
    checks = [
        {
            "name": f"medlens within {FLOOR_RATIO_TARGET}x of the floor",
            "value": f"{medlens_result.vs_floor:.2f}x",
            "ok": medlens_result.vs_floor <= FLOOR_RATIO_TARGET,
        },
        {
            "name": f"medlens at least {NOTEBOOK_SPEEDUP_TARGET:g}x faster than the notebook's way",
            "value": f"{medlens_result.speedup_vs_notebook:.2f}x",
            "ok": medlens_result.speedup_vs_notebook >= NOTEBOOK_SPEEDUP_TARGET,
        },
    ]
    png_ratio = by_case["medlens+png"].median_s / medlens_result.median_s
    checks.append(
        {
            "name": f"medlens prepare + PNG files within {PNG_RATIO_TARGET:g}x of the in-memory preparation",
            "value": f"{png_ratio:.2f}x",
            "ok": png_ratio <= PNG_RATIO_TARGET,
        }
    )
    if medlens_result.traced_peak_x_volume is not None:
        checks.append(
            {
                "name": f"medlens peak memory (tracemalloc) under {MEMORY_RATIO_TARGET:g}x the decoded volume",
                "value": f"{medlens_result.traced_peak_x_volume:.2f}x",
                "ok": medlens_result.traced_peak_x_volume < MEMORY_RATIO_TARGET,
            }
        )
    if report.config.get("syntax", "uncompressed") != "uncompressed":
        tight = medlens_result.median_s / by_case["tight"].median_s
        checks.append(
            {
                "name": f"medlens at most {TIGHT_RATIO_TARGET:g}x of the one-core tight floor (compressed series)",
                "value": f"{tight:.2f}x",
                "ok": tight <= TIGHT_RATIO_TARGET,
            }
        )
    correctness = report.correctness
    checks.append(
        {
            "name": "medlens images equal the reference windowing of the geometric slices",
            "value": f"max abs diff {correctness.get('max_abs_diff')}, z positions match: {correctness.get('z_match')}",
            "ok": bool(correctness.get("ok")),
        }
    )
    return checks


def print_report(report: Report) -> None:
    m, c = report.machine, report.config
    print(f"machine   {m['cpu']}; {m['cpu_count']} CPUs ({m['cpus_usable']} usable); {m['platform']}")
    print(
        f"software  Python {m['python']}, numpy {m['numpy']}, pydicom {m['pydicom']}, Pillow {m['pillow']}, "
        f"medlens {m['medlens']}"
    )
    print(
        f"memory    transparent hugepages: {m['transparent_hugepage']}; NUMPY_MADVISE_HUGEPAGE: "
        f"{m['numpy_madvise_hugepage']}"
    )
    print(f"load avg  start {m['load_average_start']}, end {m.get('load_average_end')}")
    print(
        f"input     {c['slices']} slices of {c['size']}x{c['size']} ({c.get('syntax', 'uncompressed')}, shuffled names "
        "and "
        f"InstanceNumbers); decoded volume {c['decoded_volume_mib']:.1f} MiB; {c['repeat']} rounds"
    )
    print()
    header = (
        f"{'approach':48s} {'median s':>9s} {'x floor':>8s} {'vs nb':>7s} {'1st run s':>10s} "
        f"{'tracemalloc':>12s} {'x vol':>6s} {'RSS incr.':>10s} {'x vol':>6s}"
    )
    print(header)
    print("-" * len(header))
    for r in report.cases:
        traced = f"{r.traced_peak_mib:9.1f} MiB" if r.traced_peak_mib is not None else f"{'-':>12s}"
        traced_x = f"{r.traced_peak_x_volume:6.2f}" if r.traced_peak_x_volume is not None else f"{'-':>6s}"
        rss = f"{r.rss_peak_increase_mib:6.1f} MiB" if r.rss_peak_increase_mib is not None else f"{'-':>10s}"
        rss_x = f"{r.rss_peak_x_volume:6.2f}" if r.rss_peak_x_volume is not None else f"{'-':>6s}"
        print(
            f"{LABELS[r.case]:48s} {r.median_s:9.3f} {r.vs_floor:7.2f}x {r.speedup_vs_notebook:6.2f}x "
            f"{r.first_run_median_s:10.3f} "
            f"{traced} {traced_x} {rss} {rss_x}"
        )
    print()
    for case, by_stage in report.medlens_stages_median_s.items():
        stages = ", ".join(f"{name} {s:.3f} s" for name, s in by_stage.items())
        print(f"{case} stages (median): {stages}")
    runs = "; ".join(f"{r.case} " + " ".join(f"{s:.3f}" for s in r.seconds) for r in report.cases)
    print(f"all runs (s): {runs}")
    runs = "; ".join(f"{r.case} " + " ".join(f"{s:.3f}" for s in r.first_run_seconds) for r in report.cases)
    print(f"first runs (s): {runs}")
    order = report.notebook_order
    print(
        f"notebook's InstanceNumber order picks {order['same_slice_as_geometric']}/{order['of']} of the "
        f"geometric slices; its slices ascend in z: {order['z_ascending']}"
    )
    bound = report.parallel_bound
    if bound and report.config.get("syntax", "uncompressed") != "uncompressed":
        print(
            f"tight floor split: headers {bound['headers_s']:.3f} s + decode {bound['decode_s']:.3f} s; decoding on "
            f"{bound['cores']} cores at best gives {bound['ratio']:.2f}x of it (headers stay serial)"
        )
    print()
    for check in report.checks:
        print(f"{'PASS' if check['ok'] else 'FAIL'}  {check['name']}: {check['value']}")


def print_profile(folder: Path, top: int) -> None:
    """cProfile of one prepare_study call: the top functions by own time and by cumulative time."""
    run_medlens(folder)
    profile = cProfile.Profile()
    profile.enable()
    run_medlens(folder)
    profile.disable()
    stats = pstats.Stats(profile, stream=sys.stdout).strip_dirs()
    print(f"\ncProfile of prepare_study: top {top} by own time")
    stats.sort_stats("tottime").print_stats(top)
    print(f"cProfile of prepare_study: top {top} by cumulative time")
    stats.sort_stats("cumulative").print_stats(top)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=300, help="slices in the series (default 300)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice (default 512)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per approach; the median is shown")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="cache and scratch folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print cProfile's top N of medlens")
    parser.add_argument("--syntax", choices=(*SYNTAXES, "all"), default="uncompressed", help="series encoding")
    parser.add_argument("--child", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", choices=("time", "tracemalloc", "rss"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.slices < 5 or args.size < 32 or args.repeat < 1:
        parser.error("need --slices >= 5, --size >= 32 and --repeat >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    if args.child:
        series = series_for(workdir, args.slices, args.size, args.syntax)
        mode = args.child_mode or "time"
        out = child_time(args.child, series) if mode == "time" else child_memory(args.child, series, mode)
        print(json.dumps(out))
        return 0
    syntaxes = list(SYNTAXES) if args.syntax == "all" else [args.syntax]
    reports = [run_one(args, series_for(workdir, args.slices, args.size, syntax), workdir) for syntax in syntaxes]
    for report in reports:
        print_report(report)
        print()
    if args.profile:
        print_profile(series_for(workdir, args.slices, args.size, syntaxes[0]).folder, args.profile)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        data = [asdict(r) for r in reports]
        args.json.write_text(json.dumps(data[0] if len(data) == 1 else data, indent=2) + "\n")
    return 0 if all(check["ok"] for report in reports for check in report.checks) else 1


def run_one(args: argparse.Namespace, series: Series, workdir: Path) -> Report:
    """Every approach on one series (one encoding): timing, memory, correctness and the targets."""
    started = time.perf_counter()
    if build_series(series):
        print(f"wrote {series.slices} slices ({series.syntax}) to {series.folder}", file=sys.stderr)
    report = Report(
        machine=machine_info(),
        config={
            "slices": series.slices,
            "size": series.size,
            "syntax": series.syntax,
            "repeat": args.repeat,
            "series": str(series.folder),
            "decoded_volume_mib": series.decoded_bytes / MIB,
        },
    )
    print(f"timing {series.syntax} ...", file=sys.stderr)
    seconds, first_seconds, stages = time_cases(series, workdir, args.repeat)
    memory: dict[str, dict[str, int]] = {}
    if not args.no_memory:
        for case in CASES:
            print(f"peak memory of {case} ({series.syntax}) ...", file=sys.stderr)
            memory[case] = measure_memory(case, series, workdir)
    report.cases = summarise(seconds, first_seconds, memory, series.decoded_bytes)
    report.medlens_stages_median_s = stages
    report.parallel_bound = parallel_bound(stages, worker_pool.usable_cores())
    report.correctness = check_medlens(series)
    report.notebook_order = check_notebook_order(series)
    report.checks = target_checks(report)
    report.machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    report.config["wall_seconds"] = round(time.perf_counter() - started, 1)
    return report


if __name__ == "__main__":
    sys.exit(main())
