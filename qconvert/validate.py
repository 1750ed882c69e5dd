"""Run the float and the converted model on the same inputs under onnxruntime and measure the drift."""

from __future__ import annotations

import dataclasses
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qconvert import io
from qconvert.errors import CannotRunError, InputError, UnsupportedModelError, UsageError, first_line
from qconvert.opset import is_hole, without_weights
from qconvert.plan import ValidationPlan
from qconvert.quant.layout import snr_db

ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
LABELS_KEY = "labels"
DATA_BATCH = 64  # samples per run when the batch dimension is free


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    mean_abs_error: float
    snr_db: float | None  # None: identical outputs
    cosine_similarity: float
    top1_agreement: float | None  # None: not class scores


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy on labelled data (first class-score output)."""

    output: str
    float_top1: float
    quantized_top1: float

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.float_top1 - self.quantized_top1)


@dataclass(frozen=True)
class ValidationResult:
    source: str  # "random (seed 0)" or the data file
    samples: int
    outputs: list[OutputMetrics]
    accuracy: Accuracy | None


@dataclass(frozen=True)
class Feeds:
    batches: list[dict[str, np.ndarray]]
    samples: int
    source: str
    labels: np.ndarray | None = None
    padded: int = 0  # samples repeated to fill the last fixed-size batch


def session(model: str | bytes, what: str, *, probe: bool = False, optimize: bool = True,
            initializers: tuple[list[str], list[ort.OrtValue]] | None = None, folder: Path | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session; `model` is a path or serialized bytes.

    `probe`: a model with many side branches (checks beside every layer). onnxruntime's memory
    pattern would reserve one block for all of their buffers at once; without it, peak memory of a
    ResNet-50 probe drops by a third.
    `optimize` False: no graph optimizations, so no constant folding. A palettized model then decodes
    each weight when it is used, instead of all of them at load (for a 2.7 GB model, folding at load
    took more than 24 GB).
    A probe given weights as arrays does without onnxruntime's NCHWc layout, which would keep a
    reordered copy of each beside the array (full-QDQ calibration of ResNet-50: 40 MB less peak
    memory, 10 % more time).
    `initializers`: names and values of the model's initializers that it marks as external.
    `folder`: where the external data of serialized `model` bytes is.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: failures come back as one-line errors instead
    options.enable_mem_pattern = not probe
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif probe and initializers is not None and initializers[0]:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    if initializers is not None:
        options.add_external_initializers(*initializers)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    try:
        return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise CannotRunError(f"onnxruntime cannot load the {what}: {first_line(e)}", what) from e


def model_session(model: onnx.ModelProto, what: str, *, skeleton: onnx.ModelProto | None = None,
                  replaced: Mapping[str, np.ndarray] | None = None, probe: bool = False) -> ort.InferenceSession:
    """A session of an in-memory model whose large weights onnxruntime reads from the input file, or
    takes as arrays.

    Serializing the model would copy every weight twice more (the bytes, and onnxruntime's parse of
    them) and fails past protobuf's 2 GB. `skeleton` is what runs: a copy of `model` without its large
    tensors' data (`opset.without_weights`), maybe with checks added; by default `model` itself. Its
    holes are filled from `replaced`, else from `model`'s initializers of the same name: those still
    in the input file (`io.is_lazy`) are read from there by onnxruntime, which then keeps only its
    optimized copy (on ResNet-50, 420 MB peak became 230 MB).
    """
    skeleton = skeleton if skeleton is not None else without_weights(model)
    tensors = {t.name: t for t in model.graph.initializer}
    names, values, in_file = [], [], []
    for hole in skeleton.graph.initializer:
        if io.is_lazy(hole):  # not a hole: a small tensor kept in the skeleton, still in the input file
            in_file.append((hole, hole))
            continue
        if not is_hole(hole):
            continue
        given = replaced.get(hole.name) if replaced else None
        if given is None and io.is_lazy(tensors[hole.name]):
            in_file.append((hole, tensors[hole.name]))
            continue
        array = given if given is not None else io.tensor_array(tensors[hole.name])
        if array.dtype.type not in ORT_TYPES.values():  # bfloat16, float8...: onnxruntime takes these only as bytes
            hole.CopyFrom(onnx.numpy_helper.from_array(array, hole.name))
            continue
        names.append(hole.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
    folder = io.read_in_place(in_file)
    sess = session(skeleton.SerializeToString(), what, probe=probe, initializers=(names, values), folder=folder)
    sess.qconvert_arrays = values  # type: ignore[attr-defined]  # onnxruntime reads them in place: they must outlive it
    return sess


def signature(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session of the model's inputs alone, each passed through: its `get_inputs()` is the model's, at
    no cost (a session of the model itself holds every weight, twice once optimized)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    outputs = [f"qc_signature_{k}" for k in range(len(inputs))]
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", [i.name], [o]) for i, o in zip(inputs, outputs)], "signature",
                                   inputs, [onnx.helper.make_empty_tensor_value_info(o) for o in outputs])
    interface = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return session(interface.SerializeToString(), "input model")


def build_feeds(sess: ort.InferenceSession, plan: ValidationPlan) -> Feeds:
    """Inputs from the user's .npz, or seeded random inputs from the model's input signature."""
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    unknown = sorted(set(plan.input_shapes) - set(names))
    if unknown:
        raise UsageError(f"--input-shape names unknown input {unknown[0]!r} (model inputs: {', '.join(names)})")
    if plan.data is not None:
        feeds = load_feeds(sess, plan.data)
        if plan.labels is None:
            return feeds
        labels = _load_labels(plan.labels)
        if labels.shape[0] != feeds.samples:
            raise InputError(f"{plan.labels}: {labels.shape[0]} labels for {feeds.samples} samples in {plan.data}")
        return dataclasses.replace(feeds, labels=labels)
    if plan.labels is not None:
        raise UsageError("--labels go with --data (the samples they label)")
    rng = np.random.default_rng(plan.seed)
    shapes = {i.name: plan.input_shapes.get(i.name) or tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape) for i in inputs}
    batches = [{i.name: _random(rng, _dtype(i), shapes[i.name]) for i in inputs} for _ in range(plan.samples)]
    # A symbolic size past the batch set to 1 (an image's height and width) may not exercise the model at all.
    guessed = [f"{i.name} {'x'.join(map(str, shapes[i.name]))}" for i in inputs
               if i.name not in plan.input_shapes and any(not (isinstance(d, int) and d > 0) for d in i.shape[1:])]
    note = f"; symbolic sizes set to 1: {', '.join(guessed)}" if guessed else ""
    return Feeds(batches, plan.samples, f"random (seed {plan.seed}{note})")


@dataclass(frozen=True)
class Reference:
    """The float model's side of a comparison: the feeds, its outputs on them, and its latency."""

    feeds: Feeds
    names: list[str]
    outputs: list[np.ndarray]
    latency_ms: float


