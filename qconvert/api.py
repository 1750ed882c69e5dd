"""The Python API: `qconvert.kmeans`, `linear`, `auto`, `compare` and `inspect`, what the CLI runs too.

Models come as a path or an `onnx.ModelProto`; data (validation or calibration inputs) as an .npz path, a
dict of arrays (axis 0 = samples, an optional `labels` array), or any iterable of feed dicts such as an
onnxruntime `CalibrationDataReader`. Errors are the typed `qconvert.errors` (each with its exit code).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qconvert import io
from qconvert.describe import inspect_model
from qconvert.drift import JUMPS, DebugReport
from qconvert.drift import debug as run_debug
from qconvert.errors import InputError, UsageError
from qconvert.gates import Gates
from qconvert.methods.common import Progress
from qconvert.mixed import holdout
from qconvert.mixed import search as auto_search
from qconvert.pipeline import NO_GATES, Conversion, Trials, compare_models, prepare, write
from qconvert.pipeline import convert as run_plan
from qconvert.plan import AnyPlan, AutoPlan, Float16Plan, Granularity, KMeansPlan, LinearPlan, ValidationPlan
from qconvert.report import Report

ModelSource = str | os.PathLike[str] | onnx.ModelProto
Data = str | os.PathLike[str] | Mapping[str, Any] | Iterable[Mapping[str, Any]]
GATE_OPTIONS = {
    "min_snr": "min_snr_db",
    "max_abs_error": "max_abs_error",
    "min_top1": "min_top1",
    "max_accuracy_drop": "max_accuracy_drop",
    "max_metric_drop": "max_metric_drop",
}
VALIDATION_OPTIONS = {"input_shapes", "samples", "seed", "allow_unrunnable", "metric"}
IN_MEMORY = "(in memory)"


def _quiet(_: str) -> None:
    pass


def kmeans(
    model: ModelSource,
    bits: int,
    *,
    granularity: str | Granularity = Granularity.AUTO,
    calibration: Data | None = None,
    data: Data | None = None,
    labels: Any = None,
    output: str | os.PathLike[str] | None = None,
    validate: bool = True,
    keep_failed: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    **options: Any,
) -> Conversion:
    """Palettize the model's weights: 2**bits k-means centroids per tensor or channel plus low-bit indices.

    `options`: any other field of `KMeansPlan` (min_elements, exclude, max_codebook_overhead, group_size, raise_opset,
    fold_batchnorm, data_aware, bias_correction, overrides ...), of `ValidationPlan` (input_shapes, samples,
    seed, allow_unrunnable) or a gate (min_snr, max_abs_error, min_top1, max_accuracy_drop).

        result = qconvert.kmeans("model.onnx", bits=4, data="val.npz", min_snr=20)
        result.save("model.kmeans4.onnx")
    """
    fields = {"bits": bits, "granularity": Granularity(granularity)}
    return _convert(
        KMeansPlan, model, fields, options, calibration, data, labels, validate, output, keep_failed, workers, progress
    )


def linear(
    model: ModelSource,
    bits: int = 8,
    *,
    per_channel: bool = True,
    symmetric: bool = True,
    calibration: Data | None = None,
    weights_only: bool = False,
    data: Data | None = None,
    labels: Any = None,
    output: str | os.PathLike[str] | None = None,
    validate: bool = True,
    keep_failed: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    **options: Any,
) -> Conversion:
    """Linear quantization r = S(q − Z): int8/int4 weights with DequantizeLinear, and with `calibration`
    (unless `weights_only`) activations too, in the QDQ form onnxruntime runs as integer kernels.

    `options`: any other field of `LinearPlan` (calibration_method, percentile, min_elements, exclude,
    fold_batchnorm, data_aware, bias_correction, overrides ...), of `ValidationPlan`, or a gate (see `kmeans`).

        result = qconvert.linear("model.onnx", calibration=reader, output="model.int8.onnx")
    """
    granularity = Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR
    fields = {"bits": bits, "granularity": granularity, "symmetric": symmetric, "weights_only": weights_only}
    return _convert(
        LinearPlan, model, fields, options, calibration, data, labels, validate, output, keep_failed, workers, progress
    )


def float16(
    model: ModelSource,
    *,
    keep_io_types: bool = True,
    calibration: Data | None = None,
    data: Data | None = None,
    labels: Any = None,
    output: str | os.PathLike[str] | None = None,
    validate: bool = True,
    keep_failed: bool = False,
    progress: Progress | None = None,
    **options: Any,
) -> Conversion:
    """The model computed in float16 where its ops allow it and the data (`calibration`, else `data`) says it
    holds: ops that overflow or drift stay float32 with Casts around them. `options`: any other field of
    `Float16Plan` (keep, target_snr), of `ValidationPlan`, or a gate (see `kmeans`).

        result = qconvert.float16("model.onnx", data="val.npz", output="model.float16.onnx")
    """
    fields = {"keep_io_types": keep_io_types}
    return _convert(
        Float16Plan, model, fields, options, calibration, data, labels, validate, output, keep_failed, 1, progress
    )


def auto(
    model: ModelSource,
    *,
    target_snr: float | None = None,
    min_top1: float | None = None,
    max_accuracy_drop: float | None = None,
    max_metric_drop: float | None = None,
    calibration: Data | None = None,
    data: Data | None = None,
    labels: Any = None,
    output: str | os.PathLike[str] | None = None,
    keep_failed: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
    **options: Any,
) -> Conversion:
    """Mixed precision: per weight the method and width that meet one target (`target_snr` dB, `min_top1`
    agreement, `max_accuracy_drop` points on labels, or `max_metric_drop` of the `metric=`) at the smallest
    file. The report's `details["auto"]` holds the plan. `options`: any other field of `AutoPlan` or
    `ValidationPlan`.
    """
    fields = {
        "target_snr": target_snr,
        "min_top1": min_top1,
        "max_accuracy_drop": max_accuracy_drop,
        "max_metric_drop": max_metric_drop,
    }
    return _convert(
        AutoPlan, model, fields, options, calibration, data, labels, True, output, keep_failed, workers, progress
    )


def run(
    plan: AnyPlan | AutoPlan,
    model: Path,
    validation: ValidationPlan | None,
    gates: Gates = NO_GATES,
    *,
    output: str | os.PathLike[str] | None = None,
    keep_failed: bool = False,
    workers: int = 2,
    progress: Progress | None = None,
) -> Conversion:
    """Any plan (what `kmeans`, `linear`, `auto` and the command line build) on the model at `model`:
    convert, check, validate, judge, and write to `output` if given and the gates pass (or `keep_failed`)."""
    target = None if output is None else Path(output)
    if isinstance(plan, AutoPlan):
        return convert_auto(model, target, plan, validation, progress or _quiet, gates, keep_failed, workers)
    return run_plan(model, target, plan, validation, progress or _quiet, gates, keep_failed, workers)


def compare(
    float_model: ModelSource,
    converted_model: ModelSource,
    *,
    data: Data | None = None,
    labels: Any = None,
    **options: Any,
) -> Report:
    """Validation only: the metrics, latency and gates of a converted model against its float original.
    `options`: fields of `ValidationPlan` (input_shapes, samples, seed) and gates (min_snr ...)."""
    _, checks = _split(None, options)
    with _scratch() as scratch:
        paths = scratch.model(float_model, "float.onnx"), scratch.model(converted_model, "converted.onnx")
        report = compare_models(*paths, scratch.validation(data, labels, checks), _gates(checks))
        return scratch.relabel(Conversion(report, None)).report


def inspect(model: ModelSource, *, min_elements: int = 1024) -> dict[str, Any]:
    """A JSON-able description of the model: signature, weights, and the file size each method would give."""
    with _scratch() as scratch:
        info = inspect_model(scratch.model(model), min_elements=min_elements)
        return dict(_replaced(info, scratch.names))


def debug(
    float_model: ModelSource,
    converted_model: ModelSource,
    *,
    data: Data | None = None,
    labels: Any = None,
    validation: ValidationPlan | None = None,
    jumps: int = JUMPS,
    **options: Any,
) -> DebugReport:
    """Per-tensor drift of a converted model against its float original, in graph order, and for the nodes
    that add the most noise whether their weight or their input's quantization causes it (`qconvert debug`).
    `options`: fields of `ValidationPlan` (input_shapes, samples, seed)."""
    _, checks = _split(None, options)
    with _scratch() as scratch:
        paths = scratch.model(float_model, "float.onnx"), scratch.model(converted_model, "converted.onnx")
        plan = validation if validation is not None else scratch.validation(data, labels, checks)
        report = run_debug(*paths, plan, jumps)
        report.float_path, report.converted_path, report.source = (
            _replaced(x, scratch.names) for x in (report.float_path, report.converted_path, report.source)
        )
        return report


def convert_auto(
    path: Path,
    output: Path | None,
    plan: AutoPlan,
    validation: ValidationPlan | None,
    progress: Progress = _quiet,
    gates: Gates = NO_GATES,
    keep_failed: bool = False,
    workers: int = 2,
) -> Conversion:
    """qconvert auto: search a per-weight plan that meets the plan's target; write the smallest that does.

    The target is a gate of every trial conversion, so only a model that meets it is written (unless
    `keep_failed`); `gates` may add more.
    """
    if validation is None:
        raise UsageError("qconvert auto measures its plans: drop --no-validate")
    if output is not None and output.resolve() == path.resolve():
        raise UsageError(f"{output}: the output would overwrite the input model; choose another -o")
    validation = dataclasses.replace(validation, latency_runs=0)  # every trial is validated: time none of them
    target = auto_search.target_gates(plan)
    merged = Gates(
        *(a if a is not None else b for a, b in zip(dataclasses.astuple(target), dataclasses.astuple(gates)))
    )
    trials = Trials()
    with holdout.held_out(plan, validation) as split:

        def trial(kmeans_plan: KMeansPlan) -> Conversion:
            return prepare(path, kmeans_plan, split.validation, progress, merged, workers, trials, stage_beside=output)

        conversion = auto_search.search(path, split.plan, split.validation, progress, trial)
        if split.details is not None:
            conversion.report.details["auto"]["held_out"] = split.details  # type: ignore[index]
            _relabel(conversion, holdout.names(split))
    if output is not None:
        write(conversion, output, keep_failed, progress)
    return conversion


def _convert(
    kind: type[Any],
    model: ModelSource,
    fields: dict[str, Any],
    options: dict[str, Any],
    calibration: Data | None,
    data: Data | None,
    labels: Any,
    validate: bool,
    output: str | os.PathLike[str] | None,
    keep_failed: bool,
    workers: int,
    progress: Progress | None,
) -> Conversion:
    """A plan of `kind` from the call's arguments, run on the model; what came in memory goes through temp files,
    named "in memory" in the report."""
    plan_options, checks = _split(kind, options)
    with _scratch() as scratch:
        plan = _plan(kind, calibration=scratch.data(calibration, "calibration"), **fields, **plan_options)
        validation = scratch.validation(data, labels, checks) if validate else None
        conversion = run(
            plan,
            scratch.model(model),
            validation,
            _gates(checks),
            output=output,
            keep_failed=keep_failed,
            workers=workers,
            progress=progress,
        )
        return scratch.relabel(conversion)


def _plan(kind: type[Any], **fields: Any) -> Any:
    """A plan from keyword fields; an unknown one is a usage error naming it (not a TypeError)."""
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} (options: {', '.join(sorted(known))})")
    return kind(**fields)


def _split(kind: type[Any] | None, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Options into the plan's fields and the rest (validation settings and gates, checked by their users)."""
    checks = {k: v for k, v in options.items() if k in GATE_OPTIONS or k in VALIDATION_OPTIONS}
    plan = {k: v for k, v in options.items() if k not in checks}
    if kind is None and plan:
        raise UsageError(
            f"unknown option {sorted(plan)[0]!r} (options: {', '.join(sorted([*GATE_OPTIONS, *VALIDATION_OPTIONS]))})"
        )
    return plan, checks


