"""Graph rewriting for linear quantization: DequantizeLinear weights, and QDQ activations + int32 biases."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io
from qconvert.encode import PACKABLE_BITS, EncodedWeight, IndexStorage, encode_palettes
from qconvert.opset import without_weights
from qconvert.quant.kmeans import Palette
from qconvert.quant.layout import from_rows, per_block, to_rows
from qconvert.quant.linear import Grid, clipped_grid, dequantize, grid_for, quantize
from qconvert.rewrite import (
    GraphEdit,
    NameSource,
    drop_initializers,
    readers_of,
    replace_weights,
    set_nodes,
    use_counts,
)
from qconvert.select import Weight, constant_tensors, constant_value

# Ops whose float inputs and outputs get Quantize/DequantizeLinear pairs, so that onnxruntime runs them
# (or drops them, for data movement) as integer kernels. Relu and Clip(0, ...) after a quantized op are
# absorbed into its output range.
QDQ_OPS = {
    "Conv",
    "Gemm",
    "MatMul",
    "Add",
    "Mul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Concat",
    "Flatten",
    "Reshape",
    "Transpose",
    "Squeeze",
    "Unsqueeze",
    "Resize",
    "Sigmoid",
    "Relu",
    "Clip",
}
WEIGHTED_OPS = {"Conv", "Gemm", "MatMul"}
DATA_INPUTS = {"Conv": 1, "Gemm": 1, "MatMul": 1, "Reshape": 1, "Resize": 1, "Clip": 1, "Squeeze": 1, "Unsqueeze": 1}
ABSORBING = {"Conv", "Gemm", "MatMul", "Add"}  # producers that may absorb a following Relu / Clip(0, x)
MOVING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Identity", "DepthToSpace", "SpaceToDepth"}


@dataclass(frozen=True)
class LinearWeight:
    """A weight on an integer grid: r = S·(q − Z), per tensor (axis None) or along `axis`."""

    weight: Weight
    grid: Grid
    axis: int | None
    bits: int
    integers: np.ndarray | None = None  # q; None: quantized again from the weight's array when asked
    packed: bool = False  # int4 below opset 21: stored bit-packed, unpacked in the graph (`methods.linear`)
    block: int = 0  # B: a grid per B consecutive values along `axis` (the input axis), not per channel

    @property
    def q(self) -> np.ndarray:
        """The integers, in the weight's layout."""
        if self.integers is not None:
            return self.integers
        return on_grid(self.weight.array(), self.grid, self.axis, self.block)

    def dequantized(self) -> np.ndarray:
        rows = dequantize(to_rows(self.q, self.axis, self.block), self.grid)
        return from_rows(rows, self.weight.shape, self.axis, self.block)

    @property
    def storage(self) -> type:
        if self.bits == 4:
            return ml_dtypes.int4 if self.grid.signed else ml_dtypes.uint4
        return np.int8 if self.grid.signed else np.uint8


def quantize_weight(
    weight: Weight,
    array: np.ndarray,
    *,
    bits: int,
    symmetric: bool,
    axis: int | None,
    importance: np.ndarray | None = None,
    keep: bool = True,
    block: int = 0,
) -> LinearWeight:
    """Min/max grids, or with `importance` (error weights broadcastable to the array) the clipped
    ranges that minimise the weighted error; per channel along `axis`, or with `block` per B values along it.
    `keep` False keeps the grid only, for a result that may be dropped: its integers are quantized again from
    `weight.array()` (which `array` must be) when asked, instead of taking memory meanwhile (full QDQ of
    ResNet-50 holds two results per weight)."""
    rows = to_rows(array, axis, block)
    if importance is None:
        grid = grid_for(rows, bits=bits, symmetric=symmetric)
    else:
        costs = to_rows(np.broadcast_to(importance, array.shape), axis, block)
        grid = clipped_grid(rows, bits=bits, symmetric=symmetric, weights=costs)
    return LinearWeight(weight, grid, axis, bits, on_grid(array, grid, axis, block) if keep else None, block=block)


