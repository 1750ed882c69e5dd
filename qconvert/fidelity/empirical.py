"""Empirical bias correction for full QDQ (Nagel et al. 2019, "Data-Free Quantization", section 4.2, with data).

Rounding the activations shifts the mean of what each layer sees, channel by channel: a channel whose values
sit between two steps of its tensor's grid rounds the same way every time. On the PP-OCRv4 detector more than
half of the error energy of most tensors is such a per-channel mean. Each integer layer's bias absorbs the mean
error of its output, measured in the quantized model against the float model on calibration samples, layer by
layer in graph order: a layer's correction changes what every layer after it sees, so they are measured after
it (correcting all at once from one measurement overshoots by the errors the earlier corrections remove).

The correction is fitted on the even calibration samples and kept only where it raises the worst output SNR on
the odd ones (`activations.insert` judges).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io
from qconvert.fidelity.statistics import reduction
from qconvert.opset import default_opset, without_weights
from qconvert.rewrite import NameSource, use_counts
from qconvert.runtime import Feeds, model_session, run_batches
from qconvert.select import constant_tensors

LAYERS = ("Conv", "Gemm")
FLOAT_SUFFIX = "_qc_float"  # `qdq.insert_activation_qdq`: a quantized op's output T is T_qc_float, then Q -> DQ -> T


@dataclass
class Targets:
    """What the float model gives on the calibration batches: per integer layer (by the name of the tensor the
    ops after it read once activations are absorbed) the rank of its output and the per-channel mean of its own
    output (before the activation) on each batch; and the model's outputs on each batch."""

    ranks: dict[str, int]
    means: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: list[list[np.ndarray]] = field(default_factory=list)


@dataclass
class Layer:
    node: onnx.NodeProto  # the integer layer
    tensor: str  # what the ops after it read, by name (`Targets`)
    bias: np.ndarray  # float, per output channel
    scale: np.ndarray | None  # of its int32 bias (None: a float bias)


def float_targets(model: onnx.ModelProto, quantized: set[str], absorbed: dict[str, str], feeds: Feeds) -> Targets:
    """The targets in `model` (the float one, its weights not yet quantized) for the layers whose weights are
    `quantized` (`absorbed`: a layer's output -> the activation's that will replace it)."""
    constants = constant_tensors(model.graph)
    ranks, keys = {}, []
    for node in model.graph.node:
        if node.op_type in LAYERS and len(node.input) > 2 and node.input[1] in quantized and node.input[1] in constants:
            ranks[node.output[0]] = len(constants[node.input[1]].dims)
            keys.append(absorbed.get(node.output[0], node.output[0]))
    probe, means = _probe(model, ranks)
    names = [o.name for o in model.graph.output]
    sess = model_session(model, "float model", skeleton=probe)
    runs = list(run_batches(sess, feeds, "float model", [*names, *means]))
    outputs = [run[: len(names)] for run in runs]
    by_key = {key: [run[len(names) + i] for run in runs] for i, key in enumerate(keys)}
    return Targets(dict(zip(keys, ranks.values())), by_key, outputs)


def correct(model: onnx.ModelProto, targets: Targets, feeds: Feeds, batches: slice) -> int:
    """Shift the biases of the model's integer layers, in place, layer by layer in graph order, so that each
    output's per-channel mean on these batches is the float model's; returns how many layers."""
    layers = _layers(model, set(targets.means))
    if not layers:
        return 0
    probe, outputs = _probe(model, {layer.node.output[0]: targets.ranks[layer.tensor] for layer in layers})
    inputs = _biases_as_inputs(probe, layers)
    sess = model_session(model, "quantized model", skeleton=probe)
    fit = Feeds(feeds.batches[batches], len(feeds.batches[batches]), feeds.source)
    for index, layer in enumerate(layers):
        bias_feeds = {name: other.bias.astype(np.float32) for name, other in zip(inputs, layers)}
        with_biases = Feeds([{**feed, **bias_feeds} for feed in fit.batches], fit.samples, fit.source)
        runs = list(run_batches(sess, with_biases, "quantized model", [outputs[index]]))
        errors = np.stack([run[0] for run in runs]) - np.stack(targets.means[layer.tensor][batches])
        layer.bias = layer.bias - _shrunk(errors)
    _write_back(model, layers)
    return len(layers)


def _shrunk(errors: np.ndarray) -> np.ndarray:
    """The mean of per-batch mean errors (batches x channels), each channel's shrunk towards 0 by how little its
    batches agree: by (1 - se² / mean²)⁺, se the mean's standard error. A layer that sees one value per channel
    and sample (after a global pool) would otherwise take the noise of a few samples for a bias."""
    mean = errors.mean(axis=0)
    if len(errors) < 2:
        return mean
    variance = errors.var(axis=0, ddof=1) / len(errors)
    with np.errstate(divide="ignore", invalid="ignore"):
        keep = np.where(mean != 0, np.clip(1 - variance / mean**2, 0, 1), 0)
    return mean * keep


