"""Error-compensating rounding (GPTQ, Frantar et al. 2022, after OBQ): a layer's weights are rounded one input
column at a time, and each column's rounding error is pushed onto the columns not yet rounded through the
inverse of the input second moments H = Σ x xᵀ, so that the layer's output error ‖(W − Ŵ) x‖² stays small
where plain rounding lets the errors of correlated inputs add up.

The weights come as [G, R, C] (groups, output rows, input columns: a Conv's Cin/G·kh·kw patch), H as
[G, C, C]; `levels` gives each row the values it may take (a linear grid or a k-means codebook), so the same
compensation serves every method that can say its levels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# At 8 bits rounding error is small beside the rest: on ResNet-50-shaped full QDQ GPTQ gained 0.1 dB (40.4 ->
# 40.5) for 3x the time and 2.5x the memory; on the PP-OCRv4 recognizer's k-means 8, nothing. Wider weights
# keep plain rounding.
MAX_BITS = 4
DAMPING = 0.01  # of H's mean diagonal, added to it: keeps the inverse stable where inputs barely vary
BLOCK = 128  # columns whose updates are applied together (the same result, fewer passes over the weights)
REFIT_FLOPS = 4e10  # codebooks are refitted where the least squares cost at most this (about a second)
REFIT_CHUNK = 1 << 22  # one-hot values made at once


@dataclass(frozen=True)
class Factor:
    """What the rounding needs of H, computed once per layer: the column order and U with UᵀU = H⁻¹."""

    order: np.ndarray  # [G, C]: columns by decreasing input energy
    upper: np.ndarray  # [G, C, C], in that order


def factor(hessian: np.ndarray) -> Factor:
    """H's columns ordered by decreasing diagonal (inputs that were always zero get 1 there: they push
    nothing), damped, inverted and factored."""
    columns = hessian.shape[1]
    h = np.array(hessian, np.float64)
    diagonal = h[:, np.arange(columns), np.arange(columns)]
    h[:, np.arange(columns), np.arange(columns)] = np.where(diagonal <= 0, 1.0, diagonal)
    order = np.argsort(-h[:, np.arange(columns), np.arange(columns)], axis=1, kind="stable")
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], 1), order[:, None, :], 2)
    return Factor(order, _inverse_cholesky(h))


@dataclass(frozen=True)
class ElementGrids:
    """A uniform grid per weight, low + k·step for k = 0..top (`low` and `step` [G, R, C], as the weights): where
    scales change along the input columns (a scale per block of them)."""

    low: np.ndarray
    step: np.ndarray
    top: int

    def ordered(self, order: np.ndarray) -> ElementGrids:
        """The grids with their columns in `order` ([G, C])."""
        low, step = (np.take_along_axis(a, order[:, None, :], 2) for a in (self.low, self.step))
        return ElementGrids(low, step, self.top)

    def round(self, column: np.ndarray, i: int) -> np.ndarray:
        low, step = self.low[:, :, i], self.step[:, :, i]
        return low + np.clip(np.rint((column - low) / step), 0, self.top) * step


def compensate(weights: np.ndarray, hessian: np.ndarray | Factor, levels: np.ndarray | ElementGrids) -> np.ndarray:
    """The weights [G, R, C] rounded to `levels` ([G, R, L] or broadcastable, each row sorted; or a grid per
    weight) column by column in order of decreasing input energy, the error pushed onto the rest through H (or
    its `factor`)."""
    groups, rows, columns = weights.shape
    factored = hessian if isinstance(hessian, Factor) else factor(hessian)
    order, upper = factored.order, factored.upper
    w = np.take_along_axis(np.asarray(weights, np.float64), order[:, None, :], 2)
    rounding: Callable[[np.ndarray, int], np.ndarray]
    if isinstance(levels, ElementGrids):
        rounding = levels.ordered(order).round
    else:
        per_row = _Rounding(np.broadcast_to(levels, (groups, rows, np.shape(levels)[-1])))
        rounding = lambda column, _: per_row(column)  # noqa: E731
    out = np.empty_like(w)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        errors = np.empty((groups, rows, end - start))
        for i in range(start, end):
            column = w[:, :, i]
            out[:, :, i] = rounded = rounding(column, i)
            error = (column - rounded) / upper[:, i, i][:, None]
            w[:, :, i:end] -= error[:, :, None] * upper[:, None, i, i:end]
            errors[:, :, i - start] = error
        w[:, :, end:] -= errors @ upper[:, start:end, end:]
    result = np.empty_like(out)
    np.put_along_axis(result, np.broadcast_to(order[:, None, :], out.shape), out, 2)
    return result


def palette(
    weights: np.ndarray, hessian: np.ndarray, levels: np.ndarray, owner: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Compensated rounding to a free codebook (`levels` [1, 1, L] shared, or [G, R, L] per row, rows sharing
    a codebook where `owner` says so), the codebook refitted to the assignments it gave (`refit`), then
    compensated rounding again: (levels, values)."""
    factored = factor(hessian)
    rounded = compensate(weights, factored, levels)
    groups, rows, columns = weights.shape
    if groups * rows * columns**2 * levels.shape[-1] > REFIT_FLOPS:
        return levels, rounded
    fitted = np.sort(refit(weights, hessian, levels, rounded, owner), axis=-1)
    return fitted, compensate(weights, factored, fitted)


