"""Running a model in sections, so that each onnxruntime session holds only a share of its weights.

Calibration runs the model many times over: the statistics pass, the layer checks, the whole-model
variants. A session of the whole model holds every weight, about 1.45 times over once optimized
(ResNet-50: 150 MB for a 102 MB file). A pass instead runs the graph's nodes [start, end) in one
session with checks beside them (`Section`), and hands on, per sample, the tensors that later nodes or
the model's outputs read; the next section starts there, in a session of its own.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from qconvert import io
from qconvert.errors import OutputError, first_line
from qconvert.opset import default_opset, without_weights
from qconvert.rewrite import Additions, After, NameSource, add_after, set_nodes
from qconvert.runtime import Feeds, model_session, run_batches
from qconvert.select import constant_value

SECTIONS = 4  # a whole-model pass runs in about this many sessions ...
MIN_SECTION_BYTES = 16 << 20  # ... each of at least this many bytes of weights (small models run whole)
CARRY_BYTES = 8 << 20  # tensors handed between sections for all samples, kept in memory; beyond that, on disk


@dataclass
class Section:
    """One section's graph, for a pass to add its checks to (`Sections.run`)."""

    graph: onnx.GraphProto  # the section's nodes, after any Constant nodes they read; the initializers they read (big ones as holes)
    fresh: NameSource
    opset: int
    made: set[str]  # tensors first available here, whose readers belong here (the first section also has the inputs and initializers)
    complete: bool  # the model's outputs are available
    after: Additions = field(default_factory=dict)  # checks to add (`add_after`)
    wanted: list[str] = field(default_factory=list)  # what each sample's run returns
    replaced: dict[str, np.ndarray] = field(default_factory=dict)  # initializers given as arrays


class Sections:
    """Passes over `feeds` in the model's order. Each `run` continues where the previous one stopped,
    or from the model's inputs after a run to the end (or a `last` one)."""

    def __init__(self, model: onnx.ModelProto, feeds: Feeds, what: str) -> None:
        self.model, self.feeds, self.what = model, feeds, what
        nodes = model.graph.node
        self.position = {out: i for i, node in enumerate(nodes) for out in node.output}
        self.reads = [_reads(node) for node in nodes]
        self.constants = {i for i, node in enumerate(nodes) if node.op_type == "Constant" and node.domain in ("", "ai.onnx")}
        self.outputs = {o.name for o in model.graph.output}
        sizes = {t.name: io.data_bytes(t) for t in model.graph.initializer}
        sizes |= {node.output[0]: io.data_bytes(value) for node in nodes if (value := constant_value(node)) is not None}
        seen: set[str] = set()
        self.weight_bytes = []  # per node: the weights it is the first to read (a Constant node's, its readers')
        for names in self.reads:
            new = names & sizes.keys() - seen
            seen |= new
            self.weight_bytes.append(sum(sizes[n] for n in new))
        self.budget = max(MIN_SECTION_BYTES, sum(self.weight_bytes) // SECTIONS)
        self.start = 0
        self.carried = _Carried.of(feeds)

    def ends(self) -> list[int]:
        """Where the sections of a whole-model pass end: each holds weights up to the budget, or one node."""
        ends, size = [], 0
        for i, weight in enumerate(self.weight_bytes):
            if size and size + weight > self.budget:
                ends.append(i)
                size = 0
            size += weight
        return [*ends, len(self.weight_bytes)]

    def passes(self, build: Callable[[Section], None]) -> Iterator[dict[str, np.ndarray]]:
        """A whole-model pass: what each section's `build` wanted, per sample, section after section."""
        assert self.start == 0, "a pass was left unfinished"
        for end in self.ends():
            yield from self.run(end, build)

    def run(self, end: int, build: Callable[[Section], None], *, last: bool = False) -> Iterator[dict[str, np.ndarray]]:
        """Run nodes [start, end) with what `build` adds, on every sample in turn: yields the outputs it
        wanted. `last`: no run follows from here, so nothing is handed on. Iterate to the end."""
        nodes = self.model.graph.node
        complete = end == len(nodes)
        probe = without_weights(self.model)
        graph = probe.graph
        needed = set().union(*self.reads[self.start : end])  # Constant nodes (weights) run where read, never handed on
        constants = [node for i, node in enumerate(graph.node[:end]) if i in self.constants and node.output[0] in needed]
        section = [node for i, node in enumerate(graph.node[self.start : end], self.start) if i not in self.constants]
        set_nodes(graph, constants + section)
        made = {out for node in graph.node for out in node.output}
        if self.start == 0:
            made |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
        read = set().union(*(_reads(node) for node in graph.node)) | self.outputs
        initializers = [t for t in graph.initializer if t.name in read]  # a pass's `build` sees the section's own
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        spec = Section(graph, NameSource(probe), default_opset(self.model), made, complete)
        build(spec)
        later = set() if last or complete else set().union(*self.reads[end:], self.outputs)
        handed = [t for t in dict.fromkeys(out for node in section for out in node.output) if t in later]
        copies = [spec.fresh(f"{t}_qc_handed") for t in handed]  # read beside the model like the checks: see add_after
        for t, copy in zip(handed, copies):
            spec.after.setdefault(t, After()).nodes.append(helper.make_node("Identity", [t], [copy]))
        add_after(graph, spec.after)
        produced = {out for node in graph.node for out in node.output}
        read = set().union(*(_reads(node) for node in graph.node))
        initializers = [t for t in graph.initializer if t.name in read | set(spec.wanted)]
        del graph.initializer[:]
        graph.initializer.extend(initializers)
        available = set(self.carried.dtypes)
        given = [t for t in spec.wanted if t not in produced and t in available]  # handed on to here: no need to run
        outputs = [t for t in spec.wanted if t not in given] + copies
        constant = {t.name for t in initializers}
        if self.start == 0:  # the model's inputs (not initializers listed as inputs, as IR 3 has them)
            declared = [i for i in graph.input if i.name in read and i.name not in constant]
        else:  # the tensors handed on, by type
            declared = [helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self.carried.dtypes[t]), None)
                        for t in sorted(read - produced - constant)]
        del graph.input[:], graph.output[:]
        graph.input.extend(declared)
        graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
        sess = model_session(self.model, self.what, skeleton=probe, replaced=spec.replaced, probe=True) if outputs else None
        wanted = spec.wanted
        del probe, graph, spec
        kept = [t for t in self.carried.dtypes if t in later and t not in produced]
        carried = _Carried(len(self.carried)) if later else None
        for feed in self.carried:
            values = {}
            if sess is not None:
                inputs = Feeds([{i.name: feed[i.name] for i in declared}], 1, "")
                values = dict(zip(outputs, next(run_batches(sess, inputs, self.what, output_names=outputs))))
            # copies: an output array held on would keep the session's whole arena alive after the session
            yield {t: np.array(values[t]) if t in values else feed[t] for t in wanted}
            if carried is not None:
                carried.append({**{t: feed[t] for t in kept}, **{t: values[copy] for t, copy in zip(handed, copies)}})
        self.start, self.carried = (end, carried) if carried is not None else (0, _Carried.of(self.feeds))


