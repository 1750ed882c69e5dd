"""Float16: the graph computed in half precision wherever its ops allow it and the data says it holds.

Every float32 tensor of the main graph becomes float16 where the op that makes it and the ops that read it
take float16 at the model's opset: onnx's schemas say which inputs and outputs share a node's float type,
and which are float32 whatever the rest (Resize's scales, DequantizeLinear's output below opset 19).
A node stays float32
- by kind: index and box arithmetic (TopK, NonMaxSuppression, RoiAlign, Range, CumSum), random ops, ops of
  other domains, ops with subgraphs (If, Loop, Scan: their bodies read outer tensors by name, as float32);
- where it computes on a shape (integers past 2048 are not exact in float16);
- where it reads a float constant past float16's range (a BatchNorm's running variance of 1e8);
- where the caller says (`keep`): ops that see values past float16's range on the data, and those the
  drift search keeps (`qconvert.methods.half`).
Where float16 and float32 meet, one Cast per tensor and type. A constant read only by float16 ops is
stored as float16 (the file halves); one that a float32 op reads too stays float32, cast for the others.
Inputs and outputs stay float32 unless `keep_io_types` is off.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.defs import OpSchema

from qconvert import io
from qconvert.opset import default_opset, without_weights
from qconvert.select import constant_tensors

FLOAT, HALF = int(TensorProto.FLOAT), int(TensorProto.FLOAT16)
HALF_MAX = 65504.0
HALF_TINY = 2.0**-24  # the smallest float16 above zero: smaller constants keep this, not 0 (an epsilon stays one)
KEPT_KINDS = frozenset(
    {"TopK", "NonMaxSuppression", "RoiAlign", "Range", "CumSum", "RandomNormal", "RandomUniform"}
    | {"RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli", "EyeLike"}
)
SHAPE_OPS = frozenset({"Shape", "Size"})
SOURCES = frozenset({"Constant", "ConstantOfShape"})  # their value attribute sets their type


@dataclass
class Graph:
    """What the conversion needs to know of a float32 model: each tensor's element type, each node's
    float positions (inputs and outputs whose type follows the node's float16 choice), and why a node
    cannot take float16 at all."""

    model: onnx.ModelProto
    types: dict[str, int]
    half_inputs: list[list[int]] = field(default_factory=list)
    half_outputs: list[list[int]] = field(default_factory=list)
    fixed: dict[int, str] = field(default_factory=dict)  # node index -> why it stays float32 whatever the data
    outer: set[str] = field(default_factory=set)  # tensors subgraphs read by name

    def label(self, index: int) -> str:
        node = self.model.graph.node[index]
        return node.name or f"{node.op_type}#{index}"

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == FLOAT


def analyse(model: onnx.ModelProto) -> Graph:
    """The element types of every tensor (shape inference) and each node's float16 positions."""
    graph = Graph(model, _types(model))
    opset = default_opset(model)
    derived: set[str] = set()  # tensors computed from shapes and constants alone
    constants = {t.name for t in model.graph.initializer}
    values = _largest_constants(model)
    for index, node in enumerate(model.graph.node):
        graph.outer |= _outer_names(node)
        if node.op_type in SOURCES:
            constants.update(node.output)
        elif node.op_type in SHAPE_OPS or (
            any(x in derived for x in node.input) and all(not x or x in derived or x in constants for x in node.input)
        ):
            derived.update(node.output)
        inputs, outputs, why = _positions(node, graph, opset)
        if why is None and any(
            x in derived for x in (*(node.input[p] for p in inputs), *(node.output[q] for q in outputs))
        ):
            why = "shape arithmetic (integers past 2048 are not exact in float16)"
        if why is None and (largest := max((values.get(node.input[p], 0.0) for p in inputs), default=0.0)) > HALF_MAX:
            why = f"reads a constant past float16's range (|x| up to {largest:.3g})"
        graph.half_inputs.append(inputs)
        graph.half_outputs.append(outputs)
        if why is not None:
            graph.fixed[index] = why
    return graph


def _largest_constants(model: onnx.ModelProto) -> dict[str, float]:
    """The largest magnitude of each float constant."""
    largest = {}
    for name, tensor in constant_tensors(model.graph).items():
        if tensor.data_type == FLOAT:
            array = io.tensor_array(tensor)
            largest[name] = float(np.max(np.abs(array))) if array.size else 0.0
    return largest


def _types(model: onnx.ModelProto) -> dict[str, int]:
    skeleton = without_weights(model)  # inference needs the types, not the data
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # an op inference does not know: the types given in the model
        inferred = skeleton
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.input, *g.value_info, *g.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] not in types:
            types[node.output[0]] = _constant_type(node)
    return types


