"""The linear method: DequantizeLinear weights, and QDQ activations with calibration data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from qconvert import qdq
from qconvert.calibrate import activation_ranges
from qconvert.errors import UnsupportedModelError
from qconvert.fold import fold_batchnorm
from qconvert.methods.common import (
    Progress,
    Step,
    calibration_feeds,
    finite,
    in_order,
    join,
    readers_note,
    require_weights,
    select,
)
from qconvert.methods.refine import Quantizer, fold_filter, refiner_for, with_techniques
from qconvert.opset import default_opset, raise_opset
from qconvert.plan import CalibrationMethod, Granularity, LinearPlan, layer_setting
from qconvert.quant.layout import snr_db
from qconvert.report import Histogram, OpsetChange, WeightReport
from qconvert.select import Skipped, Weight

MIN_CALIBRATION_SAMPLES = 16


def linear_step(model: onnx.ModelProto, plan: LinearPlan, progress: Progress, data: Path | None = None, workers: int = 1) -> Step:
    """Integer weights (and activations with --calibration). With `data` (calibration inputs), clipping
    ranges minimise each layer's output error and biases absorb the mean error, where that measurably
    beats min/max grids on the layer's output. `workers` threads share the quantization of big models."""
    details: dict[str, object] = {}
    warnings: list[str] = []
    selection = select(model, plan)
    # Weights-only folds BatchNorm where it costs no accuracy, which the statistics tell. Integer kernels
    # need every one folded: full QDQ folds first, then gathers the statistics and the activation ranges
    # in one pass. There an Add after a MatMul would sit outside the integer kernel: MatMuls keep no bias.
    refiner = None if plan.activations else refiner_for(model, selection.weights, plan, data, progress)
    folded = {}
    if plan.fold_batchnorm:
        where = None if plan.activations else fold_filter(selection.weights, _quantizer(plan), refiner)
        folded = fold_batchnorm(model, where)
        selection = select(model, plan)
    if plan.activations:
        extremes = _calibrated(model, {w.name for w in selection.weights})
        refiner = refiner_for(model, selection.weights, plan, data, progress, matmul_bias=False, extremes=extremes)
    if folded:
        details["folded_batchnorm"] = list(folded)
    skipped = list(selection.skipped)
    weights = []
    for weight in finite(selection.weights, skipped):
        if weight.tensor.data_type == onnx.TensorProto.DOUBLE:
            skipped.append(Skipped(weight.name, weight.op_types, "float64: DequantizeLinear cannot output float64", weight.shape))
        else:
            weights.append(weight)
    require_weights(weights, skipped)
    bits_of = {w.name: layer_setting(plan, w.name).bits for w in weights}
    axes = {w.name: linear_axis(w, layer_setting(plan, w.name).granularity) for w in weights}
    int4 = 4 in bits_of.values()

    before = default_opset(model)
    needed = linear_opset(weights, axes, set(bits_of.values()))
    note = None
    if before < needed:
        try:
            model = raise_opset(model, needed, keep_input=False)
        except UnsupportedModelError as e:
            hint = "; --bits 8 needs a lower one, and qconvert kmeans --bits 4 falls back to packed indices" if int4 else ""
            raise UnsupportedModelError(f"{'int4' if int4 else 'per-channel'} DequantizeLinear needs opset {needed}: {e}{hint}") from e
        note = f"opset raised from {before} to {needed} for {'int4' if int4 else 'per-channel'} DequantizeLinear"
        selection = select(model, plan)
        weights = [w for w in selection.weights if w.name in axes]

    if refiner is not None:
        refiner.bind(model, weights)
    if plan.activations:  # before the weights are quantized: the pass then has their memory to itself
        assert plan.calibration is not None
        if refiner and data == plan.calibration and plan.calibration_method is CalibrationMethod.MINMAX:
            ranges, samples = refiner.ranges, refiner.samples  # gathered with the statistics
        else:
            feeds = calibration_feeds(model, plan.calibration, plan.preprocessing)
            progress("calibrating activation ranges")
            ranges = activation_ranges(model, _calibrated(model, {w.name for w in weights}), feeds,
                                       method=plan.calibration_method, percentile=plan.percentile)
            samples = feeds.samples
            del feeds
        if samples < MIN_CALIBRATION_SAMPLES:
            warnings.append(f"only {samples} calibration samples; activation ranges may not generalize (use {MIN_CALIBRATION_SAMPLES}+)")

    def quantized(weight: Weight) -> tuple[qdq.LinearWeight, qdq.LinearWeight | None]:
        array = weight.array()
        settings = {"bits": bits_of[weight.name], "symmetric": plan.symmetric, "axis": axes[weight.name][0]}
        importance = refiner.importance(weight) if refiner else None
        return (qdq.quantize_weight(weight, array, **settings),  # type: ignore[arg-type]
                None if importance is None else qdq.quantize_weight(weight, array, **settings, importance=importance, keep=False))  # type: ignore[arg-type]

    plain, refined = {}, {}
    results = in_order(quantized, [(w,) for w in weights], workers, sum(w.elements for w in weights))
    for i, (weight, (plain_item, refined_item)) in enumerate(zip(weights, results)):
        progress(f"quantized {i + 1}/{len(weights)}: {weight.name}")
        plain[weight.name] = plain_item
        if refined_item is not None:
            refined[weight.name] = refined_item
    decisions = {}
    if refiner is not None:
        progress("checking each layer's output on the calibration data")
        by_name = {w.name: w for w in weights}
        decisions = refiner.decide(model, {w.name: (plain[w.name].dequantized, refined[w.name].dequantized if w.name in refined else None)
                                           for w in weights}, lambda name: by_name[name].array())
        details["calibration"] = refiner.summary(decisions)
    items = {}
    reports = []
    histograms = []
    for weight in weights:
        decision = decisions.get(weight.name)
        item = refined[weight.name] if decision and decision.refined else plain[weight.name]
        items[weight.name] = item
        array = weight.array()
        report = linear_report(weight, array, item, join(axes[weight.name][1], decision.note if decision else None))
        reports.append(with_techniques(report, weight.name in folded.values(), decision))
        histograms.append(linear_histogram(weight.name, array, item))
    storage = ", ".join(sorted({np.dtype(item.storage).name for item in items.values()}))
    opset = OpsetChange(before, max(before, needed), storage, note)

    if not plan.activations:
        if refiner is not None:
            refiner.apply_shifts(model, decisions)
        qdq.insert_weight_dq(model, list(items.values()))
        details["runtime"] = ("weights-only: integer weights stay small in memory, but onnxruntime dequantizes "
                              "them at every run (slower than float)")
        return Step(model, opset, reports, skipped, warnings, details, histograms)

    names = set(items)
    if refiner is not None:
        refiner.apply_shifts(model, decisions)  # after the ranges: those are the float model's
    qdq.insert_weight_dq(model, list(items.values()))
    absorbed = qdq.absorb_activations(model, names)
    tensors = [t for t in qdq.activation_tensors(model, names) if t in ranges]
    count = qdq.insert_activation_qdq(model, {t: ranges[t] for t in tensors}, items)
    details.update(
        calibration_samples=samples,
        activations_quantized=count,
        activations_absorbed=absorbed,
        runtime="full QDQ: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv, QGemm ...)",
    )
    if int4:
        warnings.append("int4 weights in a full QDQ graph are not fused into integer kernels by onnxruntime; int8 runs faster")
    return Step(model, opset, reports, skipped, warnings, details, histograms)


