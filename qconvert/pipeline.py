"""convert(): load -> select -> palettize -> encode -> check -> validate -> write, as one report."""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np
import onnx

from qconvert import io, qdq, validate
from qconvert.calibrate import activation_ranges
from qconvert.encode import (
    EncodedWeight,
    IndexStorage,
    encode_palettes,
    fallback_storage,
    min_opset,
    preferred_storage,
    stored_bytes,
)
from qconvert.errors import CannotRunError, QConvertError, UnsupportedModelError, UsageError, first_line
from qconvert.fold import fold_batchnorm
from qconvert.gates import Gates
from qconvert.gates import evaluate as evaluate_gates
from qconvert.images import load_images
from qconvert.opset import default_opset, raise_opset
from qconvert.plan import Granularity, KMeansPlan, LinearPlan, Plan, ValidationPlan, layer_setting
from qconvert.quant.kmeans import Palette, palettize_tensor, reconstruct
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import Histogram, OpsetChange, Report, WeightReport
from qconvert.select import Selection, Skipped, Weight, select_weights

Progress = Callable[[str], None]
CALIBRATION_BATCH = 4  # samples per calibration run: activations of a whole batch are held at once
MIN_CALIBRATION_SAMPLES = 16
NO_GATES = Gates()
PARALLEL_MIN_ELEMENTS = 1 << 21  # below this, starting processes costs more than it saves
MIN_OPSET = 7  # Cast takes its type as an int from opset 6 on; onnxruntime supports 7+


@dataclass(frozen=True)
class Conversion:
    """What convert() produced: the report, and the model bytes (written unless no output was asked)."""

    report: Report
    model_bytes: bytes


@dataclass
class Step:
    """What a method's step did to the model (in place, or a converted copy in `model`)."""

    model: onnx.ModelProto
    opset: OpsetChange
    weights: list[WeightReport]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)


def default_output(input_path: Path, plan: Plan) -> Path:
    """model.onnx -> model.kmeans4.onnx, model.kmeans4pc.onnx, model.int8.onnx, model.int4pc-qdq.onnx ..."""
    pc = "pc" if plan.granularity is Granularity.PER_CHANNEL else ""
    if isinstance(plan, KMeansPlan):
        tag = f"kmeans{plan.bits}{pc}"
    else:
        tag = f"int{plan.bits}{pc}{'-qdq' if plan.calibration else ''}"
    return input_path.with_name(f"{input_path.stem}.{tag}.onnx")


def convert(
    input_path: Path,
    output_path: Path | None,
    plan: Plan,
    validation: ValidationPlan | None,
    progress: Progress = lambda _: None,
    gates: Gates = NO_GATES,
    keep_failed: bool = False,
    workers: int = 2,
) -> Conversion:
    """Quantize the model at `input_path` as `plan` says; write it to `output_path` (None: don't write).

    With gates, a model that fails one is not written unless `keep_failed`; the report says which
    gate, the measured value and the limit. `workers` processes share the k-means of big models.
    """
    if gates.any and validation is None:
        raise UsageError("quality gates need validation: drop --no-validate")
    if output_path is not None and output_path.resolve() == input_path.resolve():
        raise UsageError(f"{output_path}: the output would overwrite the input model; choose another -o")
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 4)
        clock = now

    progress("loading")
    model = io.load_model(input_path)
    input_bytes = io.size_on_disk(input_path)
    if default_opset(model) < MIN_OPSET:
        raise UnsupportedModelError(
            f"{input_path}: opset {default_opset(model)} is older than {MIN_OPSET}, the oldest qconvert supports; "
            "convert it first (onnx.version_converter)"
        )
    lap("load")

    if isinstance(plan, KMeansPlan):
        step = _kmeans_step(model, plan, progress, workers)
    else:
        step = _linear_step(model, plan, progress)
    lap("quantize")

    warnings = step.warnings + _check(step.model, input_path)
    model_bytes = step.model.SerializeToString()
    del model, step.model  # only the bytes from here on: a big model must not sit beside onnxruntime's copies
    lap("check")

    result, latency = None, None
    if validation is not None:
        progress("validating under onnxruntime")
        try:
            result, latency = validate.compare(str(input_path), model_bytes, validation)
        except CannotRunError as e:
            if not (validation.allow_unrunnable and e.which == "input model"):
                raise
            warnings.append(f"not validated: {e}")
        lap("validate")

    checks = evaluate_gates(gates, result) if gates.any and result is not None else []
    passed = all(c.passed for c in checks)
    if not passed and output_path is not None and not keep_failed:
        warnings.append("model not written: a quality gate failed (--keep-failed writes it anyway)")
        output_path = None
    if output_path is not None:
        progress("writing")
        io.save_model(model_bytes, output_path)
        io.verify_written(output_path)
        lap("write")
    timings["total"] = round(sum(timings.values()), 4)
    report = Report(
        method=plan.method,
        options=_options(plan, validation),
        input_path=str(input_path),
        input_bytes=input_bytes,
        output_path=str(output_path) if output_path else None,
        output_bytes=len(model_bytes),
        opset=step.opset,
        weights=step.weights,
        skipped=step.skipped,
        validation=result,
        latency_ms=latency,
        gates=checks,
        histograms=step.histograms,
        details=step.details,
        timings=timings,
        warnings=warnings,
    )
    return Conversion(report, model_bytes)


