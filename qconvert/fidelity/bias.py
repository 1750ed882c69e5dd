"""Bias correction: the mean output error a quantized weight adds, and the layer biases that absorb it."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io
from qconvert.fidelity.statistics import Layer, Moments, per_weight
from qconvert.rewrite import Additions, After, NameSource, add_after, use_counts
from qconvert.select import constant_value

IMPORTANCE_FLOOR = 1e-6  # dead input channels still count a little: keeps the weighted k-means well posed


def bias_shift(layer: Layer, moments: Moments, original: np.ndarray, quantized: np.ndarray) -> np.ndarray | None:
    """E[x·W] − E[x·Ŵ] per output channel: added to the bias, the layer's mean output is the float one."""
    mean = per_weight(layer, moments.mean, original.shape)
    if mean is None or not layer.bias_editable:
        return None
    delta = (original.astype(np.float64) - quantized.astype(np.float64)) * mean
    reduce = tuple(a for a in range(original.ndim) if a != layer.out_axis)
    return delta.sum(axis=reduce) * layer.mean_gain


def output_layout(layer: Layer, shift: np.ndarray) -> np.ndarray:
    """A per-output-channel shift shaped to add to the layer's output: [Cout, 1, 1] against [N, Cout, H, W]."""
    return shift.reshape(-1, *([1] * (len(layer.weight_shape) - 2))) if layer.convolution else shift


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
    readers = {name: node for node in graph.node for name in node.input}  # of the tensors read once
    after: Additions = {}  # MatMul output -> the Add that makes it
    for layer, shift in shifts.values():
        node = layer.node
        if layer.op_type == "MatMul" and _into_next_bias(node, shift, readers, constants, uses):
            continue
        if layer.op_type == "MatMul":
            bias = numpy_helper.from_array(shift.astype(np.float32), fresh(f"{layer.weight}_qc_bias"))
            graph.initializer.append(bias)
            y, product = node.output[0], fresh(f"{node.output[0]}_qc_product")
            after[y] = After(
                [helper.make_node("Add", [product, bias.name], [y], name=fresh(f"{product}_bias"))], product
            )
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


def _into_next_bias(
    node: onnx.NodeProto,
    shift: np.ndarray,
    readers: dict[str, onnx.NodeProto],
    constants: dict[str, onnx.TensorProto],
    uses: dict[str, int],
) -> bool:
    """Add the shift to the bias of the Add that alone reads the MatMul's product, where that bias is a constant
    of one value per output channel read only there (a Linear layer as exporters write it), in place: no Add of
    our own then, and no second bias in the file."""
    add = readers.get(node.output[0]) if uses.get(node.output[0]) == 1 else None
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return False
    bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
    if bias not in constants or uses.get(bias) != 1:
        return False
    old = io.tensor_array(constants[bias])
    if old.dtype != np.float32 or old.size != shift.size or old.shape[-1:] != shift.shape:
        return False
    constants[bias].CopyFrom(numpy_helper.from_array((old + shift).astype(np.float32), constants[bias].name))
    return True