def _gates(checks: dict[str, Any]) -> Gates:
    return Gates(**{GATE_OPTIONS[k]: v for k, v in checks.items() if k in GATE_OPTIONS})


class _Scratch:
    """A temp folder for what the caller gave in memory (models, data), named in reports as IN_MEMORY."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[tuple[str, str]] = []  # (temp path, what reports say instead), most specific first

    def model(self, model: ModelSource, name: str = "model.onnx") -> Path:
        """A path to the model; an in-memory ModelProto is written here (with external data past protobuf's 2 GB)."""
        if not isinstance(model, onnx.ModelProto):
            return Path(model)
        path = self.folder / name
        if model.ByteSize() > io.PROTOBUF_LIMIT:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # saving with external data moves the tensors out of the model it is given
            onnx.save_model(copy, str(path), save_as_external_data=True, location=f"{name}.data")
        else:
            path.write_bytes(model.SerializeToString())
        self.names.insert(0, (str(path), IN_MEMORY))
        return path

    def data(self, data: Data | None, what: str) -> Path | None:
        """An .npz (or image folder) path as it is; arrays or feed dicts written here as an .npz."""
        if data is None or isinstance(data, (str, os.PathLike)):
            return None if data is None else Path(data)
        arrays = dict(data) if isinstance(data, Mapping) else _stacked(data, what)
        path = self.folder / f"{what}.npz"
        np.savez(path, **{str(name): np.asarray(value) for name, value in arrays.items()})  # type: ignore[arg-type]
        self.names.append((str(path), f"{what} {IN_MEMORY}"))
        return path

    def validation(self, data: Data | None, labels: Any, checks: dict[str, Any]) -> ValidationPlan:
        """The validation plan; labels in memory are written here: an array as .npy, anything else as JSON."""
        labels_path = None
        if isinstance(labels, (str, os.PathLike)):
            labels_path = Path(labels)
        elif isinstance(labels, np.ndarray):
            labels_path = self.folder / "labels.npy"
            np.save(labels_path, labels)
        elif labels is not None:
            labels_path = self.folder / "labels.json"
            labels_path.write_text(json.dumps(labels if isinstance(labels, list) else list(labels)))
        if labels_path is not None and labels_path.parent == self.folder:
            self.names.append((str(labels_path), f"labels {IN_MEMORY}"))
        fields = {k: v for k, v in checks.items() if k in VALIDATION_OPTIONS}
        if "input_shapes" in fields:
            fields["input_shapes"] = {
                name: tuple(int(d) for d in dims) for name, dims in fields["input_shapes"].items()
            }
        return ValidationPlan(data=self.data(data, "data"), labels=labels_path, **fields)

    def relabel(self, conversion: Conversion) -> Conversion:
        """The report without the temp paths (which differ per run): what they held, "in memory"."""
        return _relabel(conversion, self.names)


def _relabel(conversion: Conversion, names: list[tuple[str, str]]) -> Conversion:
    """The report's temp paths replaced by the names of what they hold."""
    report = conversion.report
    report.input_path, report.options, report.details, report.warnings = _replaced(
        (report.input_path, report.options, report.details, report.warnings), names
    )
    report.output_path = _replaced(report.output_path, names)
    if report.validation is not None:
        report.validation = dataclasses.replace(report.validation, source=_replaced(report.validation.source, names))
    return conversion


@contextlib.contextmanager
def _scratch() -> Iterator[_Scratch]:
    with tempfile.TemporaryDirectory(prefix="qconvert-") as folder:
        yield _Scratch(Path(folder))


def _replaced(value: Any, names: list[tuple[str, str]]) -> Any:
    """`value` (strings inside dicts, lists and tuples) with each temp path replaced by its name."""
    if isinstance(value, str):
        for old, new in names:
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: _replaced(v, names) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_replaced(v, names) for v in value)
    return value


