"""Quantizing for the layer's output, not its weights: input statistics from calibration data, error
weights (importance), bias correction, and a measured check of each layer's output error."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io
from qconvert.calibrate import Extremes, read_extremes
from qconvert.opset import hole, is_hole
from qconvert.rewrite import NameSource, add_after, use_counts
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections
from qconvert.select import MAIN_GRAPH, Weight, constant_value

IMPORTANCE_FLOOR = 1e-6  # dead input channels still count a little: keeps the weighted k-means well posed
CHECK_SAMPLES = 8  # calibration samples that the layer and whole-model checks run on (statistics use all) ...
CHECK_BUDGET = 32 << 20  # ... or fewer, down to MIN_CHECK_SAMPLES, to keep weights × samples within this
MIN_CHECK_SAMPLES = 4
CANDIDATE_SHARE = 3  # a layer-check pass adds candidate weights up to this share of a section's: each adds a layer copy and its error


@dataclass(frozen=True)
class Layer:
    """A float32 weight read by exactly one Conv, Gemm or MatMul of the main graph.

    y = x·W (Gemm/MatMul) or y = conv(x, W): the mean and energy of x per input channel say what
    each weight's error costs at the output.
    """

    weight: str
    node: onnx.NodeProto  # the consumer, in the model's graph (valid until the graph is rebuilt)
    x_axis: int  # the input channel axis of x (Conv 1, Gemm 1 or 0 by transA, MatMul last)
    in_axis: int  # the weight's input-channel axis (Conv 1, Gemm 0 or 1 by transB, MatMul 0)
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


@dataclass(frozen=True)
class Moments:
    """Per input channel of a layer: E[x] and E[x²] over the calibration data."""

    mean: np.ndarray  # [Cin] float64
    square: np.ndarray  # [Cin] float64


def find_layers(model: onnx.ModelProto, weights: list[Weight]) -> dict[str, Layer]:
    """The weights these techniques apply to, by name; the others (subgraphs, shared weights, RNNs,
    weights also read as data, non-float32) are quantized plainly."""
    wanted = {w.name: w for w in weights if w.graph_path == MAIN_GRAPH and len(w.consumers) == 1 and not w.other_readers
              and w.tensor.data_type == onnx.TensorProto.FLOAT and w.consumers[0].op_type in ("Conv", "Gemm", "MatMul")}
    constants = {t.name for t in model.graph.initializer} | {n.output[0] for n in model.graph.node if constant_value(n) is not None}
    layers = {}
    for node in model.graph.node:
        if len(node.input) < 2 or node.input[1] not in wanted or node.op_type != wanted[node.input[1]].consumers[0].op_type:
            continue
        weight = wanted[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        rank = len(weight.shape)
        editable = len(node.input) < 3 or not node.input[2] or node.input[2] in constants
        if node.op_type == "Conv" and rank >= 3:
            layers[weight.name] = Layer(weight.name, node, 1, 1, 0, weight.shape, int(attrs.get("group", 1)), editable)
        elif node.op_type == "Gemm":
            trans_b = int(attrs.get("transB", 0))
            layers[weight.name] = Layer(weight.name, node, 0 if attrs.get("transA", 0) else 1, trans_b, 1 - trans_b, weight.shape, 1, editable)
        elif node.op_type == "MatMul" and rank == 2:
            layers[weight.name] = Layer(weight.name, node, -1, 0, 1, weight.shape)
    return layers


def check_feeds(feeds: Feeds, layers: dict[str, Layer]) -> Feeds:
    """The first batches of the calibration feeds, what the checks of these layers run on: CHECK_SAMPLES
    samples, or down to MIN_CHECK_SAMPLES for big models (ResNet-50: 4). Every check costs a model run
    per sample, and on a big model the samples agree: the whole-model variants of ResNet-50-, MobileNetV2-
    shaped and digits models ranked the same on either half of 8 samples."""
    elements = sum(int(np.prod(layer.weight_shape)) for layer in layers.values())
    wanted = int(np.clip(CHECK_BUDGET // max(elements, 1), MIN_CHECK_SAMPLES, CHECK_SAMPLES))
    count, samples = 0, 0
    while count < len(feeds.batches) and samples < wanted:
        samples += len(next(iter(feeds.batches[count].values())))
        count += 1
    batches = [{name: np.array(array) for name, array in batch.items()} for batch in feeds.batches[:count]]  # not views: the rest can go
    return Feeds(batches, min(samples, feeds.samples), feeds.source)


@dataclass(frozen=True)
class Statistics:
    """What one onnxruntime pass over the calibration data gives."""

    moments: dict[str, Moments]  # per layer
    reference: list[np.ndarray]  # the model's outputs on `checks`, the reference of the whole-model check
    ranges: dict[str, tuple[float, float]]  # min and max of the tensors asked for
    checks: Feeds  # what the layer and whole-model checks run on (`check_feeds`)


def input_moments(model: onnx.ModelProto, layers: dict[str, Layer], feeds: Feeds, extremes: list[str] | None = None) -> Statistics:
    """E[x] and E[x²] per input channel of each layer, in one onnxruntime pass; the model's outputs on
    `check_feeds(feeds, layers)`; and the min and max of the `extremes` tensors (activation ranges).

    Everything is reduced in the graph as soon as the tensor exists (`add_after`) (ReduceSum, ReduceSumSquare,
    Size, ReduceMin, ReduceMax), so only vectors come back and onnxruntime frees every activation as usual.
    The pass runs in sections (`Sections`), each section's readers in one `add_after` call.
    """
    keys: dict[tuple[str, int, int], tuple[str, str, str]] = {}  # (x, channel axis, Cin) -> sum, sum of squares, size
    reduced: dict[str, tuple[str, str]] = {}  # tensor -> its min and max
    model_outputs = [o.name for o in model.graph.output]

    def readers(section: Section) -> None:
        graph, fresh, after = section.graph, section.fresh, section.after
        for layer in layers.values():
            x, channels = layer.node.input[0], layer.in_channels
            key = (x, layer.x_axis, channels)
            if key in keys or x not in section.made:
                continue
            nodes = after.setdefault(x, (None, []))[1]
            if layer.op_type == "Conv":
                axes = [0, *range(2, len(layer.weight_shape))]
            elif layer.op_type == "Gemm":
                axes = [1 - layer.x_axis]
            else:  # MatMul: [..., K] -> [rows, K]
                shape = fresh(f"{x}_qc_rows_shape")
                graph.initializer.append(numpy_helper.from_array(np.array([-1, channels], np.int64), shape))
                rows = fresh(f"{x}_qc_rows")
                nodes.append(helper.make_node("Reshape", [x, shape], [rows]))
                x, axes = rows, [0]
            outputs = (fresh(f"{x}_qc_sum"), fresh(f"{x}_qc_sum_squares"), fresh(f"{x}_qc_size"))
            for op, out in zip(("ReduceSum", "ReduceSumSquare"), outputs):
                nodes += _reduce(op, x, axes, out, graph, fresh, section.opset)
            nodes.append(helper.make_node("Size", [x], [outputs[2]]))
            keys[key] = outputs
            section.wanted += outputs
        read_extremes(extremes or [], reduced, section)
        if section.complete:
            section.wanted += model_outputs

    totals: dict[str, np.ndarray] = {}
    ranges = Extremes(reduced)
    checks = check_feeds(feeds, layers)
    reference: list[list[np.ndarray]] = []
    for values in Sections(model, feeds, "model for calibration").passes(readers):
        if model_outputs and model_outputs[0] in values:  # the last section: the model's outputs too
            if len(reference) < len(checks.batches):
                reference.append([values[o] for o in model_outputs])
        ranges.add(values)
        for outputs in keys.values():
            for name in outputs:
                if name in values:
                    totals[name] = totals.get(name, 0) + np.asarray(values[name], np.float64)
    moments = {}
    for name, layer in layers.items():
        total, squares, size = (totals[o] for o in keys[layer.node.input[0], layer.x_axis, layer.in_channels])
        count = float(size) / layer.in_channels
        if count > 0 and total.shape == (layer.in_channels,):
            moments[name] = Moments(total / count, squares / count)
    return Statistics(moments, [np.concatenate(o).astype(np.float64) for o in zip(*reference)], ranges.ranges(), checks)


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
    return values[:, None] if layer.in_axis == 0 else values[None, :]


def importance(layer: Layer, moments: Moments, shape: tuple[int, ...]) -> np.ndarray | None:
    """E[x²] of the input each weight multiplies: Σ importance·(W − Ŵ)² is then the expected output
    error of the layer (ignoring correlations between inputs)."""
    energy = per_weight(layer, moments.square, shape)
    if energy is None or not np.any(energy > 0):
        return None
    return np.maximum(energy, IMPORTANCE_FLOOR * float(energy.max()))


def bias_shift(layer: Layer, moments: Moments, original: np.ndarray, quantized: np.ndarray) -> np.ndarray | None:
    """E[x·W] − E[x·Ŵ] per output channel: added to the bias, the layer's mean output is the float one."""
    mean = per_weight(layer, moments.mean, original.shape)
    if mean is None or not layer.bias_editable:
        return None
    delta = (original.astype(np.float64) - quantized.astype(np.float64)) * mean
    reduce = tuple(a for a in range(original.ndim) if a != layer.out_axis)
    shift = delta.sum(axis=reduce)
    if layer.op_type == "Gemm":
        shift *= next((a.f for a in layer.node.attribute if a.name == "alpha"), 1.0)
    return shift


