"""Cross-layer equalization (Nagel et al. 2019, "Data-free quantization through weight equalization and bias
correction"): where a Conv's output reaches a depthwise Conv only through positive-homogeneous ops (Relu,
LeakyRelu, or none; a BatchNormalization in between carries the scale unless folded first), output channel i
of the first is divided by s_i and input channel i of the second multiplied by it. The model computes the
same in float; with s_i = √(r1_i / r2_i) both weights' channel ranges become √(r1_i·r2_i), which per-tensor
grids and palettes represent with less error, while per-channel ones see each of their rows only scaled.

Only depthwise second Convs: a dense one's per-channel rows mix its input channels, whose new scales then
crowd each other (PP-OCR direction classifier, int4 per channel: 25.8 -> 16.2 dB output SNR with dense pairs;
25.96 depthwise only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qconvert import io
from qconvert.rewrite import use_counts
from qconvert.select import constant_value

HOMOGENEOUS = ("Relu", "LeakyRelu")  # f(a·x) = a·f(x) for every a > 0
DOMAINS = ("", "ai.onnx")
ROUNDS = 16  # passes over all pairs (a Conv between two pairs moves twice); stops once no scale moves ...
SETTLED = 1e-3  # ... by more than this (|log s|)
MAX_SCALE = 1024.0  # no channel is scaled by more (or less than its inverse): dead channels stay as they are


@dataclass
class _Pair:
    """Two Convs and what lies between: the first's output channels are the second's input channels."""

    first: onnx.NodeProto
    bn: onnx.NodeProto | None  # an unfolded BatchNormalization right after the first
    second: onnx.NodeProto
    groups: int  # the second's

    @property
    def name(self) -> str:
        return self.second.name or self.second.output[0]


def equalize(model: onnx.ModelProto, quantized: set[str] | None = None) -> list[str]:
    """Equalize every such pair of the main graph whose two weights are both `quantized` (all: None), in
    place; returns the names of the second Convs.

    Only where every tensor between is read by the next op alone, and the weights, biases (and the BN's
    parameters) are constants read by these nodes alone. A weight left float gains nothing from it, and its
    partner only trades ranges with it (the PP-OCRv4 recognizer's float stem and its depthwise Conv: kmeans 3
    lost 1 dB).
    """
    inits, pairs = _pairs(model, quantized)
    arrays = {name: _working(io.tensor_array(inits[name])) for p in pairs for name in _edited(p)}
    for _ in range(ROUNDS):
        moved = 0.0
        for pair in pairs:
            scale = _scales(pair, arrays)
            _apply(pair, scale, arrays)
            moved = max(moved, float(np.max(np.abs(np.log(scale)))))
        if moved < SETTLED:
            break
    for name, array in arrays.items():
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inits[name].data_type)
        inits[name].CopyFrom(numpy_helper.from_array(array.astype(dtype), inits[name].name))
    return [p.name for p in pairs]


def through_batchnorm(model: onnx.ModelProto, quantized: set[str] | None = None) -> set[str]:
    """The weights of the first Convs of pairs with a BatchNormalization between: folded first, the scales
    move those weights themselves (equalized through the BN's γ, the Conv keeps its ranges)."""
    return {p.first.input[1] for p in _pairs(model, quantized)[1] if p.bn is not None}


def _pairs(model: onnx.ModelProto, quantized: set[str] | None) -> tuple[dict[str, onnx.TensorProto], list[_Pair]]:
    """The main graph's constants (initializers and Constant nodes' tensors) and its pairs of `quantized`
    weights."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inits.update({n.output[0]: t for n in graph.node if (t := constant_value(n)) is not None})
    uses = use_counts(graph)
    producer = {out: node for node in graph.node for out in node.output}
    pairs = [p for node in graph.node if (p := _pair(node, producer, uses, inits)) is not None]
    if quantized is not None:
        pairs = [p for p in pairs if p.first.input[1] in quantized and p.second.input[1] in quantized]
    return inits, pairs


def _working(array: np.ndarray) -> np.ndarray:
    """The array in the type equalization computes in: float32 at least (float16 would lose the scales)."""
    return array.astype(np.promote_types(array.dtype, np.float32), copy=False)


def _pair(
    second: onnx.NodeProto,
    producer: dict[str, onnx.NodeProto],
    uses: dict[str, int],
    inits: dict[str, onnx.TensorProto],
) -> _Pair | None:
    """The pair that ends in `second`, if it is one."""
    if second.op_type != "Conv" or second.domain not in DOMAINS or second.input[1] not in inits:
        return None
    node = producer.get(second.input[0])
    if node is not None and node.op_type in HOMOGENEOUS and node.domain in DOMAINS:
        node = producer.get(node.input[0]) if uses.get(node.output[0]) == 1 else None
    bn = None
    if node is not None and node.op_type == "BatchNormalization" and uses.get(node.output[0]) == 1:
        bn, node = node, producer.get(node.input[0])
    if node is None or node.op_type != "Conv" or node.domain not in DOMAINS or uses.get(node.output[0]) != 1:
        return None
    owned = [n for n in (node.input[1], *node.input[2:3], second.input[1], *(bn.input[1:5] if bn else [])) if n]
    if not all(name in inits and uses.get(name) == 1 for name in owned):
        return None
    if any(inits[name].data_type not in _FLOATS for name in owned):
        return None
    groups = next((a.i for a in second.attribute if a.name == "group"), 1)
    channels, per_group = inits[node.input[1]].dims[0], inits[second.input[1]].dims[1]
    if channels != groups or per_group != 1 or inits[second.input[1]].dims[0] % groups:
        return None  # depthwise only: each of its output channels reads one input channel (see above)
    return _Pair(node, bn, second, groups)


_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _edited(pair: _Pair) -> list[str]:
    """The constants equalization rewrites: the first's weight and bias (or the BN's γ and β), the second's
    weight; the BN's variance is read."""
    first = [pair.first.input[1], *([] if pair.bn else [n for n in pair.first.input[2:3] if n])]
    return [*first, *(pair.bn.input[1:5] if pair.bn else []), pair.second.input[1]]