def _stacked(feeds: Iterable[Mapping[str, Any]], what: str) -> dict[str, np.ndarray]:
    """Feed dicts (one batch each, axis 0 = samples) joined into one array per input."""
    if not isinstance(feeds, Iterable) and callable(
        getattr(feeds, "get_next", None)
    ):  # a reader that only has get_next
        feeds = iter(feeds.get_next, None)
    batches: dict[str, list[np.ndarray]] = {}
    for count, feed in enumerate(feeds):
        if not isinstance(feed, Mapping):
            raise InputError(f"{what}: expected dicts of arrays (input name -> batch), got {type(feed).__name__}")
        if count and set(feed) != set(batches):
            raise InputError(f"{what}: feed {count} names {sorted(feed)}, the first named {sorted(batches)}")
        for name, value in feed.items():
            batches.setdefault(name, []).append(np.asarray(value))
    if not batches:
        raise InputError(f"{what}: no samples")
    try:
        return {name: np.concatenate(parts) for name, parts in batches.items()}
    except ValueError as e:
        raise InputError(f"{what}: the feeds' arrays do not join along axis 0: {e}") from e


__all__: Sequence[str] = [
    "Conversion",
    "Data",
    "ModelSource",
    "auto",
    "compare",
    "debug",
    "inspect",
    "kmeans",
    "linear",
    "run",
]