def reference(float_model: str | bytes, plan: ValidationPlan) -> Reference:
    """Run the float model on the plan's feeds (and time it when the plan says so)."""
    sess = session(float_model, "input model")
    feeds = build_feeds(sess, plan)
    return Reference(feeds, [o.name for o in sess.get_outputs()], _run_all(sess, feeds, "input model"),
                     _median_ms(sess, feeds.batches[0], plan.latency_runs))


def compare(float_model: str | bytes | Reference, quantized_model: str | bytes, plan: ValidationPlan,
            fold: bool = True) -> tuple[ValidationResult, dict[str, float] | None]:
    """Run both models on the same feeds: per-output drift (and accuracy with labels), and latency.
    The float model may come as its `Reference`, run once for several comparisons.

    One model lives in onnxruntime at a time: a big model and its folded copy would not fit together.
    `fold` False runs the converted model without graph optimizations (see `session`) and without
    timing it: its latency would not be the deployed one.
    """
    ref = float_model if isinstance(float_model, Reference) else reference(float_model, plan)
    feeds = ref.feeds
    candidate = session(quantized_model, "converted model", optimize=fold)
    new_out = _run_all(candidate, feeds, "converted model")
    new_ms = _median_ms(candidate, feeds.batches[0], plan.latency_runs if fold else 0)
    del candidate
    outputs = [_metrics(name, r, q) for name, r, q in zip(ref.names, ref.outputs, new_out)]
    accuracy = None
    if feeds.labels is not None:
        scores = next((i for i, m in enumerate(outputs) if m.top1_agreement is not None), None)
        if scores is not None:
            labels = feeds.labels.reshape(-1)
            accuracy = Accuracy(
                ref.names[scores],
                float(np.mean(_top1(ref.outputs[scores]) == labels)),
                float(np.mean(_top1(new_out[scores]) == labels)),
            )
    latency = {"float": ref.latency_ms, "converted": new_ms, "runs": float(plan.latency_runs)} if plan.latency_runs and fold else None
    return ValidationResult(feeds.source, feeds.samples, outputs, accuracy), latency


