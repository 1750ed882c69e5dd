"""Input statistics of the layers being quantized: E[x] and E[x²] per input channel from the calibration data,
reduced in the graph, and the error weights (importance) they give."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.calibrate import Part, Sampler
from qconvert.fidelity import hessian
from qconvert.rewrite import After, NameSource
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections
from qconvert.select import MAIN_GRAPH, Weight, constant_value

IMPORTANCE_FLOOR = 1e-6  # dead input channels still count a little: keeps the weighted k-means well posed
CHECK_SAMPLES = 8  # calibration samples that the layer and whole-model checks run on (statistics use all) ...
CHECK_BUDGET = 32 << 20  # ... or fewer, down to MIN_CHECK_SAMPLES, to keep weights × samples within this
MIN_CHECK_SAMPLES = 4


CONVOLUTIONS = ("Conv", "ConvTranspose")


@dataclass(frozen=True)
class Layer:
    """A float32 weight read by exactly one Conv, ConvTranspose, Gemm or MatMul of the main graph.

    y = x·W (Gemm/MatMul) or y = conv(x, W): the mean and energy of x per input channel say what
    each weight's error costs at the output.
    """

    weight: str
    node: onnx.NodeProto  # the consumer, in the model's graph (valid until the graph is rebuilt)
    x_axis: int  # the input channel axis of x (Conv 1, Gemm 1 or 0 by transA, MatMul last)
    in_axis: int  # the weight's input-channel axis (Conv 1, ConvTranspose 0, Gemm 0 or 1 by transB, MatMul 0)
    out_axis: int  # the weight's output-channel axis
    weight_shape: tuple[int, ...]
    groups: int = 1  # Conv groups: output channel o reads input channels of group o // (Cout / groups)
    bias_editable: bool = True  # no bias, or a constant one: a bias shift can be applied

    @property
    def in_channels(self) -> int:
        """Channels of x along x_axis."""
        if self.op_type == "Conv":
            return self.weight_shape[1] * self.groups
        return self.weight_shape[self.in_axis]

    @property
    def op_type(self) -> str:
        return self.node.op_type

    @property
    def mean_gain(self) -> float:
        """What Σ E[x]·W over the weight's other axes is multiplied by to give an output channel's mean: a Gemm's
        alpha; for a ConvTranspose 1 / prod(strides), as an input pixel's taps spread over that many output pixels
        (exact where they tile the output); else 1."""
        attributes = {a.name: helper.get_attribute_value(a) for a in self.node.attribute}
        if self.op_type == "Gemm":
            return float(attributes.get("alpha", 1.0))
        if self.op_type == "ConvTranspose":
            return 1.0 / float(np.prod(attributes.get("strides", [1])))
        return 1.0

    @property
    def convolution(self) -> bool:
        """A Conv or ConvTranspose: x and y are [N, C, *spatial], and the weight's columns are patches (`hessian`)."""
        return self.op_type in CONVOLUTIONS


@dataclass(frozen=True)
class Moments:
    """Per input channel of a layer: E[x] and E[x²] over the calibration data."""

    mean: np.ndarray  # [Cin] float64
    square: np.ndarray  # [Cin] float64


def find_layers(model: onnx.ModelProto, weights: list[Weight]) -> dict[str, Layer]:
    """The weights these techniques apply to, by name; the others (subgraphs, shared weights, RNNs,
    weights also read as data, non-float32) are quantized plainly."""
    wanted = {w.name: w for w in weights if _plain_layer_weight(w)}
    constants = {t.name for t in model.graph.initializer} | {
        n.output[0] for n in model.graph.node if constant_value(n) is not None
    }
    layers = {}
    for node in model.graph.node:
        weight = wanted.get(node.input[1]) if len(node.input) >= 2 else None
        if weight is not None and node.op_type == weight.consumers[0].op_type:
            editable = len(node.input) < 3 or not node.input[2] or node.input[2] in constants
            if (layer := _layer(node, weight, editable)) is not None:
                layers[weight.name] = layer
    return layers


