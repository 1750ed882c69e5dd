"""Full QDQ: quantized activations around the integer weights, so that onnxruntime runs integer kernels.

The driver calls these in order: `statistics` (after BatchNorm folding: input moments and the min/max
of the activations in one pass), `ranges` (before the weights are quantized: the pass then has their
memory to itself), `insert` (after the weights are encoded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from qconvert import calibrate, qdq
from qconvert.methods.base import Progress
from qconvert.methods.refine import Refiner, refiner_for
from qconvert.plan import CalibrationMethod, LinearPlan
from qconvert.quant.layout import snr_db
from qconvert.runtime import Feeds, calibration_feeds, model_session, run_batches
from qconvert.select import Weight

MIN_CALIBRATION_SAMPLES = 16
RUNTIME = (
    "full QDQ: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv, QGemm ...)"
)


class Ranges(NamedTuple):
    found: dict[str, tuple[float, float]]  # per tensor (min, max)
    samples: int  # the calibration samples they come from
    rule: str  # what gave them (minmax, percentile P, or for `auto` the rule its trial chose)
    trial: Trial | None = None  # `auto`: the rules' ranges are tried on held-out samples once the weights are in


@dataclass
class Trial:
    """`--calibration-method auto`: ranges by each rule from the even calibration samples, tried in the
    quantized model on the odd ones (samples they did not come from) against the float model's outputs
    there; the rule that does best gives the ranges, from all samples."""

    parts: dict[str, list[calibrate.Part]]  # per tensor and sample
    held: Feeds  # the odd samples
    reference: list[np.ndarray]  # the float model's outputs on them
    rules: tuple[str, ...] = ("minmax", "percentile 99.999", "percentile 99.99", calibrate.PER_TENSOR)

    def run(
        self, model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], signed: bool
    ) -> tuple[str, dict[str, float | None]]:
        """The best rule on the held-out samples (the first on a tie), and each rule's output SNR there."""
        measured: dict[str, float | None] = {}
        for rule in self.rules:
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            qdq.insert_activation_qdq(trial, calibrate.ranges_by(self.parts, rule, slice(0, None, 2)), weights, signed)
            outputs = [np.concatenate(o) for o in zip(*run_batches(model_session(trial, "trial"), self.held, "trial"))]
            snrs = [snr_db(r, o) for r, o in zip(self.reference, outputs)]
            measured[rule] = None if all(v is None for v in snrs) else min(v for v in snrs if v is not None)
        ranked = sorted(self.rules, key=lambda r: -np.inf if measured[r] is None else -measured[r])  # type: ignore[operator]
        return ranked[0], measured


def statistics(
    model: onnx.ModelProto, weights: list[Weight], plan: LinearPlan, data: Path | None, progress: Progress
) -> Refiner | None:
    """The data-aware techniques' statistics, and in the same pass the ranges of the activations that will
    be quantized. A MatMul keeps no bias here: an Add after it would sit outside the integer kernel."""
    extremes = calibrated(model, {w.name for w in weights}, plan.activation_type == "int8")
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
    else from a pass of their own over the calibration data (for `auto`, with the float model's outputs
    on the held-out samples)."""
    assert plan.calibration is not None
    method = plan.calibration_method
    if refiner and data == plan.calibration and method is CalibrationMethod.MINMAX:
        return _warned(Ranges(refiner.ranges, refiner.samples, "minmax"), warnings)
    feeds = calibration_feeds(model, plan.calibration, plan.preprocessing)
    progress("calibrating activation ranges")
    tensors = calibrated(model, {w.name for w in weights}, plan.activation_type == "int8")
    if method is CalibrationMethod.MINMAX:
        found = calibrate.activation_ranges(model, tensors, feeds, method=method)
        return _warned(Ranges(found, feeds.samples, "minmax"), warnings)
    parts = calibrate.sample_parts(model, tensors, feeds)
    if method is CalibrationMethod.PERCENTILE or len(feeds.batches) < 2:
        rule = f"percentile {plan.percentile:g}" if method is CalibrationMethod.PERCENTILE else calibrate.PER_TENSOR
        return _warned(Ranges(calibrate.ranges_by(parts, rule), feeds.samples, rule), warnings)
    held = Feeds(feeds.batches[1::2], len(feeds.batches[1::2]), feeds.source)
    reference = [np.concatenate(o) for o in zip(*run_batches(model_session(model, "float model"), held, "float model"))]
    trial = Trial(parts, held, reference)
    return _warned(Ranges({}, feeds.samples, "auto", trial), warnings)


def _warned(found: Ranges, warnings: list[str]) -> Ranges:
    if found.samples < MIN_CALIBRATION_SAMPLES:
        warnings.append(
            f"only {found.samples} calibration samples; activation ranges may not generalize "
            f"(use {MIN_CALIBRATION_SAMPLES}+)"
        )
    return found


def insert(
    model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], found: Ranges, signed: bool = False
) -> dict[str, object]:
    """Relu/Clip(0, x) absorbed into the range of the op before them, Quantize/DequantizeLinear pairs on
    the activations, int32 biases; returns what the report's details say of it."""
    names = set(weights)
    absorbed = 0 if signed else qdq.absorb_activations(model, names)
    rule, ranges_of, details = found.rule, found.found, {}
    if found.trial is not None:
        rule, measured = found.trial.run(model, weights, signed)
        ranges_of = calibrate.ranges_by(found.trial.parts, rule)
        details = {"held_out_samples": found.trial.held.samples, "held_out_snr_db": measured}
    tensors = [t for t in qdq.activation_tensors(model, names) if t in ranges_of]
    count = qdq.insert_activation_qdq(model, {t: ranges_of[t] for t in tensors}, weights, signed)
    return {
        "calibration_samples": found.samples,
        "activations_quantized": count,
        "activations_absorbed": absorbed,
        "activation_ranges": {"rule": rule, **details},
        "runtime": RUNTIME,
    }


def calibrated(model: onnx.ModelProto, quantized: set[str], signed: bool = False) -> list[str]:
    """The activations whose ranges full QDQ will use: all but those absorbed into their producer (uint8
    only: a range from 0 does the Relu's work; a symmetric int8 range keeps the negative values)."""
    absorbed = set() if signed else qdq.absorbed_tensors(model, quantized)
    return [t for t in qdq.activation_tensors(model, quantized) if t not in absorbed]