def compare_models(float_path: Path, converted_path: Path, validation: ValidationPlan, gates: Gates = NO_GATES) -> Report:
    """Validation only: the same metrics, latency and gates for two existing models."""
    start = time.perf_counter()
    reference, converted = io.load_model(float_path), io.load_model(converted_path)
    result, latency = validate.compare(str(float_path), converted_path.read_bytes(), validation)
    checks = evaluate_gates(gates, result) if gates.any else []
    return Report(
        method="compare",
        options=_options(None, validation),
        input_path=str(float_path),
        input_bytes=io.size_on_disk(float_path),
        output_path=str(converted_path),
        output_bytes=converted_path.stat().st_size,
        opset=OpsetChange(default_opset(reference), default_opset(converted), "-"),
        weights=[],
        skipped=[],
        validation=result,
        latency_ms=latency,
        gates=checks,
        timings={"total": round(time.perf_counter() - start, 4)},
    )


def _kmeans_step(model: onnx.ModelProto, plan: KMeansPlan, progress: Progress, workers: int) -> Step:
    """Palettize the weights; layers that an override switches to linear get DequantizeLinear instead."""
    selection = _select(model, plan)
    settings = {w.name: layer_setting(plan, w.name) for w in selection.weights}
    palette_bits = {s.bits for s in settings.values() if s.method == "kmeans"}
    linear_weights = [w for w in selection.weights if settings[w.name].method == "linear"]
    linear_axes = {w.name: _linear_axis(w, settings[w.name].granularity) for w in linear_weights}
    linear_bits = {settings[w.name].bits for w in linear_weights}
    linear_needs = _linear_opset(linear_weights, linear_axes, linear_bits) if linear_weights else 1
    model, opset, storages = _prepare_opset(model, plan, palette_bits, linear_needs)
    if opset.after != opset.before:
        selection = _select(model, plan)  # the converted model holds other proto objects
    skipped = list(selection.skipped)
    items: list[EncodedWeight] = []
    linear_items: list[qdq.LinearWeight] = []
    reports: list[WeightReport] = []
    histograms: list[Histogram] = []
    pending: list[tuple[Weight, int | None, str | None]] = []
    for weight in _finite(selection.weights, skipped):
        setting = settings[weight.name]
        if setting.method == "linear":
            array = weight.array()
            axis, why = linear_axes[weight.name]
            linear = qdq.quantize_weight(weight, array, bits=setting.bits, symmetric=True, axis=axis)
            linear_items.append(linear)
            reports.append(_linear_report(weight, array, linear, _join("linear by a layer override", why)))
            histograms.append(_linear_histogram(weight.name, array, linear))
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize
            pending.append((weight, *_codebook_axis(weight, itemsize, plan, setting.bits, setting.granularity)))
    progress(f"palettizing {len(pending)} weights")
    jobs = ((w.array(), settings[w.name].bits, axis) for w, axis, _ in pending)  # one array at a time
    palettes = _palettes(jobs, sum(w.elements for w, _, _ in pending), workers)
    for (weight, axis, note), palette in zip(pending, palettes):
        array = weight.array()
        bits = settings[weight.name].bits
        item = EncodedWeight(weight, palette, axis, bits, storages[bits])
        items.append(item)
        reports.append(_palette_report(weight, array, item, note))
        histograms.append(Histogram.of(weight.name, array, palette.codebook, rows=palette.codebook.shape[0]))
    _require_weights([*items, *linear_items], skipped)
    progress("encoding")
    encode_palettes(model, items)
    qdq.insert_weight_dq(model, linear_items)
    if linear_items:
        kinds = {np.dtype(x.storage).name for x in linear_items}
        opset = dataclasses.replace(opset, storage=", ".join(sorted({*opset.storage.split(", "), *kinds} - {"-"})))
    return Step(model, opset, reports, skipped, histograms=histograms)