def _plain_layer_weight(weight: Weight) -> bool:
    """A float32 weight of the main graph that one Conv, Gemm or MatMul reads, and nothing else."""
    return (
        weight.graph_path == MAIN_GRAPH
        and len(weight.consumers) == 1
        and not weight.other_readers
        and weight.tensor.data_type == onnx.TensorProto.FLOAT
        and weight.consumers[0].op_type in (*CONVOLUTIONS, "Gemm", "MatMul")
    )


def _layer(node: onnx.NodeProto, weight: Weight, editable: bool) -> Layer | None:
    """The axes of the layer's input and weight (None: a layout these techniques do not handle)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    rank = len(weight.shape)
    if node.op_type == "Conv" and rank >= 3:
        return Layer(weight.name, node, 1, 1, 0, weight.shape, int(attrs.get("group", 1)), editable)
    if node.op_type == "ConvTranspose" and rank >= 3:  # the weight is [Cin, Cout/G, *kernel]
        return Layer(weight.name, node, 1, 0, 1, weight.shape, int(attrs.get("group", 1)), editable)
    if node.op_type == "Gemm":
        trans_b = int(attrs.get("transB", 0))
        return Layer(
            weight.name, node, 0 if attrs.get("transA", 0) else 1, trans_b, 1 - trans_b, weight.shape, 1, editable
        )
    if node.op_type == "MatMul" and rank == 2:
        return Layer(weight.name, node, -1, 0, 1, weight.shape)
    return None


@dataclass(frozen=True)
class Split:
    """Which calibration batches the checks run on (`held`: the last ones), which the statistics come from
    (`learned`: the others; all of them when there is a single batch), and on which of those the same
    checks run again for the report (`in_sample`: as many as are held out; none on big models, whose
    checks are cut to save time)."""

    held: list[int]
    learned: list[int]
    in_sample: list[int]

    @staticmethod
    def of(feeds: Feeds, layers: dict[str, Layer]) -> Split:
        """CHECK_SAMPLES held out, or down to MIN_CHECK_SAMPLES for big models (ResNet-50: 4), at most half
        the batches. Every check costs a model run per sample, and on a big model the samples agree: the
        whole-model variants of ResNet-50-, MobileNetV2-shaped and digits models ranked the same on either
        half of 8 samples."""
        elements = sum(int(np.prod(layer.weight_shape)) for layer in layers.values())
        wanted = int(np.clip(CHECK_BUDGET // max(elements, 1), MIN_CHECK_SAMPLES, CHECK_SAMPLES))
        total = len(feeds.batches)
        count, samples = 0, 0
        while count < max(total // 2, 1) and samples < wanted:
            samples += len(next(iter(feeds.batches[total - 1 - count].values())))
            count += 1
        held = list(range(total - count, total))
        if total == 1:
            return Split(held, held, [])
        return Split(held, list(range(total - count)), list(range(count)) if wanted == CHECK_SAMPLES else [])


def subset(feeds: Feeds, indices: list[int]) -> Feeds:
    """Copies of those batches (not views: the rest can go)."""
    batches = [{name: np.array(array) for name, array in feeds.batches[i].items()} for i in indices]
    return Feeds(batches, sum(len(next(iter(b.values()))) for b in batches), feeds.source)


@dataclass(frozen=True)
class Statistics:
    """What one onnxruntime pass over the calibration data gives."""

    moments: dict[str, Moments]  # per layer, from the batches not held out
    reference: list[np.ndarray]  # the model's outputs on `checks`, the reference of the whole-model check
    ranges: dict[str, tuple[float, float]]  # min and max of the tensors asked for, over all batches
    checks: Feeds  # what the layer and whole-model checks run on: the held-out batches (`Split`)
    hessians: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per layer: Σ x xᵀ (`hessian`)
    in_sample: Feeds | None = None  # as many batches the statistics came from (None: not checked there)
    in_sample_reference: list[np.ndarray] = dataclasses.field(default_factory=list)
    held_out: bool = False  # the checks run on batches the statistics did not come from
    all_moments: dict[str, Moments] = dataclasses.field(default_factory=dict)  # from every batch
    held_hessians: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # H of the held-out batches
    parts: dict[str, list[Part]] = dataclasses.field(default_factory=dict)  # samples of the tensors asked for
    learned: list[int] = dataclasses.field(default_factory=list)  # the batches `moments` came from


def input_moments(
    model: onnx.ModelProto,
    layers: dict[str, Layer],
    feeds: Feeds,
    extremes: list[str] | None = None,
    second_moments: Collection[str] = (),
    sampled: bool = False,
) -> Statistics:
    """E[x] and E[x²] per input channel of each layer, in one onnxruntime pass, from the batches that the
    checks do not run on (`Split`); the model's outputs on the checks' batches; the min and max of the
    `extremes` tensors (activation ranges) over all batches (`sampled`: and samples of their values, `Sampler`);
    and for the layers named in `second_moments`,
    H = Σ x xᵀ over its weight's columns (`hessian`, reduced in the graph too).

    Everything is reduced in the graph as soon as the tensor exists (`add_after`) (ReduceSum, ReduceSumSquare,
    Size, ReduceMin, ReduceMax), so only vectors come back and onnxruntime frees every activation as usual.
    The pass runs in sections (`Sections`), each section's readers in one `add_after` call.
    """
    keys: dict[_Key, tuple[str, str, str]] = {}  # -> sum, sum of squares, size
    sampler = Sampler(extremes or [], len(feeds.batches), sampled=sampled)
    model_outputs = [o.name for o in model.graph.output]
    hessians = hessian.wanted({name: layer for name, layer in layers.items() if name in second_moments})
    second: dict[str, str] = {}  # layer -> the output that holds one batch's H

    def readers(section: Section) -> None:
        for layer in layers.values():
            key = (layer.node.input[0], layer.x_axis, layer.in_channels)
            if key not in keys and key[0] in section.made:
                keys[key] = _channel_sums(layer, section)
                section.wanted += keys[key]
        for name in hessians:
            if name not in second and layers[name].node.input[0] in section.made:
                second[name] = hessian.readers(layers[name], section)
                section.wanted.append(second[name])
        sampler.read(section)
        if section.complete:
            section.wanted += model_outputs

    split = Split.of(feeds, layers)
    held_out = split.learned != split.held
    learned, held = _Sums(hessians), _Sums({n: np.zeros_like(h) for n, h in hessians.items()} if held_out else {})
    outputs: dict[int, list[np.ndarray]] = {}
    checked = set(split.held + split.in_sample)  # the batches whose model outputs the checks compare with
    for index, values in zip(
        itertools.cycle(range(len(feeds.batches))), Sections(model, feeds, "model for calibration").passes(readers)
    ):
        if model_outputs and model_outputs[0] in values and index in checked:
            outputs[index] = [values[o] for o in model_outputs]  # the last section: the model's outputs too
        sampler.add(values)
        (learned if index in split.learned else held).add(values, second, keys)
    moments = learned.moments(layers, keys)

    def joined(indices: list[int]) -> list[np.ndarray]:
        return [np.concatenate(o).astype(np.float64) for o in zip(*(outputs[i] for i in indices))] if outputs else []

    in_sample = subset(feeds, split.in_sample) if split.in_sample else None
    return Statistics(
        moments,
        joined(split.held),
        sampler.ranges(),
        subset(feeds, split.held),
        hessians,
        in_sample,
        joined(split.in_sample),
        held_out,
        held.moments(layers, keys, learned) if held_out else moments,
        held.hessians,
        sampler.parts() if sampled else {},
        split.learned,
    )


class _Sums:
    """Running sums over some batches: the reductions' outputs, and each layer's H (`hessians`, in place)."""

    def __init__(self, hessians: dict[str, np.ndarray]) -> None:
        self.totals: dict[str, np.ndarray] = {}
        self.hessians = hessians

    def add(
        self, values: dict[str, np.ndarray], second: dict[str, str], keys: dict[_Key, tuple[str, str, str]]
    ) -> None:
        for name, into in self.hessians.items():
            if name in second and second[name] in values:
                into += np.asarray(values[second[name]], np.float32).reshape(into.shape)
        for sums in keys.values():
            for name in sums:
                if name in values:
                    self.totals[name] = self.totals.get(name, 0) + np.asarray(values[name], np.float64)

    def moments(
        self, layers: dict[str, Layer], keys: dict[_Key, tuple[str, str, str]], plus: _Sums | None = None
    ) -> dict[str, Moments]:
        """E[x] and E[x²] per input channel of each layer, over these batches (and those of `plus`)."""
        found = {}
        for name, layer in layers.items():
            outputs = keys[layer.node.input[0], layer.x_axis, layer.in_channels]
            total, squares, size = (self.totals[o] + (plus.totals[o] if plus else 0) for o in outputs)
            count = float(size) / layer.in_channels
            if count > 0 and total.shape == (layer.in_channels,):
                found[name] = Moments(total / count, squares / count)
        return found


_Key = tuple[str, int, int]  # a layer input's reductions: (x, channel axis, Cin)


def _channel_sums(layer: Layer, section: Section) -> tuple[str, str, str]:
    """Readers of the layer's input x that reduce it per input channel: Σx, Σx² and the size of x."""
    graph, fresh = section.graph, section.fresh
    x = layer.node.input[0]
    nodes = section.after.setdefault(x, After()).nodes
    if layer.convolution:
        axes = [0, *range(2, len(layer.weight_shape))]
    elif layer.op_type == "Gemm":
        axes = [1 - layer.x_axis]
    else:  # MatMul: [..., K] -> [rows, K]
        shape = fresh(f"{x}_qc_rows_shape")
        graph.initializer.append(numpy_helper.from_array(np.array([-1, layer.in_channels], np.int64), shape))
        rows = fresh(f"{x}_qc_rows")
        nodes.append(helper.make_node("Reshape", [x, shape], [rows]))
        x, axes = rows, [0]
    outputs = (fresh(f"{x}_qc_sum"), fresh(f"{x}_qc_sum_squares"), fresh(f"{x}_qc_size"))
    for op, out in zip(("ReduceSum", "ReduceSumSquare"), outputs):
        nodes += reduction(op, x, axes, out, graph, fresh, section.opset)
    nodes.append(helper.make_node("Size", [x], [outputs[2]]))
    return outputs