def run_batches(sess: ort.InferenceSession, feeds: Feeds, what: str, output_names: list[str] | None = None) -> Iterator[list[np.ndarray]]:
    """Each batch's outputs, one batch at a time; a failing run becomes a one-line error."""
    for feed in feeds.batches:
        try:
            yield sess.run(output_names, feed)
        except Exception as e:
            shapes = ", ".join(f"{k}[{'x'.join(map(str, v.shape))}]" for k, v in feed.items())
            raise CannotRunError(
                f"onnxruntime cannot run the {what} with inputs {shapes}: {first_line(e)} "
                "(set symbolic dimensions with --input-shape NAME=DIMS)",
                what,
            ) from e


def run_with_outputs(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, what: str) -> Iterator[dict[str, np.ndarray]]:
    """The named intermediate tensors of each batch, exposed as extra outputs of a copy of the model."""
    probe = without_weights(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(tensors) if t not in known)
    sess = model_session(model, what, skeleton=probe)
    del probe
    wanted = list(dict.fromkeys(tensors))
    for outputs in run_batches(sess, feeds, what, output_names=wanted):
        yield dict(zip(wanted, outputs))


def _run_all(sess: ort.InferenceSession, feeds: Feeds, what: str) -> list[np.ndarray]:
    outputs = []
    for per_output in zip(*run_batches(sess, feeds, what)):
        joined = np.concatenate([np.atleast_1d(o) for o in per_output], axis=0)
        outputs.append(joined[: len(joined) - feeds.padded] if feeds.padded else joined)
    return outputs


@np.errstate(all="ignore")  # NaN/Inf outputs give NaN metrics (reported as null), not warnings
def _metrics(name: str, reference: np.ndarray, quantized: np.ndarray) -> OutputMetrics:
    r = reference.astype(np.float64).reshape(-1)
    q = quantized.astype(np.float64).reshape(-1)
    error = np.abs(r - q)
    norms = np.linalg.norm(r) * np.linalg.norm(q)
    cosine = float(r @ q / norms) if norms > 0 else float(np.array_equal(r, q))
    agreement = None
    if _is_class_scores(reference):
        agreement = float(np.mean(_top1(reference) == _top1(quantized)))
    return OutputMetrics(
        name,
        tuple(reference.shape),
        float(error.max(initial=0.0)),
        float(error.mean()) if error.size else 0.0,
        snr_db(r, q),
        cosine,
        agreement,
    )


def _is_class_scores(output: np.ndarray) -> bool:
    """[N, C] (or [N, C, 1, 1]) with C > 1 and a float type."""
    squeezed = output.reshape(output.shape[:2]) if output.ndim > 2 and all(d == 1 for d in output.shape[2:]) else output
    return squeezed.ndim == 2 and squeezed.shape[1] > 1 and np.issubdtype(output.dtype, np.floating)


