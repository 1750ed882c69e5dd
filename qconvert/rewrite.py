"""Shared graph-editing helpers: fresh names, and batched edits of one graph (new tensors, nodes on top)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.select import Weight


class NameSource:
    """Fresh tensor and node names that collide with nothing in the model."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self._taken: set[str] = set()
        graphs = [model.graph]
        while graphs:
            graph = graphs.pop()
            self._taken.update(t.name for t in graph.initializer)
            self._taken.update(v.name for v in (*graph.input, *graph.output, *graph.value_info))
            for node in graph.node:
                self._taken.update((*node.input, *node.output, node.name))
                for attr in node.attribute:
                    graphs.extend([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)

    def __call__(self, base: str) -> str:
        name, n = base, 1
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name


@dataclass
class GraphEdit:
    """All changes to one graph, applied in one rebuild of its node list."""

    graph: onnx.GraphProto
    path: str  # "main", "main/If0.then_branch", ...
    fresh: NameSource
    front: list[onnx.NodeProto] = field(default_factory=list)
    removed: set[str] = field(default_factory=set)  # weights: their initializer or Constant node goes
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    shared: dict[tuple[str, bytes], str] = field(default_factory=dict)

    def constant(self, base: str, suffix: str, array: np.ndarray, *, share: bool = False) -> str:
        """A new initializer; `share` reuses one with the same suffix and bytes (small constants)."""
        key = (suffix, f"{array.dtype.str}{array.shape}".encode() + array.tobytes())
        if share and key in self.shared:
            return self.shared[key]
        name = self.fresh(f"qc_{suffix}" if share else f"{base}_qc_{suffix}")
        self.initializers.append(numpy_helper.from_array(array, name))
        if share:
            self.shared[key] = name
        return name

    def node(
        self, base: str, op: str, inputs: list[str], suffix: str, output: str | None = None, **attrs: object
    ) -> str:
        out = output or self.fresh(f"{base}_qc_{suffix}")
        name = self.fresh(f"{out}_node") if output else out
        self.front.append(helper.make_node(op, inputs, [out], name=name, **attrs))  # type: ignore[arg-type]
        return out

    def apply(self) -> None:
        nodes = [*self.front]
        nodes += [n for n in self.graph.node if not (n.op_type == "Constant" and n.output[0] in self.removed)]
        set_nodes(self.graph, nodes)
        # Delete in place (no copy of the remaining, possibly large, tensors).
        for i in reversed(range(len(self.graph.initializer))):
            if self.graph.initializer[i].name in self.removed:
                del self.graph.initializer[i]
        self.graph.initializer.extend(self.initializers)


def replace_weights(model: onnx.ModelProto, jobs: list[tuple[Weight, Callable[[GraphEdit], None]]]) -> None:
    """Drop each weight's initializer or Constant node; its builder adds what recomputes it, in place.

    A builder adds tensors and nodes to the weight's graph through a GraphEdit; its last node must
    output the weight's name, so every consumer reads the rebuilt tensor unchanged.
    """
    model.ir_version = max(model.ir_version, 4)  # IR 3 wanted every initializer listed as an input
    fresh = NameSource(model)
    edits: dict[int, GraphEdit] = {}
    for weight, build in jobs:
        edit = edits.get(id(weight.graph)) or edits.setdefault(
            id(weight.graph), GraphEdit(weight.graph, weight.graph_path, fresh)
        )
        edit.removed.add(weight.name)
        build(edit)
        if weight.is_graph_input:
            drop_inputs(model.graph, {weight.name})
    # Innermost graphs first: rebuilding a graph copies its nodes, subgraph attributes included.
    for edit in sorted(edits.values(), key=lambda e: -e.path.count("/")):
        edit.apply()


def drop_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove these initializers, in place and in order, and the graph inputs of the same names."""
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name in names:
            del graph.initializer[i]
    drop_inputs(graph, names)


def drop_inputs(graph: onnx.GraphProto, names: set[str]) -> None:
    """Remove these graph inputs: old exporters list every initializer as an input too, and one left
    behind by its initializer becomes an input the model requires (or, rewritten, a second producer)."""
    kept = [i for i in graph.input if i.name not in names]
    if len(kept) < len(graph.input):
        del graph.input[:]
        graph.input.extend(kept)


def set_nodes(graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
    """Make `nodes` (which may be the graph's own) the graph's node list, in that order."""
    copies = [onnx.NodeProto() for _ in nodes]
    for copy, node in zip(copies, nodes):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


@dataclass
class After:
    """Nodes to add right after a tensor is made. With `rename`, the producer writes that instead and the
    nodes remake the tensor from it (an Add after a layer, noise in a probe); without, they only read it
    (checks and reductions beside the model)."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    rename: str | None = None


Additions = dict[str, After]  # tensor -> what to add after it


def add_after(graph: onnx.GraphProto, additions: Additions) -> None:
    """Add the nodes of each tensor's `After`, in one rebuild of the node list.

    Renamed tensors get their nodes spliced in right after the producer. Readers go after every node,
    latest producer first: onnxruntime's default order visits the graph's dead ends from the last node
    backwards, each after what it needs, so in that order each check runs as soon as its tensor exists,
    and the tensor can be freed as before. Placed right after their producers, the checks ran after the
    whole model instead, and held every activation until then: 2.1 GB instead of 0.7 GB for ResNet-50 at
    batch 4 (pinned by tests/test_graphs.py).
    """
    nodes, readers = [], []
    for node in graph.node:
        nodes.append(node)
        if node.output and (tensor := node.output[0]) in additions:
            after = additions[tensor]
            if after.rename is None:
                readers.append(after.nodes)
            else:
                node.output[0] = after.rename
                nodes += after.nodes
    produced = {node.output[0] for node in graph.node if node.output}
    first = [after.nodes for tensor, after in additions.items() if after.rename is None and tensor not in produced]
    for extra in [*reversed(readers), *first]:
        nodes += extra
    set_nodes(graph, nodes)


def readers_of(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each tensor name of the graph, in graph order."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def use_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """How many node inputs (and graph outputs) read each tensor name of the graph."""
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    for output in graph.output:
        uses[output.name] = uses.get(output.name, 0) + 1
    return uses