def _constant_type(node: onnx.NodeProto) -> int:
    for a in node.attribute:
        if a.name == "value":
            return a.t.data_type
        if a.name in ("value_float", "value_floats"):
            return FLOAT
    return TensorProto.UNDEFINED


def _outer_names(node: onnx.NodeProto) -> set[str]:
    """The tensors a node's subgraphs read from outside them."""
    names: set[str] = set()
    for attribute in node.attribute:
        for body in (attribute.g,) if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
            made = {t.name for t in body.initializer} | {i.name for i in body.input}
            for inner in body.node:
                names |= {x for x in inner.input if x and x not in made}
                names |= _outer_names(inner)
                made.update(inner.output)
    return names


def _positions(node: onnx.NodeProto, graph: Graph, opset: int) -> tuple[list[int], list[int], str | None]:
    """The node's inputs and outputs whose float32 type would become float16, and why it cannot (None: it can)."""
    if node.op_type in SOURCES or node.domain not in ("", "ai.onnx"):
        return [], [], None if node.op_type in SOURCES else f"an op of domain {node.domain}"
    if node.op_type in KEPT_KINDS:
        return [], [], "index or coordinate arithmetic"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return [], [], "has subgraphs"
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
    except onnx.defs.SchemaError:
        return [], [], "no schema"
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    found: dict[str, list[int]] = {"in": [], "out": []}
    variables: set[str] = set()
    for kind, names, formals in (("in", node.input, schema.inputs), ("out", node.output, schema.outputs)):
        for position, name in enumerate(names):
            formal = _formal(formals, position)
            if name and graph.is_float(name) and formal is not None and formal.type_str in allowed:
                found[kind].append(position)
                variables.add(formal.type_str)
    if any("tensor(float16)" not in allowed[v] for v in variables):
        return [], [], f"no float16 form at opset {opset}"
    return found["in"], found["out"], None


def _formal(formals: Sequence[OpSchema.FormalParameter], position: int) -> OpSchema.FormalParameter | None:
    if position < len(formals):
        return formals[position]
    last = formals[-1] if formals else None
    return last if last is not None and last.option == OpSchema.FormalParameterOption.Variadic else None