def on_grid(array: np.ndarray, grid: Grid, axis: int | None, block: int = 0) -> np.ndarray:
    """The array's integers on the grid, in its layout."""
    return from_rows(quantize(to_rows(array, axis, block), grid), array.shape, axis, block)


def insert_weight_dq(model: onnx.ModelProto, items: list[LinearWeight]) -> None:
    """Each weight becomes integer q + DequantizeLinear(q, S, Z, axis) under the weight's name, in place."""
    replace_weights(model, [(item.weight, partial(_weight_dq, item=item)) for item in items])


def _weight_dq(edit: GraphEdit, *, item: LinearWeight) -> None:
    base = item.weight.name
    scale = item.grid.scale.astype(item.weight.array().dtype if _needs_typed_scale(item) else np.float32)
    zero: np.ndarray = item.grid.zero_point.astype(item.storage)
    attrs: dict[str, int] = {}
    if item.axis is None:
        scale, zero = scale.reshape(()), zero.reshape(())
    elif item.block:  # scales laid out as the weight with its input axis cut to C/B
        scale, zero = (per_block(v, item.weight.shape, item.axis, item.block) for v in (scale, zero))
        attrs = {"axis": item.axis, "block_size": item.block}
    else:
        attrs = {"axis": item.axis}
    # The zero point is spelled out even when 0: onnxruntime's QGemm fusion wants it.
    inputs = [
        edit.constant(base, "quantized", item.q.astype(item.storage)),
        edit.constant(base, "scale", scale),
        edit.constant(base, "zero_point", zero),
    ]
    edit.node(base, "DequantizeLinear", inputs, "dequantize", output=base, **attrs)


def as_palette(item: LinearWeight) -> EncodedWeight:
    """The grid as a palette of its 2**bits levels, indices q − qmin, which decodes to what DequantizeLinear
    computes by ops onnxruntime folds at load: symmetric, one codebook of the integers (shared by every such
    weight) times a scale per channel; with zero points, a codebook per channel. Not for blocks."""
    grid, dtype = item.grid, helper.tensor_dtype_to_np_dtype(item.weight.tensor.data_type)
    steps = np.arange(grid.qmin, grid.qmax + 1)
    indices = (to_rows(item.q, item.axis).astype(np.int64) - grid.qmin).astype(np.uint8)
    storage = IndexStorage.PACKED if item.bits in PACKABLE_BITS else IndexStorage.UINT8
    if not grid.zero_point.any():
        palette = Palette(steps[None, :].astype(dtype), indices, grid.scale.astype(np.float32))
        return EncodedWeight(item.weight, palette, item.axis, item.bits, storage, shared_codebook=True)
    levels = (steps[None, :] - grid.zero_point[:, None]).astype(np.float32) * grid.scale[:, None]
    return EncodedWeight(item.weight, Palette(levels.astype(dtype), indices), item.axis, item.bits, storage)


def decode_at_load(model: onnx.ModelProto, items: dict[str, LinearWeight]) -> None:
    """Each weight's DequantizeLinear replaced, in place, by a decode of the same integers that onnxruntime
    folds at load (`as_palette`): its layer runs float on the values it had, and the file keeps the integers.
    The weights are main-graph ones, found in the model this may be a copy of."""
    graph = model.graph
    decoders = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in items]
    set_nodes(graph, [n for n in graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in items)])
    drop_initializers(graph, {x for n in decoders for x in n.input})
    here = [dataclasses.replace(i, weight=dataclasses.replace(i.weight, graph=graph)) for i in items.values()]
    encode_palettes(model, [as_palette(item) for item in here])


def _needs_typed_scale(item: LinearWeight) -> bool:
    return item.weight.tensor.data_type != onnx.TensorProto.FLOAT


# ---- activations (full QDQ) -------------------------------------------------------------------------------


