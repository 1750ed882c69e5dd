"""Which tensors are weights: constants feeding the weight inputs of Conv, ConvTranspose, Gemm, MatMul, LSTM/GRU/RNN."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from qconvert import io

# op type -> indices of its weight inputs
WEIGHT_INPUTS = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (1,),
    "MatMul": (1,),
    # recurrent layers (CRNN heads of OCR models): W and R, [directions, gates * hidden, in]
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
# already-quantized ops: their weight inputs are reported, never touched
QUANTIZED_INPUTS = {"ConvInteger": (1,), "MatMulInteger": (1,), "QLinearConv": (3,), "QLinearMatMul": (3,)}
FLOAT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16,
}
MAIN_GRAPH = "main"


@dataclass(frozen=True)
class Consumer:
    """One node that reads the weight, and the weight's output-channel axis for that node."""

    op_type: str
    node: str
    axis: int | None
    depthwise: bool = False  # a grouped Conv with one input channel per group


@dataclass
class Weight:
    """A constant tensor consumed as a weight; `graph` is the GraphProto that defines it."""

    name: str
    graph: onnx.GraphProto = field(repr=False)
    graph_path: str
    source: str  # "initializer" or "constant" (a Constant node's value)
    tensor: onnx.TensorProto = field(repr=False)
    consumers: list[Consumer] = field(default_factory=list)
    is_graph_input: bool = False  # IR < 4 models list initializers as inputs too
    other_readers: list[str] = field(default_factory=list)  # non-weight uses: they read the decoded tensor

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.dims)

    @property
    def elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def channel_axis(self) -> int | None:
        """The output-channel axis all consumers agree on, else None (then only per-tensor applies)."""
        axes = {c.axis for c in self.consumers}
        return axes.pop() if len(axes) == 1 else None

    @property
    def depthwise(self) -> bool:
        return any(c.depthwise for c in self.consumers)

    @property
    def op_types(self) -> str:
        return ",".join(sorted({c.op_type for c in self.consumers}))

    def array(self) -> np.ndarray:
        return io.tensor_array(self.tensor)


@dataclass(frozen=True)
class Skipped:
    """A weight-input tensor left as it is, and why."""

    name: str
    op_type: str
    reason: str
    shape: tuple[int, ...] = ()


@dataclass
class Selection:
    weights: list[Weight]
    skipped: list[Skipped]


def constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a Constant node holds in its `value` attribute (None for other nodes and forms)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def constant_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's constant tensors by name: initializers, and Constant nodes' values."""
    found = {t.name: t for t in graph.initializer}
    for node in graph.node:
        value = constant_value(node)
        if value is not None:
            found[node.output[0]] = value
    return found


def channel_axis(node: onnx.NodeProto, weight_rank: int) -> int | None:
    """The weight's output-channel axis for this consumer (Conv 0, ConvTranspose 1, Gemm by transB ...)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    if node.op_type == "MatMul":
        return weight_rank - 1 if weight_rank >= 2 else None
    if node.op_type in ("LSTM", "GRU", "RNN"):
        return 1
    return None


def select_weights(model: onnx.ModelProto, *, min_elements: int = 1, exclude: tuple[str, ...] = ()) -> Selection:
    """Find every weight, wherever it lives (initializers, Constant nodes, If/Loop subgraphs).

    A tensor shared by several consumers appears once with all of them. Tensors below `min_elements`,
    matching an `exclude` pattern (name or glob), or not float are reported as skipped.
    """
    walker = _Walker({i.name for i in model.graph.input})
    walker.walk(model.graph, MAIN_GRAPH, [])
    for reader, name, scopes in walker.other_reads:
        definition = _resolve(name, scopes)
        weight = walker.found.get((id(definition.graph), name)) if definition else None
        if weight is not None:
            weight.other_readers.append(reader)
    weights = []
    for weight in walker.found.values():
        reason = _skip_reason(weight, min_elements, exclude)
        if reason:
            walker.skipped.setdefault(weight.name, Skipped(weight.name, weight.op_types, reason, weight.shape))
        else:
            weights.append(weight)
    return Selection(weights=weights, skipped=list(walker.skipped.values()))