class _Carried:
    """Per sample, the tensors handed from one section to the next: in memory up to CARRY_BYTES for all
    samples, past that in a temp folder (raw bytes, read back one sample at a time into one array each)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.items: list[dict[str, np.ndarray] | tuple[Path, list[tuple[str, np.dtype, tuple[int, ...]]]]] = []
        self.folder: tempfile.TemporaryDirectory[str] | None = None
        self.dtypes: dict[str, np.dtype] = {}

    @classmethod
    def of(cls, feeds: Feeds) -> _Carried:
        carried = cls(len(feeds.batches))
        carried.items = list(feeds.batches)
        carried.dtypes = {name: array.dtype for name, array in feeds.batches[0].items()} if feeds.batches else {}
        return carried

    def __len__(self) -> int:
        return self.count

    def append(self, values: dict[str, np.ndarray]) -> None:
        """Keep one sample's tensors (arrays that onnxruntime returned: kept as copies, see `Sections.run`)."""
        try:
            if not self.items:
                self.dtypes = {name: array.dtype for name, array in values.items()}
                if self.count * sum(a.nbytes for a in values.values()) > CARRY_BYTES and all(a.dtype != object for a in values.values()):
                    self.folder = tempfile.TemporaryDirectory(prefix="qconvert-")
            if self.folder is None:
                self.items.append({name: np.array(array) for name, array in values.items()})
                return
            path = Path(self.folder.name) / str(len(self.items))
            with path.open("wb") as f:
                for array in values.values():
                    np.ascontiguousarray(array).tofile(f)
        except OSError as e:
            raise OutputError(f"cannot keep activations between calibration passes in the temp folder ({tempfile.gettempdir()}): "
                              f"{first_line(e)}") from e
        self.items.append((path, [(name, array.dtype, array.shape) for name, array in values.items()]))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        for item in self.items:
            if isinstance(item, dict):
                yield item
                continue
            path, layout = item
            with path.open("rb") as f:
                yield {name: np.fromfile(f, dtype, int(np.prod(shape))).reshape(shape) for name, dtype, shape in layout}


def _reads(node: onnx.NodeProto) -> set[str]:
    """Tensors a node reads, with those its subgraphs read from the outer scope."""
    names = {n for n in node.input if n}
    for attribute in node.attribute:
        for graph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            inner = set().union(*(_reads(n) for n in graph.node)) if graph.node else set()
            names |= inner - {out for n in graph.node for out in n.output} - {t.name for t in graph.initializer} - {i.name for i in graph.input}
    return names
