"""Folding inference-mode BatchNormalization into the Conv, ConvTranspose or Gemm before it (exact in float)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from qconvert import io
from qconvert.rewrite import drop_initializers, set_nodes, use_counts
from qconvert.select import channel_axis, constant_value

FOLDABLE = ("Conv", "ConvTranspose", "Gemm")
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
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type not in FOLDABLE or conv.domain not in ("", "ai.onnx") or uses.get(bn.input[0]) != 1:
            continue
        params = bn.input[1:5]
        weight = conv.input[1]
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if not all(p in inits for p in params) or weight not in inits or uses.get(weight) != 1:
            continue
        if bias is not None and (bias not in inits or uses.get(bias) != 1):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in conv.attribute}
        w = io.tensor_array(inits[weight])
        axis = channel_axis(conv, w.ndim)
        if axis is None or (conv.op_type == "ConvTranspose" and attrs.get("group", 1) != 1) or attrs.get("beta", 1.0) == 0:
            continue
        channels = w.shape[axis]
        b = io.tensor_array(inits[bias]).astype(np.float64) if bias else np.zeros(channels)
        if b.shape != (channels,):  # a Gemm C of shape [M, N] or a scalar: leave it
            continue
        epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (io.tensor_array(inits[p]).astype(np.float64) for p in params)
        factor = gamma / np.sqrt(var + epsilon)  # [Cout]
        if where is not None and not where(weight, w, factor, axis):
            continue
        shape = [1] * w.ndim
        shape[axis] = channels
        new_w = (w.astype(np.float64) * factor.reshape(shape)).astype(w.dtype)
        gemm_beta = float(attrs.get("beta", 1.0)) if conv.op_type == "Gemm" else 1.0  # Y = αAB + βC
        new_b = (((gemm_beta * b - mean) * factor + beta) / gemm_beta).astype(w.dtype)
        inits[weight].CopyFrom(numpy_helper.from_array(new_w, inits[weight].name))
        bias_name = bias or f"{weight}_folded_bias"
        if bias:
            inits[bias].CopyFrom(numpy_helper.from_array(new_b, inits[bias].name))
        else:
            tensor = numpy_helper.from_array(new_b, bias_name)
            graph.initializer.append(tensor)
            inits[bias_name] = tensor
            del conv.input[2:]
            conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        for p in params:
            uses[p] -= 1
            if uses[p] == 0:
                unused.add(p)
        dropped.add(index)
        folded[bn.name or bn.output[0]] = weight
    dropped |= {i for i, n in enumerate(graph.node) if n.op_type == "Constant" and n.output and n.output[0] in unused}
    if dropped:
        set_nodes(graph, [n for i, n in enumerate(graph.node) if i not in dropped])
        drop_initializers(graph, unused)
    return folded
