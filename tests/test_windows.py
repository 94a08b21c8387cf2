"""Exact values of the intensity transforms (HU windows, min-max, DICOM VOI)."""

from __future__ import annotations

import numpy as np
import pytest

from medlens.io.types import TableVOI, WindowVOI
from medlens.prep.windows import MEDGEMMA_CT_WINDOWS, apply_voi, ct_to_rgb, minmax_to_uint8, window_to_uint8


def test_windows_are_the_published_ones():
    assert MEDGEMMA_CT_WINDOWS == ((-1024, 1024), (-135, 215), (0, 80))


@pytest.mark.parametrize(
    ("hu", "rgb"),
    [
        (-3000, (0, 0, 0)),
        (-1024, (0, 0, 0)),
        (-135, (111, 0, 0)),  # (889 / 2048) * 255 = 110.69
        (0, (128, 98, 0)),  # 127.5 rounds half to even -> 128; 135/350*255 = 98.36
        (40, (132, 128, 128)),  # 132.47; 127.5 -> 128; 127.5 -> 128
        (80, (137, 157, 255)),  # 215/350*255 = 156.6
        (215, (154, 255, 255)),
        (1024, (255, 255, 255)),
        (3071, (255, 255, 255)),
    ],
)
def test_ct_window_exact_values(hu, rgb):
    out = ct_to_rgb(np.array([[hu]], np.float32))
    assert out.dtype == np.uint8 and out.shape == (1, 1, 3)
    assert tuple(int(v) for v in out[0, 0]) == rgb


def test_ct_windows_match_an_independent_reference_on_every_integer_hu():
    hu = np.arange(-2048, 3072, dtype=np.float32).reshape(64, 80)
    out = ct_to_rgb(hu)
    for channel, (low, high) in enumerate(MEDGEMMA_CT_WINDOWS):
        reference = np.round((np.clip(hu.astype(np.float64), low, high) - low) / (high - low) * 255.0)
        # float32 arithmetic (as in the official notebook) may only differ at exact .5 ties
        assert np.max(np.abs(out[..., channel].astype(int) - reference.astype(int))) <= 1
        assert np.mean(out[..., channel] == reference) > 0.995


def test_ct_to_rgb_keeps_leading_axes():
    vol = np.zeros((5, 7, 9), np.float32)
    assert ct_to_rgb(vol).shape == (5, 7, 9, 3)


def test_minmax_and_empty_range():
    values = np.array([[10.0, 20.0], [30.0, 50.0]])
    assert minmax_to_uint8(values, 10, 50).tolist() == [[0, 64], [128, 255]]
    assert minmax_to_uint8(np.full((2, 2), 7.0), 7, 7).tolist() == [[0, 0], [0, 0]]
    assert window_to_uint8(np.array([-5.0, 105.0]), 0, 100).tolist() == [0, 255]


def test_linear_voi_follows_dicom_formula():
    # PS3.3 C.11.2.1.2.1: c=2048, w=4096 -> x <= c-0.5-(w-1)/2 is 0, x > c-0.5+(w-1)/2 is max
    voi = WindowVOI(2048, 4096)
    x = np.array([0.0, 0.5, 2047.5, 4095.0])
    expected = np.clip((x - 2047.5) / 4095 + 0.5, 0, 1)
    assert np.allclose(apply_voi(x, voi), expected)


def test_voi_matches_pydicom_windowing():
    """Our [0, 1] windows equal pydicom's apply_windowing rescaled from its output range."""
    from pydicom.dataset import Dataset
    from pydicom.pixels import apply_windowing

    x = np.linspace(-200, 4300, 901)
    for function in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        ds = Dataset()
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsStored, ds.PixelRepresentation = 12, 0
        ds.WindowCenter, ds.WindowWidth, ds.VOILUTFunction = 1500, 1000, function
        theirs = apply_windowing(x.copy(), ds) / 4095.0
        ours = apply_voi(x, WindowVOI(1500, 1000, function))
        assert np.allclose(ours, theirs, atol=1e-6), function


def test_table_voi_normalises_to_the_table_range():
    table = np.array([100.0, 200.0, 300.0, 400.0])
    voi = TableVOI(first_mapped=-2, table=table)
    out = apply_voi(np.array([-10.0, -2.0, -1.0, 0.0, 1.0, 50.0]), voi)
    assert np.allclose(out, [0, 0, 1 / 3, 2 / 3, 1, 1])
