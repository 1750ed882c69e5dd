"""convert(): load -> select -> palettize -> encode -> check -> validate -> write, as one report."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qconvert import io
from qconvert.encode import EncodedWeight, IndexStorage, encode_palettes, fallback_storage, min_opset, preferred_storage, stored_bytes
from qconvert.errors import QConvertError, UnsupportedModelError, UsageError, first_line
from qconvert.opset import default_opset, raise_opset
from qconvert.plan import Granularity, KMeansPlan, ValidationPlan
from qconvert.quant.kmeans import palettize, reconstruct
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import OpsetChange, Report, WeightReport
from qconvert.select import Skipped, Weight, select_weights
from qconvert import validate

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Conversion:
    """What convert() produced: the report, and the model bytes (written unless no output was asked)."""

    report: Report
    model_bytes: bytes


def default_output(input_path: Path, plan: KMeansPlan) -> Path:
    """model.onnx -> model.kmeans4.onnx (model.kmeans4pc.onnx per channel), beside the input."""
    tag = f"kmeans{plan.bits}{'pc' if plan.granularity is Granularity.PER_CHANNEL else ''}"
    return input_path.with_name(f"{input_path.stem}.{tag}.onnx")


def convert(
    input_path: Path,
    output_path: Path | None,
    plan: KMeansPlan,
    validation: ValidationPlan | None,
    progress: Progress = lambda _: None,
) -> Conversion:
    """Palettize the model at `input_path`; write it to `output_path` (None: don't write)."""
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
    input_bytes = input_path.stat().st_size
    lap("load")

    model, opset = _prepare_opset(model, plan)
    lap("opset")

    selection = select_weights(model, min_elements=plan.min_elements, exclude=plan.exclude)
    skipped = list(selection.skipped)
    items: list[EncodedWeight] = []
    reports: list[WeightReport] = []
    for i, weight in enumerate(selection.weights):
        progress(f"palettizing {i + 1}/{len(selection.weights)}: {weight.name}")
        array = weight.array()
        if not np.isfinite(array).all():
            skipped.append(Skipped(weight.name, weight.op_types, "contains NaN or Inf", weight.shape))
            continue
        item, report = _palettize(weight, array, plan, IndexStorage(opset.index_storage))
        items.append(item)
        reports.append(report)
    if not items:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3]) or "no Conv, ConvTranspose, Gemm, MatMul or RNN reads a constant weight"
        raise UnsupportedModelError(f"{input_path}: nothing to quantize ({reasons})")
    lap("quantize")

    progress("encoding")
    encode_palettes(model, items, bits=plan.bits, storage=IndexStorage(opset.index_storage))
    warnings = _check(model, input_path)
    model_bytes = model.SerializeToString()
    lap("encode")

    result = None
    if validation is not None:
        progress("validating under onnxruntime")
        result = validate.compare(str(input_path), model_bytes, validation)
        lap("validate")

    output_bytes = len(model_bytes)
    if output_path is not None:
        progress("writing")
        io.save_model(model, output_path)
        lap("write")
    timings["total"] = round(sum(timings.values()), 4)
    report = Report(
        method=plan.method,
        options=_options(plan, validation),
        input_path=str(input_path),
        input_bytes=input_bytes,
        output_path=str(output_path) if output_path else None,
        output_bytes=output_bytes,
        opset=opset,
        weights=reports,
        skipped=skipped,
        validation=result,
        timings=timings,
        warnings=warnings,
    )
    return Conversion(report, model_bytes)


def _prepare_opset(model: onnx.ModelProto, plan: KMeansPlan) -> tuple[onnx.ModelProto, OpsetChange]:
    """Pick the index storage; raise the opset if that storage needs it and the plan allows."""
    before = default_opset(model)
    storage = preferred_storage(plan.bits)
    needed = min_opset(storage)
    if before >= needed:
        return model, OpsetChange(before, before, storage.value)
    if plan.raise_opset:
        try:
            converted = raise_opset(model, needed)
            return converted, OpsetChange(before, needed, storage.value, f"opset raised from {before} to {needed} for {storage.value} indices")
        except QConvertError as e:
            reason = str(e)
    else:
        reason = "--keep-opset"
    fallback = fallback_storage(plan.bits, before)
    note = f"{storage.value} indices need opset {needed} ({reason}); stored as {fallback.value} instead"
    return model, OpsetChange(before, before, fallback.value, note)


def _palettize(weight: Weight, array: np.ndarray, plan: KMeansPlan, storage: IndexStorage) -> tuple[EncodedWeight, WeightReport]:
    axis, note = None, None
    if plan.granularity is Granularity.PER_CHANNEL:
        axis = weight.channel_axis
        if axis is None:
            note = "per-tensor: its consumers disagree on the channel axis"
        else:
            # C codebooks cost C·K·itemsize bytes. Past about one bit per weight, one more index bit per
            # tensor (about +6 dB) buys more accuracy than per-channel codebooks do.
            overhead_bits = weight.shape[axis] * (1 << plan.bits) * array.itemsize * 8 / weight.elements
            if overhead_bits > plan.max_codebook_overhead:
                note = (f"per-tensor: per-channel codebooks would add {overhead_bits:.2f} bits per weight "
                        f"(> --max-codebook-overhead {plan.max_codebook_overhead:g})")
                axis = None
    rows = to_rows(array, axis)
    palette = palettize(rows, bits=plan.bits)
    item = EncodedWeight(weight, palette, axis)
    report = WeightReport(
        name=weight.name,
        source=weight.source,
        graph=weight.graph_path,
        consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape),
        elements=weight.elements,
        dtype=str(array.dtype),
        bits=plan.bits,
        granularity=(Granularity.PER_TENSOR if axis is None else Granularity.PER_CHANNEL).value,
        channel_axis=axis,
        codebooks=palette.codebook.shape[0],
        float_bytes=array.nbytes,
        stored_bytes=stored_bytes(palette, storage, plan.bits),
        snr_db=snr_db(rows, reconstruct(palette)),
        note=note,
    )
    return item, report


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


def _options(plan: KMeansPlan, validation: ValidationPlan | None) -> dict[str, object]:
    options: dict[str, object] = {
        "bits": plan.bits,
        "granularity": plan.granularity.value,
        "min_elements": plan.min_elements,
        "exclude": list(plan.exclude),
        "raise_opset": plan.raise_opset,
        "max_codebook_overhead": plan.max_codebook_overhead,
        "validate": validation is not None,
    }
    if validation is not None:
        options.update(
            data=str(validation.data) if validation.data else None,
            input_shapes={k: list(v) for k, v in validation.input_shapes.items()},
            samples=validation.samples,
            seed=validation.seed,
        )
    return options