Deferred = np.ndarray | Callable[[], np.ndarray]  # an array, or what makes it when it is needed


def array_of(value: Deferred) -> np.ndarray:
    return value() if callable(value) else value


@dataclass(frozen=True)
class Candidate:
    """A quantized version of a layer's weight (and the bias shift that goes with it) to measure. The
    weight may come as what decodes it: a big model's candidates are then made a group at a time."""

    layer: Layer
    weight: Deferred
    shift: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes if isinstance(self.weight, np.ndarray) else 4 * int(np.prod(self.layer.weight_shape))  # float32


def layer_snr(model: onnx.ModelProto, candidates: list[Candidate], feeds: Feeds) -> list[float | None]:
    """Output SNR (dB) of each candidate's layer against the float layer on the calibration data.

    Each candidate weight runs as a copy of its layer beside the float model, reading the float input;
    the error per output channel (its sum and sum of squares) and the signal are reduced in the graph,
    so only vectors come back, and any bias shift's error follows from them: Σ(d + s)² = Σd² + 2sΣd + ns².
    Candidate weights go in groups of a share of a section's budget of bytes, one onnxruntime pass per
    group, in the model's order: each pass runs the part of the model up to its last layer, from where
    the previous one stopped (`Sections`).
    """
    sections = Sections(model, feeds, "model for the layer-error check")
    measured: dict[tuple[str, int], Candidate] = {}  # one run per weight: candidates differ by their shift
    for candidate in candidates:
        measured.setdefault((candidate.layer.weight, id(candidate.weight)), candidate)
    order = sorted(measured.values(), key=lambda c: sections.position[c.layer.node.output[0]])
    groups: list[list[Candidate]] = []
    size = 0
    for candidate in order:  # a layer's candidates stay together: a pass measures the layers it runs
        if not groups or (size + candidate.nbytes > sections.budget // CANDIDATE_SHARE and candidate.layer.weight != groups[-1][-1].layer.weight):
            groups.append([])
            size = 0
        groups[-1].append(candidate)
        size += candidate.nbytes
    sums: dict[tuple[str, int], tuple[float, np.ndarray, np.ndarray, float]] = {}
    for index, group in enumerate(groups):
        names: dict[tuple[str, int], tuple[str, str, str, str]] = {}  # signal, size, error sum of squares, error sum
        totals: dict[str, np.ndarray] = {}
        end = max(sections.position[c.layer.node.output[0]] for c in group) + 1
        for values in sections.run(end, partial(_layer_checks, group, names), last=index == len(groups) - 1):
            for name, value in values.items():
                totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
        sums.update({key: (float(totals[signal]), totals[squares], totals[total], float(totals[size]) / max(totals[total].size, 1))
                     for key, (signal, size, squares, total) in names.items()})
    snrs = []
    for candidate in candidates:
        signal, error, total, count = sums[candidate.layer.weight, id(candidate.weight)]
        squares = float(error.sum())
        if candidate.shift is not None:
            shift = candidate.shift.astype(np.float64)
            squares += float(2 * shift @ total + count * (shift @ shift))
        snrs.append(_snr(signal, max(squares, 0.0)))
    return snrs


def _layer_checks(group: list[Candidate], names: dict[tuple[str, int], tuple[str, str, str, str]], section: Section) -> None:
    """Beside each candidate's layer, a copy with the candidate weight; per candidate weight, `names` gets
    the outputs: the layer's signal and size, and the error's sum of squares and sum per output channel."""
    graph, fresh = section.graph, section.fresh
    signals: dict[str, tuple[str, str]] = {}
    for candidate in group:
        layer = candidate.layer
        y = layer.node.output[0]
        checks = section.after.setdefault(y, (None, []))[1]
        if y not in signals:
            signals[y] = (fresh(f"{y}_qc_signal"), fresh(f"{y}_qc_size"))
            checks += [helper.make_node("ReduceSumSquare", [y], [signals[y][0]], keepdims=0), helper.make_node("Size", [y], [signals[y][1]])]
        w = fresh(f"{layer.weight}_qc_candidate")
        section.replaced[w] = array_of(candidate.weight)
        graph.initializer.append(hole(w, section.replaced[w]))
        out, diff = fresh(f"{y}_qc_candidate"), fresh(f"{y}_qc_diff")
        checks += [layer_copy(layer.node, w, out, fresh), helper.make_node("Sub", [out, y], [diff])]
        axes = [0, *range(2, len(layer.weight_shape))] if layer.op_type == "Conv" else [0]
        if layer.op_type == "MatMul":  # [..., C] -> [rows, C]
            shape, rows = fresh(f"{y}_qc_rows_shape"), fresh(f"{y}_qc_rows")
            graph.initializer.append(numpy_helper.from_array(np.array([-1, layer.weight_shape[layer.out_axis]], np.int64), shape))
            checks.append(helper.make_node("Reshape", [diff, shape], [rows]))
            diff = rows
        squares, total = fresh(f"{y}_qc_error"), fresh(f"{y}_qc_error_sum")
        checks += [*_reduce("ReduceSumSquare", diff, axes, squares, graph, fresh, section.opset),
                   *_reduce("ReduceSum", diff, axes, total, graph, fresh, section.opset)]
        names[layer.weight, id(candidate.weight)] = (*signals[y], squares, total)
    section.wanted += list(dict.fromkeys(name for four in names.values() for name in four))


def _reduce(op: str, x: str, axes: list[int], out: str, graph: onnx.GraphProto, fresh: NameSource, opset: int) -> list[onnx.NodeProto]:
    """A ReduceSum / ReduceSumSquare over `axes` (keepdims 0), with axes as an input from the opset that moved them there."""
    if opset >= {"ReduceSum": 13, "ReduceSumSquare": 18}[op]:
        axes_name = fresh(f"{out}_axes")
        graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), axes_name))
        return [helper.make_node(op, [x, axes_name], [out], keepdims=0)]
    return [helper.make_node(op, [x], [out], axes=axes, keepdims=0)]


