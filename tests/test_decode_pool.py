"""The decode pool: compressed frames decoded in worker processes; a decoder that aborts, hangs, exhausts
memory, panics or raises fails only its own file with a typed error, in bounded time, and the next file
prepares; uncompressed files never start the pool; frames stream through a bounded window."""

from __future__ import annotations

import dataclasses
import shutil
import time
import warnings

import numpy as np
import pydicom
import pytest
from conftest import pydicom_data_dir, pydicom_test_dir
from pydicom.uid import RLELossless

from medlens.api import prepare_study
from medlens.errors import CorruptFileError, InputError
from medlens.io import dicom_pixels, worker_pool
from medlens.io.dicom_header import read_instance
from medlens.io.dicom_pixels import PIXEL_DECODERS, FrameReader


@pytest.fixture
def pool_settings():
    """Restore the shared pool's settings after a test changes them."""
    saved = worker_pool.settings()
    yield worker_pool.configure
    worker_pool.configure(saved.workers, saved.memory_mb)


def _rle_series(folder, pydicom_file, n: int = 1, name: str = "slice"):
    """``n`` RLE-compressed CT slices (CT_small's pixels shifted per slice) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    series_uid = pydicom.uid.generate_uid()
    for i in range(n):
        ds = base.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 2.5]
        ds.compress(RLELossless, (base.pixel_array + 7 * i).astype(base.pixel_array.dtype))
        ds.save_as(folder / f"{name}{i:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture
def faulty_rle(monkeypatch):
    monkeypatch.setitem(PIXEL_DECODERS, str(RLELossless), "decode_faults:faulty")


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ("abort", "crashed (SIGABRT)"),
        ("raise", "RuntimeError: the test decoder gave up on two lines"),
        ("panic", "FakePanic: called `Option::unwrap()`"),
        ("hang", "timed out after 1.5 s"),
        ("oom", "out of memory (worker limit 256 MB)"),
    ],
)
def test_a_failing_decoder_fails_only_its_file(tmp_path, pydicom_file, faulty_rle, pool_settings, fault, reason):
    pool_settings(workers=2, memory_mb=256)
    bad = _rle_series(tmp_path / "bad", pydicom_file, 3, name=f"{fault}-")
    good = _rle_series(tmp_path / "good", pydicom_file, 3)
    start = time.monotonic()
    with worker_pool.time_limit(1.5 if fault == "hang" else 30), pytest.raises(CorruptFileError) as info:
        prepare_study(bad)
    assert time.monotonic() - start < 10
    assert info.value.path and f"{fault}-" in info.value.path, "the error names the file"
    assert reason in info.value.reason and "cannot decode pixel data (RLE Lossless)" in info.value.reason
    assert "\n" not in str(info.value)
    prepared = prepare_study(good)  # the pool replaced its worker and goes on
    assert len(prepared.images) == 3
    assert worker_pool.shared_pool().started_workers <= 2


def test_pool_pixels_equal_in_process_pixels(tmp_path, pydicom_file, pool_settings):
    folder = _rle_series(tmp_path / "s", pydicom_file, 5)
    pooled = prepare_study(folder)
    assert worker_pool.shared_pool().started_workers >= 1
    pool_settings(workers=0)
    here = prepare_study(folder)
    assert worker_pool._shared is None
    for a, b in zip(pooled.images, here.images, strict=True):
        np.testing.assert_array_equal(a, b)


def test_uncompressed_files_do_not_start_the_pool(pydicom_file, pool_settings):
    worker_pool.close_shared_pool()
    prepared = prepare_study(pydicom_file("CT_small.dcm"))
    assert prepared.images and worker_pool._shared is None


def test_prefetch_keeps_a_bounded_window_and_streams_in_order(tmp_path, pydicom_file, pool_settings):
    from medlens.io import open_input
    from medlens.io.dicom_header import read_instance
    from medlens.io.dicom_series import build_series

    pool_settings(workers=2)
    folder = _rle_series(tmp_path / "s", pydicom_file, 24)
    reference = open_input(folder).load(range(24))  # chunk by chunk, no plan
    instances = [read_instance(p, p.name) for p in sorted(folder.iterdir())]
    (cand,) = build_series(instances)
    reader = FrameReader(cand.entries, color=False)
    reader.prefetch(list(range(24)))
    window = reader._window()
    assert 0 < len(reader._running) <= window < 24
    chunks = [reader.load(range(i, i + 8)) for i in range(0, 24, 8)]
    assert len(reader._running) == 0 and not reader._ready
    np.testing.assert_array_equal(np.concatenate(chunks), reference)


def test_the_window_stays_full_while_a_chunk_is_collected(tmp_path, pydicom_file, pool_settings):
    """Each task that comes back sends the next planned one out at once (the workers never wait for the
    parent to finish a chunk): at every collected task the window is still full."""
    from medlens.io.dicom_header import read_instance
    from medlens.io.dicom_series import build_series

    pool_settings(workers=2)
    folder = _rle_series(tmp_path / "s", pydicom_file, 24)
    (cand,) = build_series([read_instance(p, p.name) for p in sorted(folder.iterdir())])
    reader = FrameReader(cand.entries, color=False)
    reader.prefetch(list(range(24)))
    window = reader._window()
    seen: list[int] = []
    collect = reader._frames

    def counting(unit):
        seen.append(len(reader._running))  # tasks decoding or queued, this one included
        return collect(unit)

    reader._frames = counting
    reader.load(range(8))
    assert len(seen) == 8 and min(seen) >= window, seen


def test_workers_follow_usable_cores():
    import os

    cores = worker_pool.usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    quota = worker_pool._cgroup_quota()
    if quota:
        assert cores <= max(1, int(np.ceil(quota)))
    with worker_pool.WorkerPool() as pool:
        assert pool.size == cores


def test_a_worker_that_dies_while_idle_is_replaced(tmp_path, pydicom_file, pool_settings):
    pool_settings(workers=1)
    folder = _rle_series(tmp_path / "s", pydicom_file, 2)
    prepare_study(folder)
    pool = worker_pool.shared_pool()
    for worker in list(pool._workers):
        worker.proc.kill()
        worker.proc.join(5)
    assert len(prepare_study(folder).images) == 2


def test_copied_series_still_decodes_after_the_pool_closes(tmp_path, pydicom_file):
    folder = _rle_series(tmp_path / "s", pydicom_file, 2)
    worker_pool.close_shared_pool()
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    assert len(prepare_study(copy).images) == 2


def test_a_decoder_crash_in_an_upload_is_a_400_and_the_server_stays_healthy(
    tmp_path, pydicom_file, faulty_rle, pool_settings, tiny_backend
):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    from fastapi.testclient import TestClient

    from medlens.serve.app import create_app
    from medlens.serve.settings import ServeSettings

    pool_settings(workers=2, memory_mb=256)
    bad = _rle_series(tmp_path / "bad", pydicom_file, 3, name="abort-")
    good = _rle_series(tmp_path / "good", pydicom_file, 3)

    def parts(folder):
        return [("files", (f"study/{p.name}", p.read_bytes(), "application/dicom")) for p in sorted(folder.iterdir())]

    app = create_app(ServeSettings(data_dir=tmp_path / "serve", max_new_tokens=4), backend=tiny_backend)
    with TestClient(app) as client:
        response = client.post("/v1/analyze", files=parts(bad), data={"question": "Any findings?"})
        assert response.status_code == 400, response.text
        body = response.json()
        assert "crashed (SIGABRT)" in body["error"] and "abort-" in body["error"]
        assert client.get("/health").status_code == 200
        response = client.post("/v1/analyze", files=parts(good), data={"question": "Any findings?"})
        assert response.status_code == 200, response.text


def test_decoding_at_the_pixel_offset_equals_pydicom_reading_the_file(capfd):
    """Frames decoded from the pixel data offset with the header's options equal pydicom's own reading of
    the file (``pixel_array``/``iter_pixels`` by path), on every encapsulated corpus file that pydicom decodes."""
    from pydicom.pixels import iter_pixels, pixel_array

    files = [p for root in (pydicom_test_dir(), pydicom_data_dir()) if root for p in sorted(root.rglob("*.dcm"))]
    checked = 0
    start = time.perf_counter()
    for path in files:
        try:
            inst = read_instance(path, path.name)
        except InputError:
            continue
        task = dicom_pixels.with_decode_options(dicom_pixels._task(inst, tuple(range(min(inst.n_frames, 2)))), inst)
        if not task.options:
            continue
        plugin = dicom_pixels.decoding_plugin_for(task.transfer_syntax)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                if inst.n_frames > 1:
                    expected = list(iter_pixels(path, indices=list(task.frames), decoding_plugin=plugin))
                else:
                    expected = [pixel_array(path, decoding_plugin=plugin)]
            except Exception:
                continue  # pydicom cannot read it by path either: the fallbacks are tested elsewhere
            got = dicom_pixels._frames_at_offset(task, plugin)
        assert len(got) == len(expected), path.name
        for a, b in zip(got, expected, strict=True):
            assert a.dtype == b.dtype, path.name
            np.testing.assert_array_equal(a, b, err_msg=path.name)
        checked += 1
    capfd.readouterr()  # openjpeg's notes on damaged files
    assert checked >= 40
    assert time.perf_counter() - start < 30


def test_a_task_without_header_options_decodes_the_same(tmp_path, pydicom_file):
    """The decoder falls back to reading the header itself (a task from an older caller, damaged values)."""
    folder = _rle_series(tmp_path / "s", pydicom_file, 1)
    inst = read_instance(next(folder.iterdir()), "slice")
    task = dicom_pixels.with_decode_options(dicom_pixels._task(inst, (0,)), inst)
    assert task.options and task.offset == inst.pixels.offset
    bare = dataclasses.replace(task, options=(), offset=None)
    np.testing.assert_array_equal(dicom_pixels.pydicom_frames(task)[0], dicom_pixels.pydicom_frames(bare)[0])