def absorb_activations(model: onnx.ModelProto, quantized_weights: set[str]) -> int:
    """Remove each Relu / Clip(min 0) whose input comes only from a quantized op, in place.

    The op then writes the activation's output directly, and that tensor's Quantize (range [0, max],
    zero point 0) clamps exactly as the activation did. Call after calibration (which needs them).
    """
    graph = model.graph
    absorbed = _absorbable(graph, quantized_weights)
    for index, source in absorbed.items():
        source.output[0] = graph.node[index].output[0]
    if absorbed:
        set_nodes(graph, [n for i, n in enumerate(graph.node) if i not in absorbed])
    return len(absorbed)


def absorbed_tensors(model: onnx.ModelProto, quantized_weights: set[str]) -> set[str]:
    """The tensors that `absorb_activations` will remove (the inputs of the activations it absorbs): their
    ranges are never used, so calibration need not measure them (and onnxruntime can fuse the pair)."""
    graph = model.graph
    return {graph.node[index].input[0] for index in _absorbable(graph, quantized_weights)}


def absorbing_outputs(model: onnx.ModelProto, quantized_weights: set[str]) -> set[str]:
    """The outputs of the activations `absorb_activations` will remove: their Quantize does the clamping, so
    they must stay quantized."""
    graph = model.graph
    return {graph.node[index].output[0] for index in _absorbable(graph, quantized_weights)}


def absorbed_outputs(model: onnx.ModelProto, quantized_weights: set[str]) -> dict[str, str]:
    """Each output that `absorb_activations` will replace -> the activation's output that replaces it."""
    graph = model.graph
    return {source.output[0]: graph.node[i].output[0] for i, source in _absorbable(graph, quantized_weights).items()}


def _absorbable(graph: onnx.GraphProto, quantized_weights: set[str]) -> dict[int, onnx.NodeProto]:
    """Index of each absorbable Relu / Clip(min 0) -> the quantized op that produces its input."""
    constants = _constants(graph)
    uses = use_counts(graph)
    producer = {out: node for node in graph.node for out in node.output}
    found = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in ("Relu", "Clip") or not node.input or not _clamps_at_zero(node, constants):
            continue
        source = producer.get(node.input[0])
        if source is None or source.op_type not in ABSORBING or uses.get(node.input[0], 0) != 1:
            continue
        if source.op_type in WEIGHTED_OPS and source.input[1] not in quantized_weights:
            continue
        if source.op_type == "Add" and any(i in constants for i in source.input):
            continue
        found[index] = source
    return found


def divisions_as_products(model: onnx.ModelProto) -> int:
    """Each Div by a float constant becomes a Mul by its reciprocal, in place (the output keeps its name): a Mul
    with a constant operand runs as QLinearMul, a Div only in float between a Dequantize and a Quantize (a
    HardSwish's / 6). Returns how many. The product differs from the quotient by a rounding of the float."""
    graph = model.graph
    constants = _float_constants(graph)
    fresh = NameSource(model)
    made: dict[str, str] = {}
    count = 0
    for node in graph.node:
        if node.op_type != "Div" or len(node.input) != 2 or node.input[1] not in constants:
            continue
        divisor = io.tensor_array(constants[node.input[1]])
        if not np.all(np.isfinite(divisor)) or np.any(divisor == 0):
            continue
        if node.input[1] not in made:
            made[node.input[1]] = fresh(f"{node.input[1]}_qc_reciprocal")
            graph.initializer.append(numpy_helper.from_array((1.0 / divisor).astype(np.float32), made[node.input[1]]))
        node.op_type = "Mul"
        node.input[1] = made[node.input[1]]
        count += 1
    _drop_unread(graph, set(made))
    return count


def moved_from(graph: onnx.GraphProto) -> dict[str, str]:
    """Each tensor a data-movement op (MOVING) makes, and the tensor whose values it holds, followed back to
    the first that an op computed: they are the same values."""
    source: dict[str, str] = {}
    for node in graph.node:
        if node.op_type in MOVING and node.domain in ("", "ai.onnx") and node.input and node.output:
            source[node.output[0]] = source.get(node.input[0], node.input[0])
    return source