def _linear_opset(weights: list[Weight], axes: dict[str, tuple[int | None, str | None]], bits: set[int]) -> int:
    """The opset DequantizeLinear needs for these weights: per-axis 13, typed scales 19, int4 21."""
    return max(
        10,
        13 if any(axis is not None for axis, _ in axes.values()) else 10,
        19 if any(w.tensor.data_type != onnx.TensorProto.FLOAT for w in weights) else 10,
        21 if 4 in bits else 10,
    )


def _linear_report(weight: Weight, array: np.ndarray, item: qdq.LinearWeight, note: str | None) -> WeightReport:
    return WeightReport(
        name=weight.name, source=weight.source, graph=weight.graph_path, consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape), elements=weight.elements, dtype=str(array.dtype), bits=item.bits,
        granularity=(Granularity.PER_TENSOR if item.axis is None else Granularity.PER_CHANNEL).value, channel_axis=item.axis,
        groups=item.grid.scale.size, float_bytes=array.nbytes, stored_bytes=qdq.stored_bytes(item),
        snr_db=snr_db(array, item.dequantized()), note=_join(note, _readers_note(weight)),
    )


def _linear_histogram(name: str, array: np.ndarray, item: qdq.LinearWeight) -> Histogram:
    grid = item.grid
    levels = (np.arange(grid.qmin, grid.qmax + 1)[None, :] - grid.zero_point[:, None]) * grid.scale[:, None]
    return Histogram.of(name, array, levels, rows=grid.scale.size)


def _select(model: onnx.ModelProto, plan: Plan) -> Selection:
    """The weights to quantize: selection minus those a layer override skips (reported as skipped)."""
    selection = select_weights(model, min_elements=plan.min_elements, exclude=plan.exclude)
    kept = []
    for weight in selection.weights:
        if layer_setting(plan, weight.name).skip:
            selection.skipped.append(Skipped(weight.name, weight.op_types, "skipped by a layer override", weight.shape))
        else:
            kept.append(weight)
    selection.weights = kept
    return selection


def _finite(weights: list[Weight], skipped: list[Skipped]) -> list[Weight]:
    """The weights without NaN/Inf; the others join `skipped`."""
    kept = []
    for weight in weights:
        if np.isfinite(weight.array()).all():
            kept.append(weight)
        else:
            skipped.append(Skipped(weight.name, weight.op_types, "contains NaN or Inf", weight.shape))
    return kept


def _require_weights(items: Sequence[object], skipped: list[Skipped]) -> None:
    if not items:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3]) or "no Conv, ConvTranspose, Gemm, MatMul or RNN reads a constant weight"
        raise UnsupportedModelError(f"nothing to quantize ({reasons})")