def layer_copy(node: onnx.NodeProto, weight: str, output: str, fresh: NameSource, *, bias: bool = True) -> onnx.NodeProto:
    """The layer's node reading another weight (and, without `bias`, no bias) into another output."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = fresh(f"{node.name or node.op_type}_qc_copy")
    copy.input[1] = weight
    if not bias:
        del copy.input[2:]
    del copy.output[:]
    copy.output.append(output)
    return copy


def output_layout(layer: Layer, shift: np.ndarray) -> np.ndarray:
    """A per-output-channel shift shaped to add to the layer's output: [Cout, 1, 1] against [N, Cout, H, W]."""
    return shift.reshape(-1, *([1] * (len(layer.weight_shape) - 2))) if layer.op_type == "Conv" else shift


def _snr(signal: float, error: float) -> float | None:
    if error == 0.0:
        return None
    return 10.0 * float(np.log10(signal / error)) if signal > 0 else float("-inf")


def model_snr(model: onnx.ModelProto, variants: list[tuple[dict[str, Deferred], dict[str, tuple[Layer, np.ndarray]]]],
              feeds: Feeds, reference: list[np.ndarray]) -> list[float | None]:
    """SNR (dB) of the model's outputs, all outputs together, for each variant against the float
    model's `reference` outputs on the same feeds.

    A variant replaces weights by float arrays (their dequantized values, made one section at a time)
    and adds bias shifts after their layers, in a copy of the model: the quantized model's arithmetic
    without encoding it. Each variant is a pass in sections (`Sections`).
    """
    signal = sum(float(np.sum(r * r)) for r in reference)
    model_outputs = [o.name for o in model.graph.output]
    sections = Sections(model, feeds, "model for the whole-model check")
    snrs = []
    for arrays, shifts in variants:
        outputs: list[list[np.ndarray]] = [[] for _ in model_outputs]
        for values in sections.passes(partial(_variant, arrays, shifts, model_outputs)):
            for kept, name in zip(outputs, model_outputs):
                if name in values:
                    kept.append(np.asarray(values[name], np.float64))
        error = sum(float(np.sum((r - np.concatenate(q)) ** 2)) for r, q in zip(reference, outputs))
        snrs.append(_snr(signal, error))
    return snrs