def _scales(pair: _Pair, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """s_i = √(r1_i / r2_i): r1 the first's output-channel ranges (as folded with the BN), r2 the second's
    input-channel ranges; 1 where either is 0."""
    w1 = arrays[pair.first.input[1]]
    r1 = np.max(np.abs(w1.reshape(w1.shape[0], -1)), axis=1)
    if pair.bn is not None:
        gamma, _, _, var = (arrays[name] for name in pair.bn.input[1:5])
        epsilon = next((a.f for a in pair.bn.attribute if a.name == "epsilon"), 1e-5)
        r1 = r1 * np.abs(gamma) / np.sqrt(var.astype(np.float64) + epsilon)
    w2 = arrays[pair.second.input[1]]  # [C·m, 1, ...]: input channel i makes outputs i·m ... i·m + m − 1
    r2 = np.max(np.abs(w2.reshape(pair.groups, -1)), axis=1)
    live = (r1 > 0) & (r2 > 0)
    scale = np.sqrt(np.where(live, r1, 1.0) / np.where(live, r2, 1.0))
    return np.clip(scale, 1 / MAX_SCALE, MAX_SCALE)


def _apply(pair: _Pair, scale: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
    """Channel i of the first's output divided by s_i, of the second's input multiplied by it."""
    scale = scale.astype(arrays[pair.second.input[1]].dtype)
    if pair.bn is not None:
        for name in pair.bn.input[1:3]:  # γ and β
            arrays[name] = arrays[name] / scale
    else:
        w1 = arrays[pair.first.input[1]]
        arrays[pair.first.input[1]] = w1 / scale.reshape(-1, *[1] * (w1.ndim - 1))
        if len(pair.first.input) > 2 and pair.first.input[2]:
            arrays[pair.first.input[2]] = arrays[pair.first.input[2]] / scale
    w2 = arrays[pair.second.input[1]]
    arrays[pair.second.input[1]] = (w2.reshape(pair.groups, -1) * scale[:, None]).reshape(w2.shape)
