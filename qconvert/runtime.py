"""onnxruntime sessions and the inputs fed to them: what validation, calibration and the checks share."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

from qconvert import io
from qconvert.errors import CannotRunError, InputError, UnsupportedModelError, UsageError, first_line
from qconvert.images import Preprocessing, load_images
from qconvert.opset import is_hole, without_weights
from qconvert.plan import ValidationPlan

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
class Feeds:
    batches: list[dict[str, np.ndarray]]
    samples: int
    source: str
    labels: Any = None  # one per sample: an array (class labels ...), or a list (strings ...)
    padded: int = 0  # samples repeated to fill the last fixed-size batch


def session(
    model: str | bytes,
    what: str,
    *,
    probe: bool = False,
    optimize: bool = True,
    initializers: tuple[list[str], list[ort.OrtValue]] | None = None,
    folder: Path | None = None,
    threads: int | None = None,
    profile: Path | None = None,
) -> ort.InferenceSession:
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
    `threads`: onnxruntime's intra-op threads (default: its own choice, one per core), for timing: its pool
    then does not spin after a run, where sessions take turns (a spinning pool takes the core from the next).
    `profile`: where onnxruntime's profiler writes its trace (the path's prefix), None: no profiling.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile)
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


def model_session(
    model: onnx.ModelProto,
    what: str,
    *,
    skeleton: onnx.ModelProto | None = None,
    replaced: Mapping[str, np.ndarray] | None = None,
    probe: bool = False,
    threads: int | None = None,
) -> ort.InferenceSession:
    """A session of an in-memory model whose large weights onnxruntime reads from the input file, or
    takes as arrays.

    Serializing the model would copy every weight twice more (the bytes, and onnxruntime's parse of
    them) and fails past protobuf's 2 GB. `skeleton` is what runs: a copy of `model` without its large
    tensors' data (`opset.without_weights`), maybe with checks added; by default `model` itself. Its
    holes are filled from `replaced`, else from `model`'s initializers of the same name: those still
    in the input file (`io.is_lazy`) are read from there by onnxruntime, which then keeps only its
    optimized copy (on ResNet-50, 420 MB peak became 230 MB). `threads`: as `session`'s.
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
    sess = session(
        skeleton.SerializeToString(), what, probe=probe, initializers=(names, values), folder=folder, threads=threads
    )
    sess.qconvert_arrays = values  # type: ignore[attr-defined]  # onnxruntime reads them in place: they must outlive it
    return sess


def signature(model: onnx.ModelProto) -> ort.InferenceSession:
    """A session of the model's inputs alone, each passed through: its `get_inputs()` is the model's, at
    no cost (a session of the model itself holds every weight, twice once optimized)."""
    constants = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in constants]
    outputs = [f"qc_signature_{k}" for k in range(len(inputs))]
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", [i.name], [o]) for i, o in zip(inputs, outputs)],
        "signature",
        inputs,
        [onnx.helper.make_empty_tensor_value_info(o) for o in outputs],
    )
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
        labels = load_labels(plan.labels)
        if len(labels) != feeds.samples:
            raise InputError(f"{plan.labels}: {len(labels)} labels for {feeds.samples} samples in {plan.data}")
        return dataclasses.replace(feeds, labels=labels)
    if plan.labels is not None:
        raise UsageError("--labels go with --data (the samples they label)")
    rng = np.random.default_rng(plan.seed)
    shapes = {
        i.name: plan.input_shapes.get(i.name) or tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape)
        for i in inputs
    }
    batches = [{i.name: _random(rng, _dtype(i), shapes[i.name]) for i in inputs} for _ in range(plan.samples)]
    # A symbolic size past the batch set to 1 (an image's height and width) may not exercise the model at all.
    guessed = [
        f"{i.name} {'x'.join(map(str, shapes[i.name]))}"
        for i in inputs
        if i.name not in plan.input_shapes and any(not (isinstance(d, int) and d > 0) for d in i.shape[1:])
    ]
    note = f"; symbolic sizes set to 1: {', '.join(guessed)}" if guessed else ""
    return Feeds(batches, plan.samples, f"random (seed {plan.seed}{note})")


def run_batches(
    sess: ort.InferenceSession, feeds: Feeds, what: str, output_names: list[str] | None = None
) -> Iterator[list[np.ndarray]]:
    """Each batch's outputs, one batch at a time; a failing run becomes a one-line error."""
    floats = _float_inputs(sess)  # once, not per batch
    for feed in feeds.batches:
        try:
            yield sess.run(output_names, _fit(floats, feed))
        except Exception as e:
            shapes = ", ".join(f"{k}[{'x'.join(map(str, v.shape))}]" for k, v in feed.items())
            raise CannotRunError(
                f"onnxruntime cannot run the {what} with inputs {shapes}: {first_line(e)} "
                "(set symbolic dimensions with --input-shape NAME=DIMS)",
                what,
            ) from e


