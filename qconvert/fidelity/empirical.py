"""Empirical bias correction for full QDQ (Nagel et al. 2019, "Data-Free Quantization", section 4.2, with data).

Rounding the activations shifts the mean of what each layer sees, channel by channel: a channel whose values
sit between two steps of its tensor's grid rounds the same way every time. On the PP-OCRv4 detector more than
half of the error energy of most tensors is such a per-channel mean. Each integer layer's bias absorbs the mean
error of its output, measured in the quantized model against the float model on calibration samples, layer by
layer in graph order: a layer's correction changes what every layer after it sees, so they are measured after
it (correcting all at once from one measurement overshoots by the errors the earlier corrections remove).

`activations.insert` fits it on each half of the calibration samples, judges each fit on the other half, and
keeps the mean of the two where both raise the worst output SNR there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io
from qconvert.fidelity.statistics import reduction
from qconvert.opset import default_opset, without_weights
from qconvert.rewrite import NameSource, readers_of, use_counts
from qconvert.runtime import Feeds, model_session, run_batches
from qconvert.select import constant_tensors

LAYERS = ("Conv", "Gemm")
FIT_BATCHES = 8  # calibration batches a fit measures on (a run of the model per layer and batch) ...
FIT_MACS = 5e11  # ... fewer where those runs would pass this many multiply-accumulates (ResNet-50: 2) ...
MIN_FIT_BATCHES = 2  # ... and none under this many
FLOAT_SUFFIX = "_qc_float"  # `qdq.insert_activation_qdq`: a quantized op's output T is T_qc_float, then Q -> DQ -> T


@dataclass
class Targets:
    """What the float model gives on the calibration batches: per integer layer (by the name of the tensor the
    ops after it read once activations are absorbed) the rank of its output and the per-channel mean of its own
    output (before the activation) on each batch; and the model's outputs on each batch."""

    ranks: dict[str, int]
    means: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: list[list[np.ndarray]] = field(default_factory=list)
    macs: float = 0.0  # multiply-accumulates of these layers per sample: what a run of the model costs

    def batches(self) -> int:
        """How many calibration batches a fit measures on: FIT_BATCHES, fewer where a run per layer and batch
        would pass FIT_MACS (0: none, too costly)."""
        affordable = FIT_MACS / max(self.macs * len(self.ranks), 1.0)
        return int(min(FIT_BATCHES, affordable)) if affordable >= MIN_FIT_BATCHES else 0


@dataclass
class Layer:
    node: onnx.NodeProto  # the integer layer
    tensor: str  # what the ops after it read, by name (`Targets`)
    bias: np.ndarray  # float, per output channel


def float_targets(model: onnx.ModelProto, quantized: set[str], absorbed: dict[str, str], feeds: Feeds) -> Targets:
    """The targets in `model` (the float one, its weights not yet quantized) for the layers whose weights are
    `quantized` (`absorbed`: a layer's output -> the activation's that will replace it)."""
    constants = constant_tensors(model.graph)
    ranks, keys = {}, []
    for node in model.graph.node:
        if node.op_type in LAYERS and len(node.input) > 2 and node.input[1] in quantized and node.input[1] in constants:
            ranks[node.output[0]] = len(constants[node.input[1]].dims)
            keys.append(absorbed.get(node.output[0], node.output[0]))
    static = _static_macs(model, ranks, constants)
    if static is not None and not Targets(dict.fromkeys(keys, 0), macs=static).batches():
        return Targets(dict(zip(keys, ranks.values())), macs=static)  # too costly to fit: nothing to measure
    probe, means, sizes = _probe(model, ranks)
    names = [o.name for o in model.graph.output]
    sess = model_session(model, "float model", skeleton=probe, probe=True)
    runs = list(run_batches(sess, feeds, "float model", [*names, *means, *sizes]))
    outputs = [run[: len(names)] for run in runs]
    by_key = {key: [run[len(names) + i] for run in runs] for i, key in enumerate(keys)}
    per_sample = runs[0][len(names) + len(means) :] if runs else []
    samples = len(next(iter(feeds.batches[0].values()))) if feeds.batches else 1
    weights = [int(np.prod(constants[n.input[1]].dims)) for n in model.graph.node if n.output[0] in ranks]
    macs = sum(w * float(size) for w, size in zip(weights, per_sample)) / max(samples, 1)
    return Targets(dict(zip(keys, ranks.values())), by_key, outputs, macs)


