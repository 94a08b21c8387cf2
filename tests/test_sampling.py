"""The 85-slice equidistant sampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medlens.prep import MEDGEMMA_MAX_SLICES, sample_indices


def test_limit_is_85():
    assert MEDGEMMA_MAX_SLICES == 85


@pytest.mark.parametrize("n", [1, 5, 84, 85])
def test_short_volumes_keep_every_slice(n):
    assert sample_indices(n) == list(range(n))


@pytest.mark.parametrize("n", [86, 87, 100, 170, 300, 1000, 4097])
def test_long_volumes_take_85_equidistant_slices_with_ends(n):
    idx = sample_indices(n)
    assert len(idx) == 85
    assert idx[0] == 0 and idx[-1] == n - 1
    assert all(b > a for a, b in itertools.pairwise(idx))
    step = (n - 1) / 84
    assert np.max(np.abs(np.array(idx) - np.arange(85) * step)) <= 0.5


def test_known_example():
    assert sample_indices(300)[:5] == [0, 4, 7, 11, 14]  # 299/84 = 3.56 per step


def test_custom_limit_and_bad_input():
    assert sample_indices(10, 3) == [0, 4, 9]  # 4.5 rounds half to even
    assert sample_indices(10, 1) == [5]
    with pytest.raises(ValueError):
        sample_indices(0)