def _calibrated(model: onnx.ModelProto, quantized: set[str]) -> list[str]:
    """The activations whose ranges full QDQ will use: all but those absorbed into their producer."""
    absorbed = qdq.absorbed_tensors(model, quantized)
    return [t for t in qdq.activation_tensors(model, quantized) if t not in absorbed]


def _quantizer(plan: LinearPlan) -> Quantizer:
    def quantizer(weight: Weight, importance: np.ndarray | None) -> tuple[int | None, Callable[[np.ndarray], np.ndarray]]:
        setting = layer_setting(plan, weight.name)
        axis = linear_axis(weight, setting.granularity)[0]
        return axis, lambda values: qdq.quantize_weight(weight, values, bits=setting.bits, symmetric=plan.symmetric, axis=axis,
                                                        importance=importance).dequantized()

    return quantizer


def linear_axis(weight: Weight, granularity: Granularity) -> tuple[int | None, str | None]:
    """The scale axis for a weight, and why it differs from what was asked, if it does."""
    axis = weight.channel_axis
    if granularity is not Granularity.PER_TENSOR:  # per channel, or auto: a scale per channel always pays
        return axis, None if axis is not None else "per-tensor: its consumers disagree on the channel axis"
    if weight.depthwise and axis is not None:
        return axis, "per-channel: depthwise kernels lose badly under one scale per tensor"
    return None, None


def linear_opset(weights: list[Weight], axes: dict[str, tuple[int | None, str | None]], bits: set[int]) -> int:
    """The opset DequantizeLinear needs for these weights: per-axis 13, typed scales 19, int4 21."""
    return max(
        10,
        13 if any(axis is not None for axis, _ in axes.values()) else 10,
        19 if any(w.tensor.data_type != onnx.TensorProto.FLOAT for w in weights) else 10,
        21 if 4 in bits else 10,
    )


def linear_report(weight: Weight, array: np.ndarray, item: qdq.LinearWeight, note: str | None) -> WeightReport:
    return WeightReport(
        name=weight.name, source=weight.source, graph=weight.graph_path, consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape), elements=weight.elements, dtype=str(array.dtype), bits=item.bits,
        granularity=(Granularity.PER_TENSOR if item.axis is None else Granularity.PER_CHANNEL).value, channel_axis=item.axis,
        groups=item.grid.scale.size, float_bytes=array.nbytes, stored_bytes=qdq.stored_bytes(item),
        snr_db=snr_db(array, item.dequantized()), note=join(note, readers_note(weight)),
    )


def linear_histogram(name: str, array: np.ndarray, item: qdq.LinearWeight) -> Histogram:
    grid = item.grid
    levels = (np.arange(grid.qmin, grid.qmax + 1)[None, :] - grid.zero_point[:, None]) * grid.scale[:, None]
    return Histogram.of(name, array, levels, rows=grid.scale.size)