def _static_macs(model: onnx.ModelProto, ranks: dict[str, int], constants: dict[str, onnx.TensorProto]) -> float | None:
    """The layers' multiply-accumulates per sample from the shapes ONNX infers (None: some are not fixed)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    except Exception:  # inference fails on some exported models
        return None
    shapes = {v.name: v.type.tensor_type.shape.dim for v in (*inferred.value_info, *inferred.output)}
    macs = 0.0
    for node in model.graph.node:
        dims = shapes.get(node.output[0]) if node.output[0] in ranks else None
        if node.output[0] in ranks and (dims is None or not all(d.HasField("dim_value") for d in dims[2:])):
            return None
        if dims is not None:
            macs += float(np.prod(constants[node.input[1]].dims)) * float(np.prod([d.dim_value for d in dims[2:]]))
    return macs


def fit(model: onnx.ModelProto, targets: Targets, feeds: Feeds, batches: slice) -> dict[str, np.ndarray]:
    """The biases of the model's integer layers (by their node's output), layer by layer in graph order, that
    bring each output's per-channel mean on these batches to the float model's (`_shrunk`)."""
    layers = _layers(model, set(targets.means))
    if not layers:
        return {}
    probe, outputs, _ = _probe(model, {layer.node.output[0]: targets.ranks[layer.tensor] for layer in layers})
    inputs = _biases_as_inputs(probe, layers)
    sess = model_session(model, "quantized model", skeleton=probe, probe=True)
    some = feeds.batches[batches][: targets.batches()]
    fitted = Feeds(some, len(some), feeds.source)
    for index, layer in enumerate(layers):
        bias_feeds = {name: other.bias.astype(np.float32) for name, other in zip(inputs, layers)}
        with_biases = Feeds([{**feed, **bias_feeds} for feed in fitted.batches], fitted.samples, fitted.source)
        runs = list(run_batches(sess, with_biases, "quantized model", [outputs[index]]))
        errors = np.stack([run[0] for run in runs]) - np.stack(targets.means[layer.tensor][batches][: len(some)])
        layer.bias = layer.bias - _shrunk(errors)
    return {layer.node.output[0]: layer.bias for layer in layers}


def apply(model: onnx.ModelProto, biases: dict[str, np.ndarray]) -> None:
    """Write these biases (`fit`'s, by their layer's output) into the model, in place, each in its form: int32 on
    its scale, or float."""
    graph = model.graph
    constants = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    for node in graph.node:
        bias = biases.get(node.output[0]) if node.op_type in LAYERS else None
        if bias is None:
            continue
        name = node.input[2]
        if name in constants:
            constants[name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), constants[name].name))
            continue
        stored, scale = (constants[i] for i in producer[name].input[:2])
        limit = np.iinfo(np.int32)
        q = np.clip(np.round(bias / io.tensor_array(scale).astype(np.float64)), limit.min, limit.max)
        stored.CopyFrom(numpy_helper.from_array(q.astype(np.int32), stored.name))


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
    readers = readers_of(graph)
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
            layers.append(Layer(node, tensor, found))
    return layers


def _dequantized(layer: onnx.NodeProto, producer: dict[str, onnx.NodeProto]) -> bool:
    return all(i in producer and producer[i].op_type == "DequantizeLinear" for i in layer.input[:2])


def _bias(
    layer: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
    uses: dict[str, int],
) -> np.ndarray | None:
    """The layer's bias, its own, as floats (float, or int32 on a scale); None: a form not handled (none,
    shared, 2-D, a Gemm's scaled by beta)."""
    name = layer.input[2] if len(layer.input) > 2 else ""
    if not name or uses.get(name) != 1 or any(a.name == "beta" and a.f != 1.0 for a in layer.attribute):
        return None
    if name in constants:
        value = io.tensor_array(constants[name])
        return value.astype(np.float64) if value.dtype == np.float32 and value.ndim == 1 else None
    dequantize = producer.get(name)
    if dequantize is None or dequantize.op_type != "DequantizeLinear" or len(dequantize.input) > 2:
        return None
    if not all(i in constants for i in dequantize.input[:2]):
        return None
    q, scale = (io.tensor_array(constants[i]) for i in dequantize.input[:2])
    if q.dtype != np.int32 or q.ndim != 1 or uses.get(dequantize.input[0]) != 1:
        return None
    return q * scale.astype(np.float64)


def _probe(model: onnx.ModelProto, tensors: dict[str, int]) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """A copy of the model without its large weights' data (`model_session` reads them from the model) that also
    outputs each tensor's mean per channel (axis 1), and how many values each mean is over."""
    probe = without_weights(model)
    graph, fresh, opset = probe.graph, NameSource(probe), default_opset(probe)
    outputs, sizes = [], []
    for name, rank in tensors.items():
        total = fresh(f"{name}_qc_channel_sum")
        axes = [0, *range(2, rank)]
        graph.node.extend(reduction("ReduceSum", name, axes, total, graph, fresh, opset))
        mean, size = fresh(f"{name}_qc_channel_mean"), _size(graph, name, axes, fresh)
        graph.node.append(helper.make_node("Div", [total, size], [mean]))
        graph.output.extend(helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in (mean, size))
        outputs.append(mean)
        sizes.append(size)
    return probe, outputs, sizes


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