def per_weight(layer: Layer, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """Per-input-channel values ([Cin] of x) laid out to broadcast against the weight; None if the
    channel counts do not match (a layout this module does not understand)."""
    if layer.op_type == "Conv":
        cout, cin_group = shape[0], shape[1]
        if values.size != cin_group * layer.groups or cout % layer.groups:
            return None
        group = np.arange(cout) // (cout // layer.groups)  # [Cout] group of each output channel
        channel = group[:, None] * cin_group + np.arange(cin_group)[None, :]  # [Cout, Cin/g]
        return values[channel].reshape(cout, cin_group, *([1] * (len(shape) - 2)))
    if values.size != shape[layer.in_axis]:
        return None
    return values.reshape([-1 if axis == layer.in_axis else 1 for axis in range(len(shape))])


def importance(layer: Layer, moments: Moments, shape: tuple[int, ...]) -> np.ndarray | None:
    """E[x²] of the input each weight multiplies: Σ importance·(W − Ŵ)² is then the expected output
    error of the layer (ignoring correlations between inputs)."""
    energy = per_weight(layer, moments.square, shape)
    if energy is None or not np.any(energy > 0):
        return None
    return np.maximum(energy, IMPORTANCE_FLOOR * float(energy.max()))


def reduction(
    op: str, x: str, axes: list[int], out: str, graph: onnx.GraphProto, fresh: NameSource, opset: int
) -> list[onnx.NodeProto]:
    """A ReduceSum / ReduceSumSquare over `axes` (keepdims 0), with axes as an input from the opset that
    moved them there."""
    if opset >= {"ReduceSum": 13, "ReduceSumSquare": 18}[op]:
        axes_name = fresh(f"{out}_axes")
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        return [helper.make_node(op, [x, axes_name], [out], keepdims=0)]
    return [helper.make_node(op, [x], [out], axes=axes, keepdims=0)]
