"""Folding inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it (exact in float)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from qconvert import io
from qconvert.rewrite import drop_initializers, set_nodes, use_counts
from qconvert.select import channel_axis, constant_value

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
DOMAINS = ("", "ai.onnx")
# (weight name, weight [.., C at axis, ..], BN factor γ/√(σ²+ε) [C], axis) -> fold this one?
FoldFilter = Callable[[str, np.ndarray, np.ndarray, int], bool]


def fold_batchnorm(model: onnx.ModelProto, where: FoldFilter | None = None) -> dict[str, str]:
    """Fold every Conv/ConvTranspose/Gemm -> BatchNormalization pair of the main graph, in place;
    returns {BN name: name of the weight it was folded into}.

    W' = W·γ/√(σ²+ε) along the output channels, b' = (b − μ)·γ/√(σ²+ε) + β. Only where the layer's
    output feeds nothing but the BN, its weight (and bias) are constants used by that layer alone, and
    the BN parameters are constants (initializers, or Constant nodes as paddle2onnx writes them).
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        value = constant_value(node)
        if value is not None:
            inits[node.output[0]] = value  # edited in place like an initializer
    uses = use_counts(graph)
    producer = {out: node for node in graph.node for out in node.output}
    folded: dict[str, str] = {}
    dropped: set[int] = set()
    unused: set[str] = set()
    for index, bn in enumerate(graph.node):
        pair = _pair(bn, producer, uses, inits)
        if pair is None or (where is not None and not where(pair.weight, pair.w, pair.factor, pair.axis)):
            continue
        _fold(pair, graph, inits)
        for name in pair.params:
            uses[name] -= 1
            if uses[name] == 0:
                unused.add(name)
        dropped.add(index)
        folded[bn.name or bn.output[0]] = pair.weight
    dropped |= {i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output and n.output[0] in unused}
    if dropped:
        set_nodes(graph, [n for i, n in enumerate(graph.node) if i not in dropped])
        drop_initializers(graph, unused)
    return folded


@dataclass
class _Pair:
    """A layer and the BatchNormalization after it that can be folded into it."""

    bn: onnx.NodeProto
    layer: onnx.NodeProto
    params: list[str]  # γ, β, μ, σ²
    weight: str
    bias: str | None
    w: np.ndarray
    b: np.ndarray  # [C] float64 (zeros without a bias)
    axis: int
    factor: np.ndarray  # γ/√(σ²+ε) [C] float64
    beta: float  # Gemm's β (Y = αAB + βC), else 1


def _pair(
    bn: onnx.NodeProto, producer: dict[str, onnx.NodeProto], uses: dict[str, int], inits: dict[str, onnx.TensorProto]
) -> _Pair | None:
    """The foldable pair that ends in `bn`, if it is one."""
    layer = _layer_before(bn, producer, uses)
    if layer is None:
        return None
    params, weight = list(bn.input[1:5]), layer.input[1]
    bias = layer.input[2] if len(layer.input) > 2 and layer.input[2] else None
    own = [weight, *([bias] if bias else [])]  # constants read by this layer alone
    if not all(p in inits for p in params) or not all(t in inits and uses.get(t) == 1 for t in own):
        return None
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in layer.attribute}
    w = io.tensor_array(inits[weight])
    axis = channel_axis(layer, w.ndim)
    if axis is None or (layer.op_type == "ConvTranspose" and attrs.get("group", 1) != 1) or attrs.get("beta", 1.0) == 0:
        return None
    b = io.tensor_array(inits[bias]).astype(np.float64) if bias else np.zeros(w.shape[axis])
    if b.shape != (w.shape[axis],):  # a Gemm C of shape [M, N] or a scalar: leave it
        return None
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    gamma, _, _, var = (io.tensor_array(inits[p]).astype(np.float64) for p in params)
    beta = float(attrs.get("beta", 1.0)) if layer.op_type == "Gemm" else 1.0
    return _Pair(bn, layer, params, weight, bias, w, b, axis, gamma / np.sqrt(var + epsilon), beta)


def _layer_before(
    bn: onnx.NodeProto, producer: dict[str, onnx.NodeProto], uses: dict[str, int]
) -> onnx.NodeProto | None:
    """The Conv, ConvTranspose or Gemm whose output only this BatchNormalization reads."""
    if bn.op_type != "BatchNormalization" or bn.domain not in DOMAINS or len(bn.output) != 1:
        return None
    layer = producer.get(bn.input[0])
    if layer is None or layer.op_type not in FOLDABLE or layer.domain not in DOMAINS or uses.get(bn.input[0]) != 1:
        return None
    return layer


def _fold(pair: _Pair, graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> None:
    """The layer takes the folded weight and bias and writes the BN's output; the BN is dropped by the caller."""
    _, bn_beta, mean, _ = (io.tensor_array(inits[p]).astype(np.float64) for p in pair.params)
    shape = [1] * pair.w.ndim
    shape[pair.axis] = pair.w.shape[pair.axis]
    new_w = (pair.w.astype(np.float64) * pair.factor.reshape(shape)).astype(pair.w.dtype)
    new_b = (((pair.beta * pair.b - mean) * pair.factor + bn_beta) / pair.beta).astype(pair.w.dtype)
    inits[pair.weight].CopyFrom(numpy_helper.from_array(new_w, inits[pair.weight].name))
    if pair.bias:
        inits[pair.bias].CopyFrom(numpy_helper.from_array(new_b, inits[pair.bias].name))
    else:
        bias_name = f"{pair.weight}_folded_bias"
        tensor = numpy_helper.from_array(new_b, bias_name)
        graph.initializer.append(tensor)
        inits[bias_name] = tensor
        del pair.layer.input[2:]
        pair.layer.input.append(bias_name)
    pair.layer.output[0] = pair.bn.output[0]
