"""Linear quantization properties: round-trip error, zero exact, ranges, degenerate rows."""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.quant.linear import clipped_grid, dequantize, grid_for, integer_range, quantize


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_step(bits: int, symmetric: bool) -> None:
    rows = np.random.default_rng(bits).standard_normal((6, 500)).astype(np.float32) * np.arange(1, 7)[:, None]
    grid = grid_for(rows, bits=bits, symmetric=symmetric)
    q = quantize(rows, grid)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    error = np.abs(dequantize(q, grid) - rows)
    assert np.all(error <= grid.scale[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [8, 4])
def test_zero_is_exact_even_when_outside_the_data_range(bits: int, symmetric: bool) -> None:
    rows = np.array([[0.5, 1.0, 2.0, 0.0], [-3.0, -1.0, 0.0, -0.25]], np.float32)
    grid = grid_for(rows, bits=bits, symmetric=symmetric)
    zeros = quantize(np.zeros((2, 1), np.float32), grid)
    np.testing.assert_array_equal(dequantize(zeros, grid), 0.0)
    if symmetric:
        np.testing.assert_array_equal(grid.zero_point, 0)


def test_constant_and_zero_rows() -> None:
    rows = np.array([[0.0, 0.0, 0.0], [2.5, 2.5, 2.5], [-1.0, -1.0, -1.0]], np.float32)
    for symmetric in (True, False):
        grid = grid_for(rows, bits=8, symmetric=symmetric)
        assert np.all(grid.scale > 0)
        np.testing.assert_allclose(dequantize(quantize(rows, grid), grid), rows, rtol=1e-6)


def test_ranges() -> None:
    assert integer_range(8, signed=True) == (-128, 127)
    assert integer_range(8, signed=True, narrow=True) == (-127, 127)
    assert integer_range(4, signed=False) == (0, 15)
    assert integer_range(4, signed=True, narrow=True) == (-7, 7)


def test_given_range_clips_outliers() -> None:
    rows = np.array([[-1.0, 0.0, 0.5, 100.0]], np.float32)
    grid = grid_for(rows, bits=8, symmetric=False, lo=np.array([-1.0]), hi=np.array([1.0]))
    assert dequantize(quantize(rows, grid), grid)[0, -1] == pytest.approx(1.0, abs=float(grid.scale[0]))


def _weighted_error(rows: np.ndarray, grid, weights: np.ndarray) -> np.ndarray:
    return np.sum(weights * (rows - dequantize(quantize(rows, grid), grid)) ** 2, axis=1)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clipping_search_never_loses_to_min_max_and_clips_outliers(symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    rows = rng.laplace(size=(4, 2000)).astype(np.float32)
    rows[:, 0] = 25.0  # one outlier per row stretches the min/max grid
    weights = rng.lognormal(0.0, 1.0, rows.shape)
    plain = grid_for(rows, bits=4, symmetric=symmetric)
    searched = clipped_grid(rows, bits=4, symmetric=symmetric, weights=weights)
    plain_error, searched_error = _weighted_error(rows, plain, weights), _weighted_error(rows, searched, weights)
    assert np.all(searched_error <= plain_error)
    assert np.all(searched_error < 0.8 * plain_error)  # clipping the outlier pays at 4 bits
    assert np.all(searched.scale < plain.scale)


def test_clipping_search_respects_weights() -> None:
    # The outlier's error costs 1e6 times more than the rest: clipping it would be a loss.
    rows = np.concatenate([np.random.default_rng(1).standard_normal((1, 500)), [[30.0]]], axis=1).astype(np.float32)
    weights = np.ones(rows.shape)
    weights[0, -1] = 1e6
    searched = clipped_grid(rows, bits=4, symmetric=True, weights=weights)
    assert searched.scale[0] == grid_for(rows, bits=4, symmetric=True).scale[0]