Scopes = list[dict[str, "Weight"]]  # the constants each enclosing graph defines, outermost first


@dataclass
class _Walker:
    """A walk over a graph and its subgraphs: the weights found, the skipped, and every other read."""

    graph_inputs: set[str]
    found: dict[tuple[int, str], Weight] = field(default_factory=dict)
    skipped: dict[str, Skipped] = field(default_factory=dict)
    other_reads: list[tuple[str, str, Scopes]] = field(default_factory=list)  # (reader, tensor, its scopes)

    def walk(self, graph: onnx.GraphProto, path: str, scopes: Scopes) -> None:
        scopes = [*scopes, self.definitions(graph, path)]
        producers = {out: node.op_type for node in graph.node for out in node.output}
        self.other_reads.extend(("graph output", o.name, scopes) for o in graph.output)
        for index, node in enumerate(graph.node):
            default_domain = node.domain in ("", "ai.onnx")
            slots = WEIGHT_INPUTS.get(node.op_type, ()) if default_domain else ()
            for slot, name in enumerate(node.input):
                if name and slot in slots:
                    self.consider(node, index, name, scopes, producers)
                elif name:
                    self.other_reads.append((node.op_type, name, scopes))
            for name in _inputs_at(node, QUANTIZED_INPUTS.get(node.op_type, ()) if default_domain else ()):
                self.skipped.setdefault(name, Skipped(name, node.op_type, f"already quantized ({node.op_type})"))
            for label, sub in _subgraphs(node, f"{path}/{node.name or node.op_type + str(index)}"):
                self.walk(sub, label, scopes)

    def definitions(self, graph: onnx.GraphProto, path: str) -> dict[str, Weight]:
        defs = {
            t.name: Weight(
                t.name, graph, path, "initializer", t, is_graph_input=path == MAIN_GRAPH and t.name in self.graph_inputs
            )
            for t in graph.initializer
        }
        for node in graph.node:
            value = constant_value(node)
            if value is not None:
                defs[node.output[0]] = Weight(node.output[0], graph, path, "constant", value)
        return defs

    def consider(self, node: onnx.NodeProto, index: int, name: str, scopes: Scopes, producers: dict[str, str]) -> None:
        candidate = _resolve(name, scopes)
        if candidate is None:
            if producers.get(name) == "DequantizeLinear":
                self.skipped.setdefault(name, Skipped(name, node.op_type, "already quantized (DequantizeLinear)"))
            return
        weight = self.found.setdefault((id(candidate.graph), name), candidate)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        depthwise = node.op_type == "Conv" and group > 1 and len(weight.shape) > 1 and weight.shape[1] == 1
        weight.consumers.append(
            Consumer(
                node.op_type, node.name or f"{node.op_type}#{index}", channel_axis(node, len(weight.shape)), depthwise
            )
        )


def _resolve(name: str, scopes: Scopes) -> Weight | None:
    """The constant a name refers to, from the innermost graph out."""
    return next((scope[name] for scope in reversed(scopes) if name in scope), None)


def _inputs_at(node: onnx.NodeProto, slots: tuple[int, ...]) -> list[str]:
    return [node.input[slot] for slot in slots if len(node.input) > slot and node.input[slot]]


def _subgraphs(node: onnx.NodeProto, prefix: str) -> list[tuple[str, onnx.GraphProto]]:
    """A node's subgraphs (If branches, Loop bodies ...), each with its path."""
    found = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append((f"{prefix}.{attr.name}", attr.g))
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found += [(f"{prefix}.{attr.name}[{i}]", sub) for i, sub in enumerate(attr.graphs)]
    return found


def _skip_reason(weight: Weight, min_elements: int, exclude: tuple[str, ...]) -> str | None:
    if any(weight.name == p or fnmatch.fnmatchcase(weight.name, p) for p in exclude):
        return "excluded by --exclude"
    if weight.tensor.data_type not in FLOAT_TYPES:
        kind = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).name
        return f"not a float tensor ({kind}); already quantized?"
    if weight.elements < min_elements:
        return f"{weight.elements} elements < --min-elements {min_elements}"
    return None