def _top1(output: np.ndarray) -> np.ndarray:
    return np.argmax(output.reshape(output.shape[0], -1), axis=1)


def _dtype(node_arg: ort.NodeArg) -> np.dtype:
    try:
        return np.dtype(ORT_TYPES[node_arg.type])
    except KeyError:
        raise UnsupportedModelError(f"input {node_arg.name!r} has type {node_arg.type}, which validation cannot feed") from None


def _load_labels(path: Path) -> np.ndarray:
    try:
        labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a readable .npy file: {first_line(e)}") from e
    if not isinstance(labels, np.ndarray) or labels.ndim != 1:
        raise InputError(f"{path}: expected a 1-D .npy array of class indices")
    return labels


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    values: np.ndarray
    if dtype == np.bool_:
        values = rng.random(shape) < 0.5
    elif np.issubdtype(dtype, np.integer):
        values = rng.integers(0, 256 if dtype == np.uint8 else 10, size=shape)  # pixels, or small ids
    else:
        values = rng.standard_normal(shape)
    return np.asarray(values, dtype=dtype)  # scalars (shape ()) too


def load_feeds(sess: ort.InferenceSession, path: Path, batch_size: int = DATA_BATCH) -> Feeds:
    """Feeds from an .npz holding one array per model input (axis 0 = samples) and maybe `labels`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file: {first_line(e)}") from e
    return feeds_from_arrays(sess, arrays, path, batch_size)


def feeds_from_arrays(sess: ort.InferenceSession, arrays: dict[str, np.ndarray], path: Path, batch_size: int = DATA_BATCH) -> Feeds:
    """Check arrays against the model's inputs (names, shapes, dtypes) and cut them into batches."""
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    counts = set()
    feeds: dict[str, np.ndarray] = {}
    for i in inputs:
        if i.name not in arrays:
            raise InputError(f"{path}: no array named {i.name!r} (model inputs: {', '.join(names)})")
        array, dtype = arrays[i.name], _dtype(i)
        expected = [d if isinstance(d, int) and d > 0 else None for d in i.shape]
        if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])):
            shown = "x".join(str(d) if d is not None else "?" for d in expected)
            raise InputError(f"{path}: array {i.name!r} has shape {'x'.join(map(str, array.shape))}, model input expects {shown} (axis 0 holds the samples)")
        if array.dtype != dtype:
            if array.dtype.kind != dtype.kind and not (array.dtype.kind in "iu" and dtype.kind in "iu"):
                raise InputError(f"{path}: array {i.name!r} is {array.dtype}, model input expects {dtype}")
            array = array.astype(dtype)
        feeds[i.name] = array
        counts.add(array.shape[0])
    labels = arrays.get(LABELS_KEY)
    if labels is not None:
        counts.add(labels.shape[0] if labels.ndim else -1)
    if len(counts) != 1 or min(counts) < 1:
        raise InputError(f"{path}: arrays disagree on the number of samples (axis 0), or hold none")
    samples = counts.pop()
    fixed = {i.shape[0] for i in inputs if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0}
    if len(fixed) == 1:  # the model takes exactly this many samples per run
        batch = fixed.pop()
        padded = -samples % batch
    else:
        batch, padded = batch_size, 0
    if padded:  # a fixed batch size: repeat the last sample to fill the final batch
        feeds = {k: np.concatenate([v, np.repeat(v[-1:], padded, axis=0)]) for k, v in feeds.items()}
    batches = [{k: v[s : s + batch] for k, v in feeds.items()} for s in range(0, samples + padded, batch)]
    return Feeds(batches, samples, str(path), labels, padded)


def _median_ms(sess: ort.InferenceSession, feed: dict[str, np.ndarray], runs: int) -> float:
    """Median onnxruntime run time (ms) on one batch, after a warm-up run."""
    if not runs:
        return 0.0
    sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))
