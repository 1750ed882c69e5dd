"""Input second moments H = Σ x xᵀ of a layer, over the columns its weight multiplies (what GPTQ needs).

A Gemm's or MatMul's columns are its input features; a Conv's are the Cin/G·kh·kw values of one input
patch, per group (im2col); a ConvTranspose's the Cin/G·kh·kw input values that its kernel's taps bring to one
output pixel (zero where a tap brings none: strides). Each batch's H is computed in the graph beside the
statistics pass (`readers`), so only the matrices come back. The weight is seen as [G, R, C]: groups, output
rows, columns, in the same order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import helper, numpy_helper

from qconvert.rewrite import After

if TYPE_CHECKING:
    from qconvert.fidelity.statistics import Layer
    from qconvert.sections import Section

MIN_BUDGET = 64 << 20  # the moments of all layers held at once (float32): this much, or WEIGHT_SHARE of the
WEIGHT_SHARE = 0.25  # weights' bytes if more; layers beyond, in graph order, go without (plain rounding)
MAX_COLUMNS = 2304  # wider layers go without: their inverse alone would take 4 · C² · 8 bytes at once


def wanted(layers: dict[str, Layer]) -> dict[str, np.ndarray]:
    """Zeroed H for these layers, in graph order within the budget. The pass holds about three times the
    budget at once (onnxruntime's outputs, their copies, the sums): ResNet-50-shaped k-means 4 with
    32 calibration samples peaks at 706 MB for a 102 MB file (35 s)."""
    weights = sum(4 * int(np.prod(layer.weight_shape)) for layer in layers.values())
    budget, out, total = max(MIN_BUDGET, int(WEIGHT_SHARE * weights)), {}, 0
    for name, layer in layers.items():
        size = shape(layer)
        if size[1] <= MAX_COLUMNS and total + 4 * size[0] * size[1] ** 2 <= budget:
            out[name] = np.zeros((size[0], size[1], size[1]), np.float32)
            total += out[name].nbytes
    return out


def shape(layer: Layer) -> tuple[int, int]:
    """(groups, columns) of the layer's H."""
    if layer.op_type == "Conv":
        return layer.groups, int(np.prod(layer.weight_shape[1:]))
    if layer.op_type == "ConvTranspose":
        return layer.groups, layer.weight_shape[0] // layer.groups * int(np.prod(layer.weight_shape[2:]))
    return 1, layer.weight_shape[layer.in_axis]


def matrix(layer: Layer, array: np.ndarray) -> np.ndarray:
    """The weight as [G, R, C]."""
    if layer.op_type == "Conv":
        return array.reshape(layer.groups, array.shape[0] // layer.groups, -1)
    if layer.op_type == "ConvTranspose":  # [Cin, Cout/G, *kernel] -> [G, Cout/G, Cin/G · taps]
        by_group = array.reshape(layer.groups, array.shape[0] // layer.groups, array.shape[1], -1)
        return by_group.transpose(0, 2, 1, 3).reshape(layer.groups, array.shape[1], -1)
    return (array if layer.in_axis == 1 else array.T)[None]


def from_matrix(layer: Layer, rows: np.ndarray) -> np.ndarray:
    """The inverse of `matrix`."""
    if layer.op_type == "Conv":
        return rows.reshape(layer.weight_shape)
    if layer.op_type == "ConvTranspose":
        cin, cout = layer.weight_shape[:2]
        by_group = rows.reshape(layer.groups, cout, cin // layer.groups, -1).transpose(0, 2, 1, 3)
        return by_group.reshape(layer.weight_shape)
    return rows[0] if layer.in_axis == 1 else rows[0].T


def readers(layer: Layer, section: Section) -> str:
    """Nodes beside the section that reduce one batch of the layer's input to its H ([G, C, C]), in the graph:
    only the matrix comes back. A Conv's (or ConvTranspose's) patches come from a copy of it (same strides,
    pads, dilations) with one group per input channel, whose kernel picks each position into a channel of its
    own; a 1x1 one's are its input's pixels; a Gemm's or MatMul's are its input's rows."""
    graph, fresh, x = section.graph, section.fresh, layer.node.input[0]
    nodes = section.after.setdefault(x, After()).nodes

    def constant(name: str, array: np.ndarray) -> str:
        graph.initializer.append(numpy_helper.from_array(array, fresh(f"{x}_qc_{name}")))
        return graph.initializer[-1].name

    def node(op: str, inputs: list[str], name: str, **attributes: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [fresh(f"{x}_qc_{name}")], **attributes))
        return nodes[-1].output[0]

    out = fresh(f"{x}_qc_second_moments")
    if not layer.convolution:
        if layer.op_type == "Gemm" and layer.x_axis == 0:  # transA: x is [K, M]
            rows = node("Transpose", [x], "rows")
        else:
            rows = node("Reshape", [x, constant("rows_shape", np.array([-1, layer.in_channels], np.int64))], "rows")
        nodes.append(helper.make_node("MatMul", [node("Transpose", [rows], "columns"), rows], [out]))
        return out
    groups, columns = shape(layer)
    attributes = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute if a.name != "kernel_shape"}
    attributes["group"] = layer.in_channels
    pixels = all(k == 1 for k in layer.weight_shape[2:]) and all(  # a 1x1 Conv's patches are its input's pixels
        attributes.get(a, v) in (v, [v] * (len(layer.weight_shape) - 2), [v] * 2 * (len(layer.weight_shape) - 2))
        for a, v in (("strides", 1), ("pads", 0))
    )
    patches = (
        x if pixels else node(layer.op_type, [x, constant("pick", _picking_kernel(layer))], "patches", **attributes)
    )
    grouped = node(
        "Reshape", [patches, constant("groups_shape", np.array([0, groups, columns, -1], np.int64))], "grouped"
    )
    by_group = node("Transpose", [grouped], "by_group", perm=[1, 2, 0, 3])  # [G, C, N, positions]
    rows = node(
        "Reshape", [by_group, constant("matrix_shape", np.array([groups, columns, -1], np.int64))], "patch_rows"
    )
    nodes.append(helper.make_node("MatMul", [rows, node("Transpose", [rows], "patch_columns", perm=[0, 2, 1])], [out]))
    return out


def _picking_kernel(layer: Layer) -> np.ndarray:
    """The kernel of a Conv or ConvTranspose with one group per input channel whose output channel c·k + p is
    input channel c at kernel position p, the weight's own column order within each of its groups: [Cin·k, 1,
    *kernel] (Conv) or [Cin, k, *kernel] (ConvTranspose)."""
    kernel = layer.weight_shape[2:]
    positions = int(np.prod(kernel))
    pick = np.broadcast_to(np.eye(positions, dtype=np.float32), (layer.in_channels, positions, positions))
    shape = (layer.in_channels, positions) if layer.op_type == "ConvTranspose" else (-1, 1)
    return np.ascontiguousarray(pick).reshape(*shape, *kernel)
