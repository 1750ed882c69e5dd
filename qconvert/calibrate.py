"""Activation ranges from calibration data: one onnxruntime pass, bounded memory per tensor."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from qconvert.plan import CalibrationMethod
from qconvert.validate import Feeds, run_with_outputs

SAMPLE_PER_TENSOR = 1 << 16  # values kept per tensor for percentiles (min and max are exact)


@dataclass
class _Stats:
    lo: float = np.inf
    hi: float = -np.inf
    sample: list[np.ndarray] = field(default_factory=list)


def activation_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: Feeds,
    *,
    method: CalibrationMethod,
    percentile: float = 99.999,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Range [lo, hi] of each named float tensor over the calibration feeds (its min/max, or percentiles).

    The tensors are exposed as extra graph outputs of a copy of the model; each batch's values are
    folded into running min/max plus a bounded random sample, never kept whole.
    """
    stats = {t: _Stats() for t in tensors}
    rng = np.random.default_rng(seed)
    for outputs in run_with_outputs(model, tensors, feeds, "model for calibration"):
        for name, values in outputs.items():
            flat = np.asarray(values, np.float32).reshape(-1)
            if flat.size == 0:
                continue
            s = stats[name]
            s.lo, s.hi = min(s.lo, float(flat.min())), max(s.hi, float(flat.max()))
            if method is CalibrationMethod.PERCENTILE:
                take = min(flat.size, SAMPLE_PER_TENSOR // max(1, len(feeds.batches)))
                s.sample.append(rng.choice(flat, size=take, replace=False) if take < flat.size else flat.copy())
    ranges = {}
    for name, s in stats.items():
        if not np.isfinite(s.lo):
            continue
        if method is CalibrationMethod.PERCENTILE and s.sample:
            values = np.concatenate(s.sample)
            ranges[name] = (float(np.percentile(values, 100 - percentile)), float(np.percentile(values, percentile)))
        else:
            ranges[name] = (s.lo, s.hi)
    return ranges