def fitted(sess: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The feed with its float arrays in the float type each input takes (a float16 model's float32 data)."""
    return _fit(_float_inputs(sess), feed)


def _float_inputs(sess: ort.InferenceSession) -> dict[str, type]:
    return {i.name: ORT_TYPES[i.type] for i in sess.get_inputs() if i.type in ("tensor(float)", "tensor(float16)")}


def _fit(floats: dict[str, type], feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(floats[k], copy=False) if v.dtype.kind == "f" and k in floats else v for k, v in feed.items()}


def run_with_outputs(
    model: onnx.ModelProto, tensors: list[str], feeds: Feeds, what: str
) -> Iterator[dict[str, np.ndarray]]:
    """The named intermediate tensors of each batch, exposed as extra outputs of a copy of the model."""
    probe = without_weights(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(t) for t in dict.fromkeys(tensors) if t not in known
    )
    sess = model_session(model, what, skeleton=probe)
    del probe
    wanted = list(dict.fromkeys(tensors))
    for outputs in run_batches(sess, feeds, what, output_names=wanted):
        yield dict(zip(wanted, outputs))


def _dtype(node_arg: ort.NodeArg) -> np.dtype:
    try:
        return np.dtype(ORT_TYPES[node_arg.type])
    except KeyError:
        raise UnsupportedModelError(
            f"input {node_arg.name!r} has type {node_arg.type}, which validation cannot feed"
        ) from None


def load_labels(path: Path) -> Any:
    """One label per sample: an .npy array (axis 0 = samples), or a .json list of anything (strings for OCR)."""
    try:
        if path.suffix.lower() == ".json":
            labels = json.loads(path.read_text())
        else:
            labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not a readable .npy or .json file of labels: {first_line(e)}") from e
    if isinstance(labels, np.ndarray) and labels.ndim >= 1 or isinstance(labels, list):
        return labels
    raise InputError(f"{path}: expected one label per sample (an array, or a JSON list)")


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


def feeds_from_arrays(
    sess: ort.InferenceSession, arrays: dict[str, np.ndarray], path: Path, batch_size: int = DATA_BATCH
) -> Feeds:
    """Check arrays against the model's inputs (names, shapes, dtypes) and cut them into batches."""
    inputs = sess.get_inputs()
    feeds = {i.name: _matched(i, arrays, path, [j.name for j in inputs]) for i in inputs}
    labels = arrays.get(LABELS_KEY)
    counts = {a.shape[0] for a in feeds.values()} | (
        {labels.shape[0] if labels.ndim else -1} if labels is not None else set()
    )
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


def _matched(node_arg: ort.NodeArg, arrays: dict[str, np.ndarray], path: Path, names: list[str]) -> np.ndarray:
    """The array for a model input, checked against its shape and converted to its type."""
    if node_arg.name not in arrays:
        raise InputError(f"{path}: no array named {node_arg.name!r} (model inputs: {', '.join(names)})")
    array, dtype = arrays[node_arg.name], _dtype(node_arg)
    expected = [d if isinstance(d, int) and d > 0 else None for d in node_arg.shape]
    if array.ndim != len(expected) or any(e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])):
        shown = "x".join(str(d) if d is not None else "?" for d in expected)
        raise InputError(
            f"{path}: array {node_arg.name!r} has shape {'x'.join(map(str, array.shape))}, model input "
            f"expects {shown} (axis 0 holds the samples)"
        )
    if array.dtype != dtype:
        if array.dtype.kind != dtype.kind and not (array.dtype.kind in "iu" and dtype.kind in "iu"):
            raise InputError(f"{path}: array {node_arg.name!r} is {array.dtype}, model input expects {dtype}")
        array = array.astype(dtype)
    return array


CALIBRATION_BATCH = (
    1  # samples per calibration run: a CNN runs as fast one at a time, and holds one sample's activations
)


def calibration_feeds(model: onnx.ModelProto, path: Path, preprocessing: Preprocessing) -> Feeds:
    """Batches from a calibration .npz, or from a folder of images for a single-input model."""
    sess = signature(model)
    if not path.is_dir():
        return load_feeds(sess, path, batch_size=CALIBRATION_BATCH)
    inputs = sess.get_inputs()
    if len(inputs) != 1:
        raise UsageError(f"a folder of images calibrates single-input models; this one has {len(inputs)} (use an .npz)")
    images = load_images(path, list(inputs[0].shape), preprocessing)
    return feeds_from_arrays(sess, {inputs[0].name: images}, path, batch_size=CALIBRATION_BATCH)
