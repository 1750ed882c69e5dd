"""Full QDQ: quantized activations around the integer weights, so that onnxruntime runs integer kernels.

The driver calls these in order: `statistics` (after BatchNorm folding: input moments and the min/max
of the activations in one pass), `ranges` (before the weights are quantized: the pass then has their
memory to itself), `insert` (after the weights are encoded).
"""

from __future__ import annotations

from pathlib import Path

import onnx

from qconvert import qdq
from qconvert.calibrate import activation_ranges
from qconvert.methods.base import Progress
from qconvert.methods.refine import Refiner, refiner_for
from qconvert.plan import CalibrationMethod, LinearPlan
from qconvert.runtime import calibration_feeds
from qconvert.select import Weight

MIN_CALIBRATION_SAMPLES = 16
RUNTIME = (
    "full QDQ: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv, QGemm ...)"
)
Ranges = tuple[dict[str, tuple[float, float]], int]  # per tensor (min, max), and the samples they come from


def statistics(
    model: onnx.ModelProto, weights: list[Weight], plan: LinearPlan, data: Path | None, progress: Progress
) -> Refiner | None:
    """The data-aware techniques' statistics, and in the same pass the ranges of the activations that will
    be quantized. A MatMul keeps no bias here: an Add after it would sit outside the integer kernel."""
    extremes = calibrated(model, {w.name for w in weights})
    return refiner_for(model, weights, plan, data, progress, matmul_bias=False, extremes=extremes)


def ranges(
    model: onnx.ModelProto,
    weights: list[Weight],
    plan: LinearPlan,
    data: Path | None,
    refiner: Refiner | None,
    progress: Progress,
    warnings: list[str],
) -> Ranges:
    """Activation ranges: those gathered with the statistics when they came from the same data by min/max,
    else from a pass of their own over the calibration data."""
    assert plan.calibration is not None
    if refiner and data == plan.calibration and plan.calibration_method is CalibrationMethod.MINMAX:
        found, samples = refiner.ranges, refiner.samples
    else:
        feeds = calibration_feeds(model, plan.calibration, plan.preprocessing)
        progress("calibrating activation ranges")
        found = activation_ranges(
            model,
            calibrated(model, {w.name for w in weights}),
            feeds,
            method=plan.calibration_method,
            percentile=plan.percentile,
        )
        samples = feeds.samples
    if samples < MIN_CALIBRATION_SAMPLES:
        warnings.append(
            f"only {samples} calibration samples; activation ranges may not generalize (use {MIN_CALIBRATION_SAMPLES}+)"
        )
    return found, samples


def insert(model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], found: Ranges) -> dict[str, object]:
    """Relu/Clip(0, x) absorbed into the range of the op before them, Quantize/DequantizeLinear pairs on
    the activations, int32 biases; returns what the report's details say of it."""
    names = set(weights)
    absorbed = qdq.absorb_activations(model, names)
    ranges_of, samples = found
    tensors = [t for t in qdq.activation_tensors(model, names) if t in ranges_of]
    count = qdq.insert_activation_qdq(model, {t: ranges_of[t] for t in tensors}, weights)
    return {
        "calibration_samples": samples,
        "activations_quantized": count,
        "activations_absorbed": absorbed,
        "runtime": RUNTIME,
    }


def calibrated(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """The activations whose ranges full QDQ will use: all but those absorbed into their producer."""
    absorbed = qdq.absorbed_tensors(model, quantized)
    return [t for t in qdq.activation_tensors(model, quantized) if t not in absorbed]
