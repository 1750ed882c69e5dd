"""convert(): load -> quantize (a method step) -> check -> validate -> gates -> write, as one report."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import onnx

from qconvert import auto, io, validate
from qconvert.errors import CannotRunError, QConvertError, UnsupportedModelError, UsageError, first_line
from qconvert.gates import Gates
from qconvert.gates import evaluate as evaluate_gates
from qconvert.methods.common import Progress
from qconvert.methods.kmeans import PaletteMemo, kmeans_step
from qconvert.methods.linear import linear_step
from qconvert.opset import default_opset
from qconvert.plan import AutoPlan, Granularity, KMeansPlan, Plan, ValidationPlan
from qconvert.report import OpsetChange, Report

NO_GATES = Gates()
FOLD_LIMIT = 1 << 30  # input bytes past which the converted model is validated without constant folding
TECHNIQUES_LIMIT = 1 << 30  # input bytes past which the data-aware techniques are skipped (they hold copies of the weights)
MIN_OPSET = 7  # Cast takes its type as an int from opset 6 on; onnxruntime supports 7+


@dataclass(frozen=True)
class Conversion:
    """What convert() produced: the report, and the model bytes (None when written with external data)."""

    report: Report
    model_bytes: bytes | None


@dataclass
class Trials:
    """What conversions of one model under different plans (auto's search) share: the float model's
    side of validation, and the palettes computed so far."""

    reference: validate.Reference | None = None
    palettes: PaletteMemo = field(default_factory=dict)


def default_output(input_path: Path, plan: Plan | AutoPlan) -> Path:
    """model.onnx -> model.kmeans4.onnx, model.kmeans4pc.onnx, model.int8pc.onnx, model.auto.onnx ..."""
    if isinstance(plan, AutoPlan):
        return input_path.with_name(f"{input_path.stem}.auto.onnx")
    pc = "pc" if plan.granularity is Granularity.PER_CHANNEL else ""
    if isinstance(plan, KMeansPlan):
        tag = f"kmeans{plan.bits}{pc}"
    else:
        tag = f"int{plan.bits}{pc}{'-qdq' if plan.activations else ''}"
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
    trials: Trials | None = None,
) -> Conversion:
    """Quantize the model at `input_path` as `plan` says; write it to `output_path` (None: don't write).

    With gates, a model that fails one is not written unless `keep_failed`; the report says which
    gate, the measured value and the limit. `workers` threads share the k-means (or linear
    quantization) of big models.
    `trials` keeps what the next conversion of the same model can reuse.
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
    model, input_bytes = io.load_model(input_path)
    if default_opset(model) < MIN_OPSET:
        raise UnsupportedModelError(
            f"{input_path}: opset {default_opset(model)} is older than {MIN_OPSET}, the oldest qconvert supports; "
            "convert it first (onnx.version_converter)"
        )
    lap("load")

    # The data-aware techniques learn from the calibration inputs, else from the validation inputs.
    data = plan.calibration or (validation.data if validation else None)
    notes = []
    if data is not None and input_bytes > TECHNIQUES_LIMIT and (plan.data_aware or plan.bias_correction):
        plan = dataclasses.replace(plan, data_aware=False, bias_correction=False)
        notes.append(f"data-aware quantization and bias correction skipped: on {input_bytes / 1e9:.1f} GB of weights they "
                     "would hold several copies of them in memory (on a 2.7 GB model they passed 14 GB)")
    loaded = [model]
    del model  # the step owns it: a model it converts to another opset must not stay alive beside the result
    if isinstance(plan, KMeansPlan):
        step = kmeans_step(loaded.pop(), plan, progress, workers, data, trials.palettes if trials else None)
    else:
        step = linear_step(loaded.pop(), plan, progress, data, workers)
    lap("quantize")

    # A model over protobuf's 2 GB, or converted from one with external data, is written the same way:
    # staged as model + data file beside the output, checked and validated there, then moved into place.
    io.materialize(step.model)  # weights left as they were (skipped ones) come out of the input file
    external = step.model.ByteSize() > io.PROTOBUF_LIMIT or (
        output_path is not None and not io.is_special(output_path) and input_bytes > input_path.stat().st_size)
    if external and (output_path is None or io.is_special(output_path)):
        raise UsageError("the converted model is over 2 GB: it is written with external data, so it needs an output file (-o)")
    staged = io.stage_external(step.model, output_path) if external and output_path else None
    converted: str | bytes = str(staged) if staged else step.model.SerializeToString()
    del step.model  # only the bytes (or files) from here on: a big model must not sit beside onnxruntime's copies
    output_data = None
    try:
        output_bytes = io.staged_bytes(staged) if staged else len(converted)
        warnings = notes + step.warnings + _check(converted, input_path)
        lap("check")

        result, latency = None, None
        if validation is not None:
            progress("validating under onnxruntime")
            try:
                fold = input_bytes <= FOLD_LIMIT
                if not fold:
                    warnings.append(f"validated without onnxruntime's graph optimizations: decoding {input_bytes / 1e9:.1f} GB of weights "
                                    "at load would not fit in memory; latency not measured")
                float_side: str | validate.Reference = str(input_path)
                if trials is not None:
                    if trials.reference is None:
                        trials.reference = validate.reference(str(input_path), validation)
                    float_side = trials.reference
                result, latency = validate.compare(float_side, converted, validation, fold)
            except CannotRunError as e:
                if not (validation.allow_unrunnable and e.which == "input model"):
                    raise
                warnings.append(f"not validated: {e}")
            lap("validate")
            changed = any(w.snr_db is not None for w in step.weights)  # some weight is not stored exactly
            if result is not None and changed and all(o.snr_db is None for o in result.outputs):
                vacuous = f"the outputs did not change at all on the validation inputs ({result.source}): they do not exercise the model"
                if gates.any:
                    raise UsageError(f"{vacuous}, so the quality gates cannot be judged; give --data, or real sizes with --input-shape")
                warnings.append(f"{vacuous}; give --data, or real sizes with --input-shape")

        checks = evaluate_gates(gates, result) if gates.any and result is not None else []
        passed = all(c.passed for c in checks)
        if not passed and output_path is not None and not keep_failed:
            warnings.append("model not written: a quality gate failed (--keep-failed writes it anyway)")
            output_path = None
        if output_path is not None:
            progress("writing")
            if staged:
                io.publish(staged, output_path)
                output_data = str(output_path.parent / io.external_name(output_path))
            else:
                assert isinstance(converted, bytes)
                io.save_model(converted, output_path)
                io.verify_written(output_path, converted)
            lap("write")
    finally:
        if staged:
            io.discard(staged)
    timings["total"] = round(sum(timings.values()), 4)
    report = Report(
        method=plan.method,
        options=_options(plan, validation),
        input_path=str(input_path),
        input_bytes=input_bytes,
        output_path=str(output_path) if output_path else None,
        output_bytes=output_bytes,
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
        output_data=output_data,
    )
    return Conversion(report, converted if isinstance(converted, bytes) else None)


def auto_convert(input_path: Path, output_path: Path | None, plan: AutoPlan, validation: ValidationPlan | None,
                 progress: Progress = lambda _: None, gates: Gates = NO_GATES, keep_failed: bool = False, workers: int = 2) -> Conversion:
    """qconvert auto: search a per-weight plan that meets the plan's target, convert and write it.

    The target is a gate of every trial conversion, so only a model that meets it is written (unless
    `keep_failed`); `gates` may add more.
    """
    if validation is None:
        raise UsageError("qconvert auto measures its plans: drop --no-validate")
    validation = dataclasses.replace(validation, latency_runs=0)  # every trial is validated: time none of them
    target = auto.target_gates(plan)
    merged = Gates(*(a if a is not None else b for a, b in zip(dataclasses.astuple(target), dataclasses.astuple(gates))))
    trials = Trials()
    return auto.search(input_path, plan, validation, progress,
                       lambda kmeans_plan: convert(input_path, output_path, kmeans_plan, validation, progress, merged, keep_failed, workers, trials))


def compare_models(float_path: Path, converted_path: Path, validation: ValidationPlan, gates: Gates = NO_GATES) -> Report:
    """Validation only: the same metrics, latency and gates for two existing models."""
    start = time.perf_counter()
    (reference, float_bytes), (converted, converted_bytes) = io.load_model(float_path), io.load_model(converted_path)
    result, latency = validate.compare(str(float_path), converted_path.read_bytes(), validation)
    checks = evaluate_gates(gates, result) if gates.any else []
    return Report(
        method="compare",
        options=_options(None, validation),
        input_path=str(float_path),
        input_bytes=float_bytes,
        output_path=str(converted_path),
        output_bytes=converted_bytes,
        opset=OpsetChange(default_opset(reference), default_opset(converted), "-"),
        weights=[],
        skipped=[],
        validation=result,
        latency_ms=latency,
        gates=checks,
        timings={"total": round(time.perf_counter() - start, 4)},
    )


def _check(model: str | bytes, input_path: Path) -> list[str]:
    """Full ONNX check of the new model (bytes, or a path); a failure is ours unless the input fails it too."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        try:
            onnx.checker.check_model(str(input_path), full_check=True)
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