def _layers(model: onnx.ModelProto, tensors: set[str]) -> list[Layer]:
    """The integer layers (weight and input from DequantizeLinear, output to one QuantizeLinear) whose output is
    one of the float model's `tensors` (`insert_activation_qdq` names it T_qc_float), in graph order, with their
    biases as floats."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    constants = constant_tensors(graph)
    uses = use_counts(graph)
    layers = []
    for node in graph.node:
        tensor = node.output[0].removesuffix(FLOAT_SUFFIX) if node.output else ""
        after = readers.get(node.output[0], []) if tensor in tensors else []
        if node.op_type not in LAYERS or len(after) != 1 or after[0].op_type != "QuantizeLinear":
            continue
        found = _bias(node, producer, constants, uses) if _dequantized(node, producer) else None
        if found is not None:
            layers.append(Layer(node, tensor, *found))
    return layers


def _dequantized(layer: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    return all(i in producer and producer[i].op_type == "DequantizeLinear" for i in layer.input[:2])


def _bias(
    layer: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
    uses: dict[str, int],
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """The layer's bias, its own, as floats, and the scale of its int32 form (None: float); None: a form not
    handled (none, shared, 2-D, a Gemm's scaled by beta)."""
    name = layer.input[2] if len(layer.input) > 2 else ""
    if not name or uses.get(name) != 1 or any(a.name == "beta" and a.f != 1.0 for a in layer.attribute):
        return None
    if name in constants:
        value = io.tensor_array(constants[name])
        return (value.astype(np.float64), None) if value.dtype == np.float32 and value.ndim == 1 else None
    dequantize = producer.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.input) > 2:
        return None
    if not all(i in constants for i in dequantize.input[:2]):
        return None
    q, scale = (io.tensor_array(constants[i]) for i in dequantize.input[:2])
    if q.dtype != np.int32 or q.ndim != 1 or uses.get(dequantize.input[0]) != 1:
        return None
    scale = np.broadcast_to(scale.astype(np.float64), q.shape)
    return q * scale, scale


def _probe(model: onnx.ModelProto, tensors: dict[str, int]) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of the model without its large weights' data (`model_session` reads them from the model) that also
    outputs each tensor's mean per channel (axis 1)."""
    probe = without_weights(model)
    graph, fresh, opset = probe.graph, NameSource(probe), default_opset(probe)
    outputs = []
    for name, rank in tensors.items():
        total = fresh(f"{name}_qc_channel_sum")
        axes = [0, *range(2, rank)]
        graph.node.extend(reduction("ReduceSum", name, axes, total, graph, fresh, opset))
        mean = fresh(f"{name}_qc_channel_mean")
        graph.node.append(helper.make_node("Div", [total, _size(graph, name, axes, fresh)], [mean]))
        graph.output.append(helper.make_tensor_value_info(mean, onnx.TensorProto.FLOAT, None))
        outputs.append(mean)
    return probe, outputs


def _size(graph: onnx.GraphProto, name: str, axes: list[int], fresh: NameSource) -> str:
    """The number of elements each channel sums over, computed in the graph (shapes may be symbolic)."""
    shape, size = fresh(f"{name}_qc_shape"), fresh(f"{name}_qc_size")
    picked, product = fresh(f"{name}_qc_reduced_dims"), fresh(f"{name}_qc_reduced_size")
    indices = numpy_helper.from_array(np.array(axes, np.int64), fresh(f"{name}_qc_reduced_axes"))
    graph.initializer.append(indices)
    graph.node.extend(
        [
            helper.make_node("Shape", [name], [shape]),
            helper.make_node("Gather", [shape, indices.name], [picked]),
            helper.make_node("ReduceProd", [picked], [product], keepdims=0),
            helper.make_node("Cast", [product], [size], to=onnx.TensorProto.FLOAT),
        ]
    )
    return size


def _biases_as_inputs(probe: onnx.ModelProto, layers: list[Layer]) -> list[str]:
    """The probe's layers read their biases from new float inputs, one per layer: their names."""
    fresh = NameSource(probe)
    by_output = {node.output[0]: node for node in probe.graph.node}
    names = []
    for layer in layers:
        name = fresh(f"{layer.node.output[0]}_qc_bias_input")
        by_output[layer.node.output[0]].input[2] = name
        probe.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [len(layer.bias)]))
        names.append(name)
    return names


def _write_back(model: onnx.ModelProto, layers: list[Layer]) -> None:
    """Each layer's bias in its form: int32 on its scale, or float."""
    graph = model.graph
    constants = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    for layer in layers:
        name = layer.node.input[2]
        if layer.scale is None:
            constants[name].CopyFrom(numpy_helper.from_array(layer.bias.astype(np.float32), constants[name].name))
            continue
        stored = constants[producer[name].input[0]]
        limit = np.iinfo(np.int32)
        q = np.clip(np.round(layer.bias / layer.scale), limit.min, limit.max).astype(np.int32)
        stored.CopyFrom(numpy_helper.from_array(q, stored.name))