def refit(
    weights: np.ndarray, hessian: np.ndarray, levels: np.ndarray, rounded: np.ndarray, owner: np.ndarray | None = None
) -> np.ndarray:
    """The codebook values that minimise the layer's output error Σ (w − ŵ)ᵀ H (w − ŵ) with every weight
    keeping its entry: least squares over the entries, M c = b with M = Σ Sᵀ H S and b = Σ Sᵀ H w over the
    rows of each codebook (S [C, L]: a row's one-hot assignment); an entry nothing uses keeps its value.
    Codebooks: one if `levels` is [1, 1, L], else one per row, or per `owner` value ([G·R]) of the rows."""
    groups, rows, columns = weights.shape
    count = levels.shape[-1]
    per_row = np.broadcast_to(levels, (groups, rows, count))
    shared = levels.shape[0] == levels.shape[1] == 1
    if shared:
        owner = np.zeros(groups * rows, np.intp)
    elif owner is None:
        owner = np.arange(groups * rows)
    codebooks = int(owner.max()) + 1
    index = _Rounding(per_row).index(rounded)  # [G, R, C]
    system = np.zeros((codebooks, count, count))
    target = np.zeros((codebooks, count))
    old = np.zeros((codebooks, count))
    old[owner] = per_row.reshape(-1, count)
    step = max(1, REFIT_CHUNK // (columns * count))
    for g in range(groups):
        for start in range(0, rows, step):
            part = slice(start, start + step)
            one_hot = (index[g, part].T[:, :, None] == np.arange(count)).astype(np.float64)  # [C, r, L]
            spread = (hessian[g] @ one_hot.reshape(columns, -1)).reshape(one_hot.shape)  # H S, all rows at once
            at = owner[g * rows + start : g * rows + start + one_hot.shape[1]]
            np.add.at(system, at, np.einsum("crk,crl->rkl", one_hot, spread))  # Sᵀ H S
            np.add.at(target, at, np.einsum("crl,rc->rl", spread, weights[g, part]))  # Sᵀ H w (H symmetric)
    ridge = 1e-9 * np.maximum(np.trace(system, axis1=1, axis2=2), 1e-30)[:, None] + (
        np.diagonal(system, axis1=1, axis2=2) == 0
    )
    solved = np.linalg.solve(system + ridge[:, :, None] * np.eye(count), (target + ridge * old)[..., None])[..., 0]
    return solved.reshape(levels.shape) if shared else solved[owner].reshape(groups, rows, count)


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper U with UᵀU = (H + damping)⁻¹ per group; more damping where H is not positive definite enough."""
    columns = h.shape[1]
    diagonal = (np.arange(columns), np.arange(columns))
    mean = np.maximum(np.mean(h[:, diagonal[0], diagonal[1]], axis=1), 1e-12)[:, None]
    added = 0.0
    for damping in (DAMPING, 0.1, 1.0):
        h[:, diagonal[0], diagonal[1]] += (damping - added) * mean
        added = damping
        try:
            lower = np.linalg.cholesky(np.linalg.inv(h))
        except np.linalg.LinAlgError:
            continue
        if np.all(np.isfinite(lower)):
            return np.ascontiguousarray(np.swapaxes(lower, 1, 2))
    raise np.linalg.LinAlgError("input second moments too ill-conditioned to invert")


class _Rounding:
    """Nearest of each row's levels, for one column of values [G, R] at a time."""

    def __init__(self, levels: np.ndarray) -> None:
        self.levels = np.asarray(levels, np.float64)
        steps = np.diff(self.levels, axis=-1)
        self.low = self.levels[..., 0]
        self.step = steps[..., 0] if steps.shape[-1] else np.zeros(self.low.shape)
        # a linear grid (evenly spaced levels) rounds by arithmetic; a codebook by its midpoints
        self.uniform = bool(np.all(np.abs(steps - self.step[..., None]) <= 1e-6 * np.abs(self.step[..., None])))
        self.top = steps.shape[-1]
        self.mids = (self.levels[..., 1:] + self.levels[..., :-1]) / 2

    def index(self, values: np.ndarray) -> np.ndarray:
        """The index of the level nearest each value ([G, R, ...])."""
        extra = values.ndim - self.mids.ndim + 1
        mids = self.mids.reshape(*self.mids.shape[:-1], *[1] * extra, self.mids.shape[-1])
        return np.sum(values[..., None] > mids, axis=-1)

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.uniform:
            count = np.rint((values - self.low) / np.where(self.step > 0, self.step, 1.0))
            return self.low + np.clip(count, 0, self.top) * self.step
        return np.take_along_axis(self.levels, self.index(values)[..., None], -1)[..., 0]