def _variant(arrays: dict[str, Deferred], shifts: dict[str, tuple[Layer, np.ndarray]], model_outputs: list[str], section: Section) -> None:
    """A section of a whole-model variant: its weights replaced, bias shifts added after its layers."""
    graph = section.graph
    for tensor in graph.initializer:
        if tensor.name in arrays:
            array = array_of(arrays[tensor.name]).astype(np.float32, copy=False)
            if is_hole(tensor):
                section.replaced[tensor.name] = array
            else:
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in graph.node:
        value = constant_value(node)
        if value is not None and node.output[0] in arrays:
            value.CopyFrom(numpy_helper.from_array(array_of(arrays[node.output[0]]).astype(np.float32, copy=False), value.name))
    for layer, shift in shifts.values():
        y = layer.node.output[0]
        if y in section.made:
            bias = numpy_helper.from_array(output_layout(layer, shift).astype(np.float32), section.fresh(f"{layer.weight}_qc_shift"))
            graph.initializer.append(bias)
            product = section.fresh(f"{y}_qc_unshifted")
            section.after[y] = (product, [helper.make_node("Add", [product, bias.name], [y])])
    if section.complete:
        section.wanted += model_outputs


def apply_bias_shifts(model: onnx.ModelProto, shifts: dict[str, tuple[Layer, np.ndarray]]) -> None:
    """Add each shift to its layer's bias, in place: a Conv or Gemm bias is updated or created; a MatMul
    gets an Add after it. Call before the graph is rebuilt (layers hold references to its nodes)."""
    if not shifts:
        return
    graph = model.graph
    fresh = NameSource(model)
    constants = {t.name: t for t in graph.initializer}
    constants.update({node.output[0]: tensor for node in graph.node if (tensor := constant_value(node)) is not None})
    uses = use_counts(graph)
    after: dict[str, tuple[str | None, list[onnx.NodeProto]]] = {}  # MatMul output -> the Add that makes it
    for layer, shift in shifts.values():
        node = layer.node
        if layer.op_type == "MatMul":
            bias = numpy_helper.from_array(shift.astype(np.float32), fresh(f"{layer.weight}_qc_bias"))
            graph.initializer.append(bias)
            y, product = node.output[0], fresh(f"{node.output[0]}_qc_product")
            after[y] = (product, [helper.make_node("Add", [product, bias.name], [y], name=fresh(f"{product}_bias"))])
            continue
        scale = 1.0
        if layer.op_type == "Gemm":
            scale = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        current = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if current is None:
            value = shift / scale
        else:
            old = io.tensor_array(constants[current]).astype(np.float64)
            value = old + (shift / scale).reshape((-1,) if old.ndim <= 1 else (1, -1))
        array = value.astype(np.float32)
        if current is not None and uses.get(current) == 1:
            constants[current].CopyFrom(numpy_helper.from_array(array, constants[current].name))
            continue
        bias = numpy_helper.from_array(array, fresh(f"{layer.weight}_qc_bias"))
        graph.initializer.append(bias)
        if current is None:
            del node.input[2:]
            node.input.append(bias.name)
        else:
            node.input[2] = bias.name
    if after:
        add_after(graph, after)