def _linear_step(model: onnx.ModelProto, plan: LinearPlan, progress: Progress) -> Step:
    details: dict[str, object] = {}
    warnings: list[str] = []
    if plan.fold_batchnorm:
        folded = fold_batchnorm(model)
        details["folded_batchnorm"] = folded
    selection = _select(model, plan)
    skipped = list(selection.skipped)
    weights = []
    for weight in _finite(selection.weights, skipped):
        if weight.tensor.data_type == onnx.TensorProto.DOUBLE:
            skipped.append(Skipped(weight.name, weight.op_types, "float64: DequantizeLinear cannot output float64", weight.shape))
        else:
            weights.append(weight)
    _require_weights(weights, skipped)
    bits_of = {w.name: layer_setting(plan, w.name).bits for w in weights}
    axes = {w.name: _linear_axis(w, layer_setting(plan, w.name).granularity) for w in weights}
    int4 = 4 in bits_of.values()

    before = default_opset(model)
    needed = _linear_opset(weights, axes, set(bits_of.values()))
    note = None
    if before < needed:
        model = raise_opset(model, needed)  # an UnsupportedModelError says why it cannot
        note = f"opset raised from {before} to {needed} for {'int4' if int4 else 'per-channel'} DequantizeLinear"
        selection = _select(model, plan)
        weights = [w for w in selection.weights if w.name in axes]

    items = {}
    reports = []
    histograms = []
    for i, weight in enumerate(weights):
        progress(f"quantizing {i + 1}/{len(weights)}: {weight.name}")
        axis, why = axes[weight.name]
        array = weight.array()
        item = qdq.quantize_weight(weight, array, bits=bits_of[weight.name], symmetric=plan.symmetric, axis=axis)
        items[weight.name] = item
        reports.append(_linear_report(weight, array, item, why))
        histograms.append(_linear_histogram(weight.name, array, item))
    storage = ", ".join(sorted({np.dtype(item.storage).name for item in items.values()}))
    opset = OpsetChange(before, max(before, needed), storage, note)

    if plan.calibration is None:
        qdq.insert_weight_dq(model, list(items.values()))
        details["runtime"] = ("weights-only: integer weights stay small in memory, but onnxruntime dequantizes "
                              "them at every run (slower than float)")
        return Step(model, opset, reports, skipped, warnings, details, histograms)

    progress("calibrating activation ranges")
    names = set(items)
    tensors = qdq.activation_tensors(model, names)
    feeds = _calibration_feeds(model, plan)
    if feeds.samples < MIN_CALIBRATION_SAMPLES:
        warnings.append(f"only {feeds.samples} calibration samples; activation ranges may not generalize (use {MIN_CALIBRATION_SAMPLES}+)")
    ranges = activation_ranges(model, tensors, feeds, method=plan.calibration_method, percentile=plan.percentile)
    qdq.insert_weight_dq(model, list(items.values()))
    absorbed = qdq.absorb_activations(model, names)
    tensors = [t for t in qdq.activation_tensors(model, names) if t in ranges]
    count = qdq.insert_activation_qdq(model, {t: ranges[t] for t in tensors}, items)
    details.update(
        calibration_samples=feeds.samples,
        activations_quantized=count,
        activations_absorbed=absorbed,
        runtime="full QDQ: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv, QGemm ...)",
    )
    if int4:
        warnings.append("int4 weights in a full QDQ graph are not fused into integer kernels by onnxruntime; int8 runs faster")
    return Step(model, opset, reports, skipped, warnings, details, histograms)


def _calibration_feeds(model: onnx.ModelProto, plan: LinearPlan) -> validate.Feeds:
    """Batches from the calibration .npz, or from a folder of images for a single-input model."""
    assert plan.calibration is not None
    sess = validate.session(model.SerializeToString(), "input model")
    if not plan.calibration.is_dir():
        return validate.load_feeds(sess, plan.calibration, batch_size=CALIBRATION_BATCH)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise UsageError(f"a folder of images calibrates single-input models; this one has {len(inputs)} (use an .npz)")
    images = load_images(plan.calibration, list(inputs[0].shape), plan.preprocessing)
    return validate.feeds_from_arrays(sess, {inputs[0].name: images}, plan.calibration, batch_size=CALIBRATION_BATCH)


def _readers_note(weight: Weight) -> str | None:
    if not weight.other_readers:
        return None
    return f"also read by {', '.join(sorted(set(weight.other_readers)))}, which sees the quantized values"


def _join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


def _linear_axis(weight: Weight, granularity: Granularity) -> tuple[int | None, str | None]:
    """The scale axis for a weight, and why it differs from what was asked, if it does."""
    axis = weight.channel_axis
    if granularity is Granularity.PER_CHANNEL:
        return axis, None if axis is not None else "per-tensor: its consumers disagree on the channel axis"
    if weight.depthwise and axis is not None:
        return axis, "per-channel: depthwise kernels lose badly under one scale per tensor"
    return None, None