def convert(graph: Graph, keep: Collection[int] = (), keep_io_types: bool = True) -> tuple[onnx.ModelProto, int]:
    """A copy of the model in float16 but for the nodes `keep` names (indices) and those that cannot; and
    the number of Casts added."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    g = model.graph
    nodes = list(g.node)
    half = [i not in keep and i not in graph.fixed for i in range(len(nodes))]
    wants: dict[str, set[int]] = defaultdict(set)  # tensor -> the types its readers take
    uses: list[tuple[onnx.NodeProto, int, str, int]] = []
    for i, node in enumerate(nodes):
        positions = set(graph.half_inputs[i]) if half[i] else set()
        for p, name in enumerate(node.input):
            if graph.is_float(name):
                want = HALF if p in positions else FLOAT
                wants[name].add(want)
                uses.append((node, p, name, want))
    required: dict[str, int] = {o.name: FLOAT if keep_io_types else HALF for o in g.output if graph.is_float(o.name)}
    required |= {name: FLOAT for name in graph.outer if graph.is_float(name)}
    for name, want in required.items():
        wants[name].add(want)
    home = _homes(graph, half, wants, keep_io_types)
    taken = {x for n in nodes for x in (*n.input, *n.output)} | {t.name for t in g.initializer}
    taken |= {v.name for v in (*g.input, *g.output)}
    names, casts, renamed = _names(home, wants, required, taken)
    for node, p, name, want in uses:
        node.input[p] = names[name, want]
    made_by: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for q, name in enumerate(node.output):
            made_by[name] = i
            node.output[q] = renamed.get(name, name)
        if half[i]:
            _retype(node, graph.half_outputs[i])
        if node.op_type in SOURCES and node.output and home.get(graph.model.graph.node[i].output[0]) == HALF:
            _to_half_value(node)
    after: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for source, target, to in casts:
        after[made_by.get(source, -1)].append(helper.make_node("Cast", [names[source, home[source]]], [target], to=to))
    del g.node[:]
    g.node.extend([*after[-1], *(n for i, node in enumerate(nodes) for n in (node, *after[i]))])
    _retype_values(g, home, renamed, required)
    return model, len(casts)


def _names(
    home: dict[str, int], wants: dict[str, set[int]], required: dict[str, int], taken: set[str]
) -> tuple[dict[tuple[str, int], str], list[tuple[str, str, int]], dict[str, str]]:
    """Under which name each tensor is found in each type its readers take; the Casts (source tensor, name
    made, type) that make the types it does not have; and the producer outputs renamed, so that a name the
    outputs or a subgraph need keeps its type there."""
    names: dict[tuple[str, int], str] = {}
    casts: list[tuple[str, str, int]] = []
    renamed: dict[str, str] = {}

    def fresh(name: str, to: int) -> str:
        base = candidate = f"{name}_{'float16' if to == HALF else 'float32'}"
        k = 1
        while candidate in taken:
            candidate, k = f"{base}_{k}", k + 1
        taken.add(candidate)
        return candidate

    for name, types in wants.items():
        own = home.get(name)
        if own is None:
            continue
        local, need = name, required.get(name)
        if need is not None and need != own:
            local = renamed[name] = fresh(name, own)
            names[name, need] = name
            casts.append((name, name, need))
        names[name, own] = local
        for to in sorted(types - {own, need}):
            names[name, to] = fresh(name, to)
            casts.append((name, names[name, to], to))
    return names, casts, renamed


def _retype(node: onnx.NodeProto, half_outputs: list[int]) -> None:
    """A float16 node whose attributes set its output type (Cast) now sets float16."""
    if node.op_type == "Cast" and half_outputs:
        for attribute in node.attribute:
            if attribute.name == "to":
                attribute.i = HALF


def _to_half_value(node: onnx.NodeProto) -> None:
    """A Constant's or ConstantOfShape's value in float16."""
    value = next((a for a in node.attribute if a.name in ("value", "value_float", "value_floats")), None)
    if value is None:  # ConstantOfShape without a value: float32 zeros
        array = np.zeros(1, np.float32)
    elif value.name == "value":
        array = numpy_helper.to_array(value.t)
    else:
        array = np.array(value.f if value.name == "value_float" else list(value.floats), np.float32)
    if value is not None:
        node.attribute.remove(value)
    node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(to_half(array))))


def to_half(array: np.ndarray) -> np.ndarray:
    """float32 -> float16, values below float16's smallest kept at it (with their sign) rather than 0."""
    tiny = (array != 0) & (np.abs(array) < HALF_TINY)
    return np.where(tiny, np.sign(array) * HALF_TINY, array).astype(np.float16)


def _retype_values(g: onnx.GraphProto, home: dict[str, int], renamed: dict[str, str], required: dict[str, int]) -> None:
    """Initializers, inputs, outputs and recorded value types that are float16 now."""
    for index, tensor in enumerate(g.initializer):
        if home.get(tensor.name) == HALF:
            g.initializer[index].CopyFrom(numpy_helper.from_array(to_half(io.tensor_array(tensor)), tensor.name))
    for value in (*g.input, *g.value_info):
        if home.get(value.name) == HALF and value.name not in renamed:
            value.type.tensor_type.elem_type = HALF
    for value in g.output:
        if required.get(value.name) == HALF:
            value.type.tensor_type.elem_type = HALF


def _homes(graph: Graph, half: list[bool], wants: dict[str, set[int]], keep_io_types: bool) -> dict[str, int]:
    """Each float tensor's own type: what its producer makes; a constant's, float16 if every reader takes that."""
    home: dict[str, int] = {}
    for i, node in enumerate(graph.model.graph.node):
        made = set(graph.half_outputs[i]) if half[i] else set()
        for q, name in enumerate(node.output):
            if graph.is_float(name):
                home[name] = HALF if q in made else FLOAT
        if node.op_type in SOURCES and node.output and graph.is_float(node.output[0]):
            home[node.output[0]] = HALF if wants.get(node.output[0]) == {HALF} else FLOAT
    for tensor in graph.model.graph.initializer:
        if tensor.data_type == FLOAT:
            home[tensor.name] = HALF if wants.get(tensor.name) == {HALF} else FLOAT
    for value in graph.model.graph.input:
        if graph.is_float(value.name) and value.name not in home:
            home[value.name] = FLOAT if keep_io_types or value.name in graph.outer else HALF
    return home