def output_values(graph: onnx.GraphProto) -> set[str]:
    """The graph's outputs, and the tensors that hold their values (data movement only)."""
    outputs = {o.name for o in graph.output}
    source = moved_from(graph)
    roots = {source.get(name, name) for name in outputs}
    return outputs | roots | {name for name, root in source.items() if root in roots}


def tie_moved(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The ranges with each moved tensor's taken from the tensor it holds the values of (where that has one):
    onnxruntime drops the Quantize/Dequantize pairs around a data-movement op only when they share a scale."""
    source = moved_from(graph)
    return {name: ranges.get(source.get(name, name), found) for name, found in ranges.items()}


def tie_clamped(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The ranges with the input of each Relu / Clip that only it reads given the output's range: the Quantize
    then clamps as the op does (to its grid's step), onnxruntime drops the op and the pair between, and the values
    the op keeps are not rounded twice, the first time on a grid spread over those it cuts off."""
    uses = use_counts(graph)  # graph outputs count as reads
    tied = dict(ranges)
    for node in graph.node:
        if node.op_type not in ("Relu", "Clip") or node.domain not in ("", "ai.onnx") or not node.input:
            continue
        data, out = node.input[0], node.output[0]
        if data in tied and out in tied and uses.get(data, 0) == 1:
            tied[data] = tied[out]
    return tied


def activation_tensors(model: onnx.ModelProto, quantized_weights: set[str]) -> list[str]:
    """The float activations of the main graph to quantize: data inputs and outputs of QDQ ops.

    Only tensors that shape inference types as float32 qualify: Concat, Reshape and friends also
    carry int64 shapes.
    """
    graph = model.graph
    constants = _constants(graph)
    floats = _float_tensors(model)
    tensors: dict[str, None] = {}
    for node in graph.node:
        if node.op_type not in QDQ_OPS or node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in WEIGHTED_OPS and (len(node.input) < 2 or node.input[1] not in quantized_weights):
            continue
        if node.op_type == "Concat" and any(i in constants for i in node.input):
            continue
        data = node.input[: DATA_INPUTS.get(node.op_type, len(node.input))]
        for name in (*data, node.output[0]):
            if name and name not in constants and name in floats:
                tensors[name] = None
    return list(tensors)


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the main graph's float32 tensors, by ONNX shape inference (outputs of weighted ops too)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    except Exception:  # inference fails on some exported models; fall back to what is declared
        inferred = model.graph
    values = (*inferred.input, *inferred.value_info, *inferred.output)
    floats = {v.name for v in values if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    floats.update(n.output[0] for n in model.graph.node if n.op_type in WEIGHTED_OPS)
    return floats


def insert_activation_qdq(
    model: onnx.ModelProto,
    ranges: dict[str, tuple[float, float]],
    weights: dict[str, LinearWeight],
    signed: bool = False,
) -> int:
    """Quantize/DequantizeLinear on each activation with a range (uint8 asymmetric, or `signed`: int8 with
    zero point 0 on max(|lo|, |hi|), what GPU and NPU runtimes want), int32 biases; in place.

    A produced tensor T becomes P -> T_float -> Q -> DQ -> T, so consumers are untouched; a graph
    input gets Q -> DQ -> T_dq and its consumers are renamed. A tensor that only moves another's values takes
    its range (`tie_moved`), so does the input of a Relu / Clip read by it alone from its output
    (`tie_clamped`); a float layer between quantized activations reads its input per channel
    (`keep_float_layers`). Returns how many activations were done.
    """
    graph = model.graph
    ranges = _tie_products(graph, tie_clamped(graph, tie_moved(graph, ranges)))
    fresh = NameSource(model)
    front: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    _quantize_operands(graph, ranges, signed, fresh, new_inits, front)  # first: it drops the constants it replaces
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    after: dict[int, list[onnx.NodeProto]] = {}
    renamed: dict[str, str] = {}
    scales: dict[str, float] = {}
    for name, (lo, hi) in ranges.items():
        grid = grid_for(np.zeros((1, 1), np.float32), bits=8, symmetric=signed, lo=np.array([lo]), hi=np.array([hi]))
        scale = numpy_helper.from_array(grid.scale.reshape(()), fresh(f"{name}_qc_scale"))
        zero_point = grid.zero_point.astype(np.int8 if signed else np.uint8).reshape(())
        zero = numpy_helper.from_array(zero_point, fresh(f"{name}_qc_zero_point"))
        new_inits += [scale, zero]
        scales[name] = float(grid.scale[0])
        quantized = fresh(f"{name}_qc_q")
        if name in producer:
            node = graph.node[producer[name]]
            source = fresh(f"{name}_qc_float")
            node.output[list(node.output).index(name)] = source
            target = name
            place = after.setdefault(producer[name], [])
        else:  # a graph input
            source, target = name, fresh(f"{name}_qc_dq")
            renamed[name] = target
            place = front
        # Unnamed: hundreds of pairs, and names cost bytes (up to 15 % of a small model's file).
        place.append(helper.make_node("QuantizeLinear", [source, scale.name, zero.name], [quantized]))
        place.append(helper.make_node("DequantizeLinear", [quantized, scale.name, zero.name], [target]))
    biases = _quantize_biases(graph, weights, scales, fresh, new_inits, front)
    nodes = list(front)
    for i, node in enumerate(graph.node):
        for j, name in enumerate(node.input):
            if name in renamed:
                node.input[j] = renamed[name]
        nodes.append(node)
        nodes.extend(after.get(i, []))
    set_nodes(graph, nodes)
    drop_initializers(graph, biases)
    graph.initializer.extend(new_inits)
    fold_scalar_products(graph)
    keep_float_layers(model)
    return len(ranges)


def keep_float_layers(model: onnx.ModelProto) -> int:
    """Each float Conv, ConvTranspose or Gemm (its weight not from a DequantizeLinear) whose input is a
    DequantizeLinear with one scale reads it instead from a DequantizeLinear of the same integers with the scale
    repeated per channel, in place; returns how many layers. onnxruntime's WeightBiasQuantization (at every
    optimization level) quantizes the weight of such a layer before a QuantizeLinear per tensor, symmetric int8,
    whatever its channels need (EfficientNet-Lite0 with one depthwise layer left float: 23 -> 9 dB), and leaves
    a layer that reads its input per channel alone: it stays float, as planned."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = constant_tensors(graph)
    found = [n for n in graph.node if _float_layer_input(n, producer, constants)]
    if not found:
        return 0
    try:
        inferred = onnx.shape_inference.infer_shapes(without_weights(model)).graph
    except Exception:  # inference fails on some exported models: their float layers are left as they are
        return 0
    shapes = {v.name: v.type.tensor_type.shape for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    fresh = NameSource(model)
    made: dict[str, str] = {}
    added: dict[str, onnx.NodeProto] = {}
    count = 0
    for node in found:
        transposed = node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute)
        axis = 0 if transposed else 1
        source = producer[node.input[0]]
        dims = shapes.get(node.input[0])
        if dims is None or len(dims.dim) <= axis or not dims.dim[axis].HasField("dim_value"):
            continue
        if node.input[0] not in made:
            channels = dims.dim[axis].dim_value
            name = made[node.input[0]] = fresh(f"{node.input[0]}_qc_per_channel")
            scale, zero = (io.tensor_array(constants[i]).reshape(-1) for i in source.input[1:3])
            for value, suffix in ((scale, "scale"), (zero, "zero_point")):
                graph.initializer.append(numpy_helper.from_array(np.repeat(value, channels), f"{name}_{suffix}"))
            added[node.input[0]] = helper.make_node(
                "DequantizeLinear", [source.input[0], f"{name}_scale", f"{name}_zero_point"], [name], axis=axis
            )
        node.input[0] = made[node.input[0]]
        count += 1
    nodes = []
    for node in graph.node:
        nodes.append(node)
        nodes.extend(added[o] for o in node.output if o in added)
    set_nodes(graph, nodes)
    return count


def _float_layer_input(
    node: onnx.NodeProto, producer: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]
) -> bool:
    """Whether this is a float Conv/ConvTranspose/Gemm fed by a DequantizeLinear with one scale and a zero point."""
    if (
        node.op_type not in ("Conv", "ConvTranspose", "Gemm")
        or node.domain not in ("", "ai.onnx")
        or len(node.input) < 2
    ):
        return False
    weight, source = producer.get(node.input[1]), producer.get(node.input[0])
    if (weight is not None and weight.op_type == "DequantizeLinear") or source is None:
        return False
    return (
        source.op_type == "DequantizeLinear"
        and len(source.input) == 3
        and all(i in constants for i in source.input[1:3])
        and int(np.prod(constants[source.input[1]].dims)) == 1
    )


def fold_scalar_products(graph: onnx.GraphProto) -> None:
    """Each quantized product of a quantized activation and a positive scalar constant (a HardSwish's / 6, a
    Div made a Mul) whose range is the activation's times the constant (`_tie_products`) becomes a
    DequantizeLinear of the activation's integers, in place: DQ(q, S, Z) * c -> Q(c S, Z) -> DQ is DQ(q, c S, Z),
    without requantizing, and onnxruntime runs no QLinearMul for it. Nodes are known by their output's name."""
    producer = {out: node for node in graph.node for out in node.output}
    readers = readers_of(graph)
    constants = constant_tensors(graph)
    gone: set[str] = set()  # the Mul's and its Quantize's outputs
    maybe_unread: set[str] = set()  # the outputs of what fed the Mul
    for node in graph.node:
        found = _scalar_product(node, producer, readers, constants)
        if found is None:
            continue
        dequantize, quantize, requantized = found
        requantized.input[0] = dequantize.input[0]
        gone.update((node.output[0], quantize.output[0]))
        maybe_unread.update(i for i in node.input if i in producer)
    if not gone:
        return
    kept = [n for n in graph.node if n.output[0] not in gone]
    read = {name for n in kept for name in n.input} | {o.name for o in graph.output}
    unread = maybe_unread - read
    removed = [n for n in graph.node if n.output[0] in gone | unread]
    set_nodes(graph, [n for n in kept if n.output[0] not in unread])
    _drop_unread(graph, {i for n in removed for i in n.input})


def _scalar_product(
    node: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    readers: dict[str, list[onnx.NodeProto]],
    constants: dict[str, onnx.TensorProto],
) -> tuple[onnx.NodeProto, onnx.NodeProto, onnx.NodeProto] | None:
    """For Mul(DQ(q, S, Z), c) -> Q(S', Z') -> DQ, with c a positive scalar (a constant or its DequantizeLinear),
    S one scale and S' = c S to float precision, Z' = Z: the activation's DequantizeLinear, the Quantize and the
    DequantizeLinear after it."""
    after = readers.get(node.output[0], []) if node.op_type == "Mul" and len(node.input) == 2 else []
    if len(after) != 1 or after[0].op_type != "QuantizeLinear":
        return None
    again = readers.get(after[0].output[0], [])
    if len(again) != 1 or again[0].op_type != "DequantizeLinear":
        return None
    for data, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
        dequantize, factor = producer.get(data), _scalar(other, producer, constants)
        if (
            dequantize is not None
            and dequantize.op_type == "DequantizeLinear"
            and dequantize.input[0] not in constants
            and dequantize.input[1] in constants
            and len(constants[dequantize.input[1]].dims) == 0
            and factor is not None
            and factor > 0
            and _same_grid(dequantize, again[0], factor, constants)
        ):
            return dequantize, after[0], again[0]
    return None


def _same_grid(
    dequantize: onnx.NodeProto, requantized: onnx.NodeProto, factor: float, constants: dict[str, onnx.TensorProto]
) -> bool:
    """Whether the product's grid is the activation's scaled by `factor`: equal zero points, scales within
    float rounding."""
    if (
        len(dequantize.input) < 3
        or len(requantized.input) < 3
        or not all(i in constants for i in requantized.input[1:])
    ):
        return False
    scale, zero = (io.tensor_array(constants[i]) for i in dequantize.input[1:3])
    product_scale, product_zero = (io.tensor_array(constants[i]) for i in requantized.input[1:3])
    return (
        product_zero.dtype == zero.dtype
        and np.array_equal(product_zero, zero)
        and bool(np.isclose(float(product_scale), factor * float(scale), rtol=1e-6))
    )


def _tie_products(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """The ranges with each product of a quantized activation and a positive scalar constant given the
    activation's range times the constant: its integers are then the activation's (`fold_scalar_products`)."""
    constants = constant_tensors(graph)
    producer = {out: node for node in graph.node for out in node.output}
    tied = dict(ranges)
    for node in graph.node:
        if node.op_type != "Mul" or len(node.input) != 2 or node.output[0] not in tied:
            continue
        for data, other in ((node.input[0], node.input[1]), (node.input[1], node.input[0])):
            factor = _scalar(other, producer, constants)
            if data in tied and factor is not None and factor > 0:
                lo, hi = tied[data]
                tied[node.output[0]] = (lo * factor, hi * factor)
                break
    return tied


def _scalar(name: str, producer: dict[str, onnx.NodeProto], constants: dict[str, onnx.TensorProto]) -> float | None:
    """The value of a one-element float constant, given as such or as the DequantizeLinear of one (else None)."""
    node = producer.get(name)
    if name in constants:
        value = io.tensor_array(constants[name])
    elif node is not None and node.op_type == "DequantizeLinear" and all(i in constants for i in node.input):
        q, scale, *zero = (io.tensor_array(constants[i]).astype(np.float64) for i in node.input)
        value = (q - (zero[0] if zero else 0)) * scale
    else:
        return None
    return float(value.reshape(-1)[0]) if value.size == 1 and np.issubdtype(value.dtype, np.floating) else None


def _quantize_operands(
    graph: onnx.GraphProto,
    ranges: dict[str, tuple[float, float]],
    signed: bool,
    fresh: NameSource,
    new_inits: list[onnx.TensorProto],
    front: list[onnx.NodeProto],
) -> None:
    """The constant operand of an Add or Mul whose other input and output are quantized becomes 8-bit with a
    DequantizeLinear (one per tensor, its range its values' with 0), so that onnxruntime runs QLinearAdd /
    QLinearMul there (a HardSwish's x + 3, a scale per channel) instead of the float op between transitions."""
    constants = _float_constants(graph)
    made: dict[str, str] = {}
    for node in graph.node:
        if node.op_type not in ("Add", "Mul") or node.output[0] not in ranges or len(node.input) != 2:
            continue
        held = [j for j, x in enumerate(node.input) if x in constants]
        if len(held) != 1 or node.input[1 - held[0]] not in ranges:
            continue
        name = node.input[held[0]]
        if name not in made:
            made[name] = _quantized_constant(name, io.tensor_array(constants[name]), signed, fresh, new_inits, front)
        node.input[held[0]] = made[name]
    _drop_unread(graph, set(made))


def _drop_unread(graph: onnx.GraphProto, names: set[str]) -> None:
    """These constants (initializers or Constant nodes), where nothing reads them any more (kept where the
    graph has subgraphs, whose reads `use_counts` does not see)."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return
    uses = use_counts(graph)
    unread = {n for n in names if not uses.get(n)}
    drop_initializers(graph, unread)
    set_nodes(graph, [n for n in graph.node if not (n.op_type == "Constant" and n.output[0] in unread)])


def _quantized_constant(
    name: str,
    array: np.ndarray,
    signed: bool,
    fresh: NameSource,
    new_inits: list[onnx.TensorProto],
    front: list[onnx.NodeProto],
) -> str:
    """`array` as 8-bit integers on one grid over its values and 0, and the DequantizeLinear that gives it back:
    the name of its output."""
    lo, hi = np.array([min(float(array.min()), 0.0)]), np.array([max(float(array.max()), 0.0)])
    grid = grid_for(array.reshape(1, -1), bits=8, symmetric=signed, lo=lo, hi=hi)
    dtype = np.int8 if signed else np.uint8
    inits = [
        numpy_helper.from_array(
            quantize(array.reshape(1, -1), grid).reshape(array.shape).astype(dtype), fresh(f"{name}_qc_quantized")
        ),
        numpy_helper.from_array(grid.scale.reshape(()), fresh(f"{name}_qc_scale")),
        numpy_helper.from_array(grid.zero_point.astype(dtype).reshape(()), fresh(f"{name}_qc_zero_point")),
    ]
    new_inits += inits
    output = fresh(f"{name}_qc_dequantized")
    front.append(helper.make_node("DequantizeLinear", [t.name for t in inits], [output]))
    return output


def _float_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The main graph's float32 constants (initializers and Constant outputs) by name."""
    return {k: t for k, t in constant_tensors(graph).items() if t.data_type == onnx.TensorProto.FLOAT}


def _quantize_biases(
    graph: onnx.GraphProto,
    weights: dict[str, LinearWeight],
    scales: dict[str, float],
    fresh: NameSource,
    new_inits: list[onnx.TensorProto],
    front: list[onnx.NodeProto],
) -> set[str]:
    """Conv/Gemm biases -> int32 with scale S_x·S_w and DequantizeLinear, as integer kernels expect them."""
    inits = {t.name: t for t in graph.initializer}
    uses = use_counts(graph)
    done: set[str] = set()
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or node.input[1] not in weights:
            continue
        x, w, b = node.input[0], node.input[1], node.input[2]
        if x not in scales or b not in inits or uses.get(b) != 1 or inits[b].data_type != onnx.TensorProto.FLOAT:
            continue
        bias = io.tensor_array(inits[b]).astype(np.float64)
        item = weights[w]
        channels = item.weight.shape[item.axis if item.axis is not None else 0]
        if bias.ndim != 1 or bias.size != channels:
            continue
        scale = (scales[x] * item.grid.scale.astype(np.float64)).astype(np.float32)
        per_axis = item.axis is not None
        q = np.clip(np.rint(bias / scale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        q_init = numpy_helper.from_array(q, fresh(f"{b}_qc_quantized"))
        s_init = numpy_helper.from_array(scale if per_axis else scale.reshape(()), fresh(f"{b}_qc_scale"))
        new_inits += [q_init, s_init]
        attrs = {"axis": 0} if per_axis else {}
        name = fresh(f"{b}_qc_dequantize")
        front.append(helper.make_node("DequantizeLinear", [q_init.name, s_init.name], [b], name=name, **attrs))  # type: ignore[arg-type]
        done.add(b)
    return done


def _clamps_at_zero(node: onnx.NodeProto, constants: dict[str, np.ndarray | None]) -> bool:
    if node.op_type == "Relu":
        return True
    low = next((a.f for a in node.attribute if a.name == "min"), None)  # Clip before opset 11
    if low is None and len(node.input) > 1 and node.input[1]:
        value = constants.get(node.input[1])
        low = float(value) if value is not None and value.size == 1 else None
    return low == 0.0


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray | None]:
    """Names of constant tensors (initializers, Constant outputs); small ones with their value."""
    out: dict[str, np.ndarray | None] = {}
    for t in graph.initializer:
        out[t.name] = numpy_helper.to_array(t) if np.prod(t.dims) <= 16 else None
    for node in graph.node:
        value = constant_value(node)
        if value is not None:
            out[node.output[0]] = numpy_helper.to_array(value) if np.prod(value.dims) <= 16 else None
    return out
