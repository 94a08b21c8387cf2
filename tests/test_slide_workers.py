"""The slide reader pool: order, resizing, and a failing, crashing, hanging or memory-hungry tile failing
only its own region while the run goes on."""

from __future__ import annotations

import functools
import time

import numpy as np
import pytest
from slide_faults import expected_region, open_computed

from medlens.io.slide import SlideSpec
from medlens.io.slide_workers import RegionRequest, read_regions, resize_region


def _spec(**faults: str) -> SlideSpec:
    return SlideSpec("computed.slide", opener=functools.partial(open_computed, **faults))


def _requests(n: int, size: int = 64) -> list[RegionRequest]:
    return [RegionRequest(i * 256, (i % 3) * 128, 0, size, size, size, size) for i in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_regions_come_back_in_request_order(workers):
    requests = _requests(9)
    results = read_regions(_spec(), requests, workers=workers)
    assert [r.error for r in results] == [None] * 9
    for req, res in zip(requests, results, strict=True):
        np.testing.assert_array_equal(res.image, expected_region(req.x0, req.y0, 0, req.read_w, req.read_h))


def test_integer_shrink_is_an_area_mean_and_other_sizes_resize():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    half = resize_region(image, 2, 2)
    np.testing.assert_allclose(half[0, 0], image[:2, :2].reshape(-1, 3).mean(0), atol=0.51)
    assert resize_region(image, 3, 3).shape == (3, 3, 3)
    assert resize_region(image, 4, 4) is image


@pytest.mark.parametrize("shape", [(1792, 1792), (2, 2), (6, 10), (818, 10240)])
def test_2x_shrink_equals_pil_reduce_bit_for_bit(shape):
    """The OpenCV 2x path must give PIL's ``reduce(2)`` values exactly (the patches' pixels are the recipe's)."""
    from PIL import Image

    rng = np.random.default_rng(shape[0])
    for image in (rng.integers(0, 256, (*shape, 3), dtype=np.uint8), np.full((*shape, 3), 255, np.uint8)):
        expected = np.asarray(Image.fromarray(image).reduce(2))
        np.testing.assert_array_equal(resize_region(image, shape[1] // 2, shape[0] // 2), expected)


def test_a_raising_tile_fails_its_region_and_the_worker_reopens():
    requests = _requests(6)
    bad = requests[2]
    results = read_regions(_spec(**{f"{bad.x0}_{bad.y0}": "raise"}), requests, workers=2)
    assert results[2].image is None and "corrupt data in tile" in results[2].error
    assert all(r.image is not None for i, r in enumerate(results) if i != 2)


def test_a_crashing_decoder_kills_only_its_worker():
    requests = _requests(8)
    bad = requests[3]
    results = read_regions(_spec(**{f"{bad.x0}_{bad.y0}": "crash"}), requests, workers=2)
    assert results[3].image is None
    assert "crashed (SIGABRT)" in results[3].error
    for i, (req, res) in enumerate(zip(requests, results, strict=True)):
        if i != 3:
            np.testing.assert_array_equal(res.image, expected_region(req.x0, req.y0, 0, req.read_w, req.read_h))


def test_a_hanging_decoder_times_out_and_the_run_goes_on():
    requests = _requests(5)
    bad = requests[1]
    start = time.monotonic()
    results = read_regions(_spec(**{f"{bad.x0}_{bad.y0}": "hang"}), requests, workers=2, timeout_s=1.5)
    assert time.monotonic() - start < 15
    assert results[1].image is None and "timed out after 1.5 s" in results[1].error
    assert all(r.image is not None for i, r in enumerate(results) if i != 1)


def test_a_memory_hungry_decoder_hits_the_worker_limit():
    requests = _requests(4)
    bad = requests[0]
    results = read_regions(_spec(**{f"{bad.x0}_{bad.y0}": "oom"}), requests, workers=1, memory_mb=256)
    assert results[0].image is None
    assert "out of memory (worker limit 256 MB)" in results[0].error
    assert all(r.image is not None for r in results[1:])


def test_in_process_reading_records_errors_too():
    requests = _requests(3)
    bad = requests[1]
    results = read_regions(_spec(**{f"{bad.x0}_{bad.y0}": "raise"}), requests, workers=0)
    assert [r.image is None for r in results] == [False, True, False]


def test_on_done_sees_every_region():
    seen: list[int] = []
    read_regions(_spec(), _requests(5), workers=2, on_done=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(5))
