"""One conversion as stages over a small state: load, quantize (the method's step), serialize, check,
validate, judge the gates; then `Conversion.save` publishes the result."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import onnx

from qconvert import io, validate
from qconvert.errors import CannotRunError, QConvertError, UnsupportedModelError, UsageError, first_line
from qconvert.gates import GateResult, Gates
from qconvert.gates import evaluate as evaluate_gates
from qconvert.methods import half
from qconvert.methods.common import Progress, Step
from qconvert.methods.driver import quantize_model
from qconvert.opset import default_opset
from qconvert.plan import AnyPlan, AutoPlan, Float16Plan, Granularity, KMeansPlan, Plan, ValidationPlan
from qconvert.report import OpsetChange, Report

NO_GATES = Gates()
FOLD_LIMIT = 1 << 30  # input bytes past which the converted model is validated without constant folding
TECHNIQUES_LIMIT = 1 << 30  # input bytes past which the data-aware techniques are skipped (they copy the weights)
MIN_OPSET = 7  # Cast takes its type as an int from opset 6 on; onnxruntime supports 7+
NOT_WRITTEN = "model not written: a quality gate failed (--keep-failed writes it anyway)"
TOO_BIG_FOR_A_STREAM = (
    "the converted model is over 2 GB: it is written with external data, so it needs an output file (-o)"
)


@dataclass
class Conversion:
    """A converted model and its report. Until `save`, the model is its serialized bytes, or (a model
    written with external data: over 2 GB, or from such an input) a file staged with its data file."""

    report: Report
    model_bytes: bytes | None
    staged: Path | None = None

    @property
    def model(self) -> onnx.ModelProto:
        if self.model_bytes is not None:
            return onnx.load_model_from_string(self.model_bytes)
        assert self.staged is not None, "the conversion was saved or discarded"
        return onnx.load(str(self.staged))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the model to `path` atomically (with `path.name + '.data'` beside it when it has external
        data), read it back, and note it in the report."""
        path = Path(path)
        clock = time.perf_counter()
        if self.staged is not None:
            if io.is_special(path):
                self.discard()
                raise UsageError(TOO_BIG_FOR_A_STREAM)
            if (self.staged.name, self.staged.parent.parent.resolve()) != (path.name, path.parent.resolve()):
                moved = io.stage_copy(self.staged, path)  # staged elsewhere: copied beside `path` first
                io.discard(self.staged)
                self.staged = moved
            try:
                io.publish(self.staged, path)
            finally:
                io.discard(self.staged)
                self.staged = None
            self.report.output_data = str(path.parent / io.external_name(path))
        else:
            assert self.model_bytes is not None, "the conversion was discarded"
            io.save_model(self.model_bytes, path)
            io.verify_written(path, self.model_bytes)
        self.report.output_path = str(path)
        _lap(self.report.timings, "write", clock)
        return path

    def discard(self) -> None:
        """Remove what is staged (nothing is left behind by a conversion that is not saved)."""
        if self.staged is not None:
            io.discard(self.staged)
            self.staged = None


@dataclass
class Trials:
    """What conversions of one model under different plans (auto's search) share: the float model's
    side of validation, and the palettes computed so far."""

    reference: validate.Reference | None = None
    palettes: dict[tuple[object, ...], object] = field(default_factory=dict)


@dataclass
class _State:
    """What the stages of one conversion hand on."""

    source: Path
    plan: AnyPlan
    validation: ValidationPlan | None
    gates: Gates
    progress: Progress
    workers: int
    trials: Trials | None
    stage_beside: Path | None  # the output path, where a model with external data is staged; None: a temp folder
    timings: dict[str, float] = field(default_factory=dict)
    clock: float = field(default_factory=time.perf_counter)
    warnings: list[str] = field(default_factory=list)
    input_bytes: int = 0
    model: onnx.ModelProto | None = None
    step: Step | None = None
    converted: bytes | Path = b""  # serialized, or the staged model file
    output_bytes: int = 0
    result: validate.ValidationResult | None = None
    latency: dict[str, float] | None = None
    profile: validate.Profile | None = None
    checks: list[GateResult] = field(default_factory=list)

    def lap(self, name: str) -> None:
        self.clock = _lap(self.timings, name, self.clock)


def _lap(timings: dict[str, float], name: str, since: float) -> float:
    now = time.perf_counter()
    timings[name] = round(now - since, 4)
    timings["total"] = round(sum(v for k, v in timings.items() if k != "total"), 4)
    return now


