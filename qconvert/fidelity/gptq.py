"""Error-compensating rounding (GPTQ, Frantar et al. 2022, after OBQ): a layer's weights are rounded one input
column at a time, and each column's rounding error is pushed onto the columns not yet rounded through the
inverse of the input second moments H = Σ x xᵀ, so that the layer's output error ‖(W − Ŵ) x‖² stays small
where plain rounding lets the errors of correlated inputs add up.

The weights come as [G, R, C] (groups, output rows, input columns: a Conv's Cin/G·kh·kw patch), H as
[G, C, C]; `levels` gives each row the values it may take (a linear grid or a k-means codebook), so the same
compensation serves every method that can say its levels.
"""

from __future__ import annotations

import numpy as np

DAMPING = 0.01  # of H's mean diagonal, added to it: keeps the inverse stable where inputs barely vary
BLOCK = 128  # columns whose updates are applied together (the same result, fewer passes over the weights)


def compensate(weights: np.ndarray, hessian: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The weights [G, R, C] rounded to `levels` ([G, R, L] or broadcastable, each row sorted) column by
    column in order of decreasing input energy, the error pushed onto the rest. Inputs that were always
    zero (H's diagonal 0) take plain rounding and push nothing."""
    groups, rows, columns = weights.shape
    h = np.array(hessian, np.float64)
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    dead = diagonal <= 0
    h[:, np.arange(columns), np.arange(columns)] += np.where(dead, 1.0, 0.0)
    order = np.argsort(-np.diagonal(h, axis1=1, axis2=2), axis=1, kind="stable")  # [G, C]
    h = np.take_along_axis(np.take_along_axis(h, order[:, :, None], 1), order[:, None, :], 2)
    upper = _inverse_cholesky(h)  # [G, C, C]: H⁻¹ = UᵀU
    w = np.take_along_axis(np.asarray(weights, np.float64), order[:, None, :], 2)
    rounding = _Rounding(np.broadcast_to(levels, (groups, rows, np.shape(levels)[-1])))
    out = np.empty_like(w)
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        errors = np.empty((groups, rows, end - start))
        for i in range(start, end):
            column = w[:, :, i]
            out[:, :, i] = rounded = rounding(column)
            error = (column - rounded) / upper[:, i, i][:, None]
            w[:, :, i:end] -= error[:, :, None] * upper[:, None, i, i:end]
            errors[:, :, i - start] = error
        w[:, :, end:] -= errors @ upper[:, start:end, end:]
    result = np.empty_like(out)
    np.put_along_axis(result, np.broadcast_to(order[:, None, :], out.shape), out, 2)
    return result


def _inverse_cholesky(h: np.ndarray) -> np.ndarray:
    """Upper U with UᵀU = (H + damping)⁻¹ per group; more damping where H is not positive definite enough."""
    columns = h.shape[1]
    mean = np.maximum(np.mean(np.diagonal(h, axis1=1, axis2=2), axis=1), 1e-12)[:, None, None]
    eye = np.eye(columns)[None]
    for damping in (DAMPING, 0.1, 1.0):
        try:
            lower = np.linalg.cholesky(np.linalg.inv(h + damping * mean * eye))
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

    def __call__(self, values: np.ndarray) -> np.ndarray:
        if self.uniform:
            count = np.rint((values - self.low) / np.where(self.step > 0, self.step, 1.0))
            return self.low + np.clip(count, 0, self.top) * self.step
        index = np.sum(values[..., None] > self.mids, axis=-1)
        return np.take_along_axis(self.levels, index[..., None], -1)[..., 0]
