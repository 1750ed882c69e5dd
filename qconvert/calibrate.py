"""Activation ranges from calibration data: one onnxruntime pass, bounded memory per tensor."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from qconvert.plan import CalibrationMethod
from qconvert.rewrite import NameSource, add_after
from qconvert.validate import Feeds, run_batches, run_with_outputs, session

SAMPLE_PER_TENSOR = 1 << 16  # values kept per tensor for percentiles


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

    Min/max are reduced in the graph. For percentiles the tensors are exposed as extra graph outputs of
    a copy of the model, and each batch adds a bounded random sample of its values.
    """
    if method is CalibrationMethod.MINMAX:
        return _min_max(model, tensors, feeds)
    samples: dict[str, list[np.ndarray]] = {t: [] for t in tensors}
    rng = np.random.default_rng(seed)
    for outputs in run_with_outputs(model, tensors, feeds, "model for calibration"):
        for name, values in outputs.items():
            flat = np.asarray(values, np.float32).reshape(-1)
            if flat.size == 0:
                continue
            take = min(flat.size, SAMPLE_PER_TENSOR // max(1, len(feeds.batches)))
            samples[name].append(rng.choice(flat, size=take, replace=False) if take < flat.size else flat.copy())
    ranges = {}
    for name, sample in samples.items():
        if not sample:
            continue
        values = np.concatenate(sample)
        ranges[name] = (float(np.percentile(values, 100 - percentile)), float(np.percentile(values, percentile)))
    return ranges


def _min_max(model: onnx.ModelProto, tensors: list[str], feeds: Feeds) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor, reduced in the graph right after its producer: only scalars come
    back, and onnxruntime frees every activation as usual (fetching them took 7 GB on ResNet-50)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    fresh = NameSource(probe)
    reduced = {t: (fresh(f"{t}_qc_min"), fresh(f"{t}_qc_max")) for t in dict.fromkeys(tensors)}
    nodes = {t: [helper.make_node("ReduceMin", [t], [lo], keepdims=0), helper.make_node("ReduceMax", [t], [hi], keepdims=0)]
             for t, (lo, hi) in reduced.items()}
    first_outputs = {n.output[0] for n in probe.graph.node if n.output}
    add_after(probe.graph, {t: (None, n) for t, n in nodes.items() if t in first_outputs})
    probe.graph.node.extend(n for t, pair in nodes.items() if t not in first_outputs for n in pair)  # graph inputs, second outputs
    names = [name for pair in reduced.values() for name in pair]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    sess = session(probe.SerializeToString(), "model for calibration", probe=True)
    del probe
    lo = {t: np.inf for t in reduced}
    hi = {t: -np.inf for t in reduced}
    for batch in run_batches(sess, feeds, "model for calibration", output_names=names):
        values = dict(zip(names, batch))
        for t, (low, high) in reduced.items():
            lo[t], hi[t] = min(lo[t], float(values[low])), max(hi[t], float(values[high]))
    return {t: (lo[t], hi[t]) for t in reduced if np.isfinite(lo[t])}