def default_output(input_path: Path, plan: AnyPlan | AutoPlan) -> Path:
    """model.onnx -> model.kmeans4.onnx, model.kmeans4pc.onnx, model.int8pc.onnx, model.auto.onnx,
    model.float16.onnx, model.kmeans4-f16.onnx ..."""
    if isinstance(plan, AutoPlan):
        return input_path.with_name(f"{input_path.stem}.auto.onnx")
    if isinstance(plan, Float16Plan):
        return input_path.with_name(f"{input_path.stem}.float16.onnx")
    pc = "pc" if plan.granularity is Granularity.PER_CHANNEL else ""
    if isinstance(plan, KMeansPlan):
        tag = f"kmeans{plan.bits}{pc}"
    else:
        tag = f"int{plan.bits}{pc}{'-qdq' if plan.activations else ''}"
    return input_path.with_name(f"{input_path.stem}.{tag}{'-f16' if plan.float16 else ''}.onnx")


def convert(
    input_path: Path,
    output_path: Path | None,
    plan: AnyPlan,
    validation: ValidationPlan | None,
    progress: Progress = lambda _: None,
    gates: Gates = NO_GATES,
    keep_failed: bool = False,
    workers: int = 2,
    trials: Trials | None = None,
) -> Conversion:
    """Quantize the model at `input_path` as `plan` says, and write it to `output_path` (None: keep it in
    the returned Conversion, to `save` later).

    With gates, a model that fails one is not written unless `keep_failed`; the report says which
    gate, the measured value and the limit. `workers` threads share the k-means (or linear
    quantization) of big models. `trials` keeps what the next conversion of the same model can reuse.
    """
    if output_path is not None and output_path.resolve() == input_path.resolve():
        raise UsageError(f"{output_path}: the output would overwrite the input model; choose another -o")
    conversion = prepare(input_path, plan, validation, progress, gates, workers, trials, stage_beside=output_path)
    if output_path is not None:
        write(conversion, output_path, keep_failed, progress)
    return conversion


def prepare(
    input_path: Path,
    plan: AnyPlan,
    validation: ValidationPlan | None,
    progress: Progress = lambda _: None,
    gates: Gates = NO_GATES,
    workers: int = 2,
    trials: Trials | None = None,
    stage_beside: Path | None = None,
) -> Conversion:
    """Every stage but writing: the converted model, checked, validated and judged by the gates."""
    if gates.any and validation is None:
        raise UsageError("quality gates need validation: drop --no-validate")
    state = _State(input_path, plan, validation, gates, progress, workers, trials, stage_beside)
    _load(state)
    _quantize(state)
    _serialize(state)
    try:
        _check(state)
        _validate(state)
        _judge(state)
    except BaseException:
        if isinstance(state.converted, Path):
            io.discard(state.converted)
        raise
    staged = state.converted if isinstance(state.converted, Path) else None
    return Conversion(_report(state), None if staged else bytes(state.converted), staged)


def write(
    conversion: Conversion, output_path: Path, keep_failed: bool = False, progress: Progress = lambda _: None
) -> None:
    """Save the conversion unless a gate failed (and `keep_failed` is off); then it is discarded."""
    if not conversion.report.passed and not keep_failed:
        conversion.report.warnings.append(NOT_WRITTEN)
        conversion.discard()
        return
    progress("writing")
    conversion.save(output_path)


def _load(state: _State) -> None:
    state.progress("loading")
    state.model, state.input_bytes = io.load_model(state.source)
    if default_opset(state.model) < MIN_OPSET:
        raise UnsupportedModelError(
            f"{state.source}: opset {default_opset(state.model)} is older than {MIN_OPSET}, the oldest qconvert "
            "supports; convert it first (onnx.version_converter)"
        )
    plan = state.plan
    if (
        not isinstance(plan, Float16Plan)
        and (plan.data_aware or plan.bias_correction)
        and _data(state) is not None
        and state.input_bytes > TECHNIQUES_LIMIT
    ):
        state.plan = dataclasses.replace(plan, data_aware=False, bias_correction=False)
        state.warnings.append(
            f"data-aware quantization and bias correction skipped: on {state.input_bytes / 1e9:.1f} GB of weights "
            "they would hold several copies of them in memory (on a 2.7 GB model they passed 14 GB)"
        )
    state.lap("load")


def _data(state: _State) -> Path | None:
    """The data-aware techniques learn from the calibration inputs, else from the validation inputs."""
    return state.plan.calibration or (state.validation.data if state.validation else None)


def _quantize(state: _State) -> None:
    model, state.model = state.model, None  # the step owns it: a model it converts to another opset must not stay
    assert model is not None
    plan, data = state.plan, _data(state)
    if isinstance(plan, Float16Plan):
        state.step = half.step(model, plan, state.progress, data, state.validation)
    else:
        palettes = state.trials.palettes if state.trials else None
        state.step = quantize_model(model, plan, state.progress, state.workers, data, palettes)
        if plan.float16:
            _halve(state, state.step, plan, data)
    state.warnings += state.step.warnings
    state.lap("quantize")


