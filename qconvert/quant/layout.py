"""Moving a weight's channel axis to the front and back: [.., C, ..] <-> rows [C, n] (or blocks of it)."""

from __future__ import annotations

import numpy as np


def to_rows(array: np.ndarray, axis: int | None, block: int = 0) -> np.ndarray:
    """[..., C (at axis), ...] -> [C, n]; axis None gives one row holding the whole tensor. With `block` B:
    rows of B consecutive values along `axis` instead, [n·C/B, B], ordered by the other axes first."""
    if axis is None:
        return array.reshape(1, -1)
    if block:
        return np.moveaxis(array, axis, -1).reshape(-1, block)
    return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)


def from_rows(rows: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int = 0) -> np.ndarray:
    """The inverse of `to_rows`."""
    if axis is None:
        return rows.reshape(shape)
    if block:
        return np.moveaxis(rows.reshape(*shape[:axis], *shape[axis + 1 :], shape[axis]), -1, axis)
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return np.moveaxis(rows.reshape(moved), 0, axis)


def per_block(values: np.ndarray, shape: tuple[int, ...], axis: int, block: int) -> np.ndarray:
    """One value per row of `to_rows(array, axis, block)` laid out as the array with `axis` cut to C/B (the
    shape of a blocked DequantizeLinear's scale)."""
    return np.moveaxis(values.reshape(*shape[:axis], *shape[axis + 1 :], shape[axis] // block), -1, axis)


def snr_db(reference: np.ndarray, approximation: np.ndarray) -> float | None:
    """10·log10(signal power / error power); None when the two are identical."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approximation.astype(np.float64)) ** 2))
    if noise == 0.0:
        return None
    signal = float(np.sum(ref * ref))
    return 10.0 * np.log10(signal / noise) if signal > 0 else float("-inf")