def _prepare_opset(model: onnx.ModelProto, plan: KMeansPlan, bits_used: set[int],
                   linear_needs: int = 1) -> tuple[onnx.ModelProto, OpsetChange, dict[int, IndexStorage]]:
    """Pick the index storage per bit width; raise the opset if one needs it and the plan allows.

    `linear_needs` is the opset that linear layers of the plan require (they cannot fall back).
    """
    before = default_opset(model)
    storages = {bits: preferred_storage(bits) for bits in bits_used}
    needed = max([linear_needs, *(min_opset(s) for s in storages.values())])
    if before < linear_needs and not plan.raise_opset:
        raise UnsupportedModelError(f"linear layers need opset {linear_needs}, and --keep-opset forbids raising it from {before}")

    def described(chosen: dict[int, IndexStorage]) -> str:
        return ", ".join(sorted({s.value for s in chosen.values()})) or "-"

    if before >= needed:
        return model, OpsetChange(before, before, described(storages)), storages
    wanted = ", ".join(sorted({s.value for s in storages.values() if min_opset(s) > before})) or "DequantizeLinear"
    if plan.raise_opset:
        try:
            converted = raise_opset(model, needed)
            note = f"opset raised from {before} to {needed} for {wanted} indices"
            return converted, OpsetChange(before, needed, described(storages), note), storages
        except QConvertError as e:
            if before < linear_needs:
                raise
            reason = str(e)
    else:
        reason = "--keep-opset"
    fallback = {bits: s if min_opset(s) <= before else fallback_storage(bits, before) for bits, s in storages.items()}
    note = f"{wanted} indices need opset {needed} ({reason}); stored as {described(fallback)} instead"
    return model, OpsetChange(before, before, described(fallback), note), fallback


def _codebook_axis(weight: Weight, itemsize: int, plan: KMeansPlan, bits: int, granularity: Granularity) -> tuple[int | None, str | None]:
    """The axis of per-channel codebooks (None: one codebook), and why it differs from what was asked."""
    if granularity is not Granularity.PER_CHANNEL:
        return None, None
    axis = weight.channel_axis
    if axis is None:
        return None, "per-tensor: its consumers disagree on the channel axis"
    # C codebooks cost C·K·itemsize bytes. Past about one bit per weight, one more index bit per tensor
    # (about +6 dB) buys more accuracy than per-channel codebooks do.
    overhead_bits = weight.shape[axis] * (1 << bits) * itemsize * 8 / weight.elements
    if overhead_bits > plan.max_codebook_overhead:
        return None, (f"per-tensor: per-channel codebooks would add {overhead_bits:.2f} bits per weight "
                      f"(> --max-codebook-overhead {plan.max_codebook_overhead:g})")
    return axis, None


def _palettes(jobs: Iterator[tuple[np.ndarray, int, int | None]], total_elements: int, workers: int) -> Iterator[Palette]:
    """palettize_tensor over the jobs, in order. Big models use a process per core, with at most a few
    tensors in flight so memory stays bounded (results do not depend on the number of workers)."""
    if workers < 2 or total_elements < PARALLEL_MIN_ELEMENTS:
        for job in jobs:
            yield palettize_tensor(*job)
        return
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        in_flight: deque[Future[Palette]] = deque()
        for job in jobs:
            in_flight.append(pool.submit(palettize_tensor, *job))
            if len(in_flight) > workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _palette_report(weight: Weight, array: np.ndarray, item: EncodedWeight, note: str | None) -> WeightReport:
    palette, axis = item.palette, item.axis
    return WeightReport(
        name=weight.name,
        source=weight.source,
        graph=weight.graph_path,
        consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape),
        elements=weight.elements,
        dtype=str(array.dtype),
        bits=item.bits,
        granularity=(Granularity.PER_TENSOR if axis is None else Granularity.PER_CHANNEL).value,
        channel_axis=axis,
        groups=palette.codebook.shape[0],
        float_bytes=array.nbytes,
        stored_bytes=stored_bytes(palette, item.storage, item.bits),
        snr_db=snr_db(to_rows(array, axis), reconstruct(palette)),
        note=_join(note, _readers_note(weight)),
    )


def _check(model: onnx.ModelProto, input_path: Path) -> list[str]:
    """Full ONNX check of the new model; a failure is ours unless the input fails the checker too."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        try:
            onnx.checker.check_model(str(input_path))
        except Exception as original:
            return [f"the input model fails the ONNX checker ({first_line(original)}); so does the output"]
        raise QConvertError(f"the converted model fails the ONNX checker: {first_line(e)}") from e
    return []


def _plain(value: object) -> object:
    """Option values as JSON takes them."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _options(plan: Plan | None, validation: ValidationPlan | None) -> dict[str, object]:
    options = {k: _plain(v) for k, v in dataclasses.asdict(plan).items()} if plan is not None else {}
    options["validate"] = validation is not None
    if validation is not None:
        options.update(
            data=str(validation.data) if validation.data else None,
            input_shapes={k: list(v) for k, v in validation.input_shapes.items()},
            samples=validation.samples,
            seed=validation.seed,
        )
    return options