def _halve(state: _State, step: Step, plan: Plan, data: Path | None) -> None:
    """`--float16`: the quantized model's remaining float parts in float16, judged against it."""
    rest = Float16Plan(calibration=plan.calibration, preprocessing=plan.preprocessing)
    step.model, step.details["float16"], warnings = half.halve(step.model, rest, state.progress, data, state.validation)
    step.warnings += warnings


def _serialize(state: _State) -> None:
    """Bytes, or (a model over protobuf's 2 GB, or from an input with external data written to a file) the
    model and its data file staged beside the output, where it is checked and validated, then moved."""
    step = state.step
    assert step is not None
    io.materialize(step.model)  # weights left as they were (skipped ones) come out of the input file
    beside = state.stage_beside
    to_file = beside is not None and not io.is_special(beside)
    external = step.model.ByteSize() > io.PROTOBUF_LIMIT or (
        to_file and state.input_bytes > state.source.stat().st_size
    )
    if external:
        where = beside if to_file and beside is not None else Path(tempfile.gettempdir()) / "qconvert.onnx"
        state.converted = io.stage_external(step.model, where)
        state.output_bytes = io.staged_bytes(state.converted)
    else:
        serialized = step.model.SerializeToString()
        state.converted, state.output_bytes = serialized, len(serialized)
    step.model = onnx.ModelProto()  # only the bytes (or files) from here on: not beside onnxruntime's copies


def _check(state: _State) -> None:
    """Full ONNX check of the new model; a failure is ours unless the input fails it too."""
    converted = str(state.converted) if isinstance(state.converted, Path) else state.converted
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:
        try:
            onnx.checker.check_model(str(state.source), full_check=True)
        except Exception as original:
            state.warnings.append(
                f"the input model fails the ONNX checker ({first_line(original)}); so does the output"
            )
        else:
            raise QConvertError(f"the converted model fails the ONNX checker: {first_line(e)}") from e
    state.lap("check")


def _validate(state: _State) -> None:
    validation = state.validation
    if validation is None:
        return
    state.progress("validating under onnxruntime")
    try:
        fold = state.input_bytes <= FOLD_LIMIT
        if not fold:
            state.warnings.append(
                f"validated without onnxruntime's graph optimizations: decoding {state.input_bytes / 1e9:.1f} GB of "
                "weights at load would not fit in memory; latency not measured"
            )
        float_side: str | validate.Reference = str(state.source)
        if state.trials is not None:
            if state.trials.reference is None:
                state.trials.reference = validate.reference(str(state.source), validation)
            float_side = state.trials.reference
        converted = str(state.converted) if isinstance(state.converted, Path) else state.converted
        state.result, state.latency, state.profile = validate.compare(float_side, converted, validation, fold)
    except CannotRunError as e:
        if not (validation.allow_unrunnable and e.which == "input model"):
            raise
        state.warnings.append(f"not validated: {e}")
    state.lap("validate")
    assert state.step is not None
    changed = any(w.snr_db is not None for w in state.step.weights)  # some weight is not stored exactly
    if state.result is not None and changed and all(o.snr_db is None for o in state.result.outputs):
        vacuous = (
            f"the outputs did not change at all on the validation inputs ({state.result.source}): "
            "they do not exercise the model"
        )
        if state.gates.any:
            raise UsageError(
                f"{vacuous}, so the quality gates cannot be judged; give --data, or real sizes with --input-shape"
            )
        state.warnings.append(f"{vacuous}; give --data, or real sizes with --input-shape")


def _judge(state: _State) -> None:
    if state.gates.any and state.result is not None:
        state.checks = evaluate_gates(state.gates, state.result)


def _report(state: _State) -> Report:
    step = state.step
    assert step is not None
    return Report(
        method=state.plan.method,
        options=_options(state.plan, state.validation),
        input_path=str(state.source),
        input_bytes=state.input_bytes,
        output_path=None,
        output_bytes=state.output_bytes,
        opset=step.opset,
        weights=step.weights,
        skipped=step.skipped,
        validation=state.result,
        latency_ms=state.latency,
        time_by_op=state.profile.as_dict() if state.profile is not None else None,
        gates=state.checks,
        histograms=step.histograms,
        details=step.details,
        timings=state.timings,
        warnings=state.warnings,
    )


def compare_models(
    float_path: Path, converted_path: Path, validation: ValidationPlan, gates: Gates = NO_GATES
) -> Report:
    """Validation only: the same metrics, latency and gates for two existing models."""
    start = time.perf_counter()
    (reference, float_bytes), (converted, converted_bytes) = io.load_model(float_path), io.load_model(converted_path)
    result, latency, profile = validate.compare(str(float_path), converted_path.read_bytes(), validation)
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
        time_by_op=profile.as_dict() if profile is not None else None,
        gates=checks,
        timings={"total": round(time.perf_counter() - start, 4)},
    )


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


def _options(plan: AnyPlan | None, validation: ValidationPlan | None) -> dict[str, object]:
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
