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
import onnxruntime as ort
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

    # the section's nodes, after any Constant nodes they read; the initializers they read (big ones as holes)
    graph: onnx.GraphProto
    fresh: NameSource
    opset: int
    # tensors first available here, whose readers belong here (the first section also has the inputs and initializers)
    made: set[str]
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
        self.constants = {
            i for i, node in enumerate(nodes) if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        }
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
        step = self._section(end, build, last)
        carried = _Carried(len(self.carried)) if step.later else None
        for feed in self.carried:
            values = {}
            if step.session is not None:
                inputs = Feeds([{name: feed[name] for name in step.inputs}], 1, "")
                values = dict(
                    zip(step.outputs, next(run_batches(step.session, inputs, self.what, output_names=step.outputs)))
                )
            # copies: an output array held on would keep the session's whole arena alive after the session
            yield {t: np.array(values[t]) if t in values else feed[t] for t in step.wanted}
            if carried is not None:
                carried.append(
                    {**{t: feed[t] for t in step.kept}, **{t: values[c] for t, c in zip(step.handed, step.copies)}}
                )
        self.start, self.carried = (end, carried) if carried is not None else (0, _Carried.of(self.feeds))

    def _section(self, end: int, build: Callable[[Section], None], last: bool) -> _Step:
        """The session of nodes [start, end) with `build`'s checks, and what goes in and out of it per sample."""
        probe = without_weights(self.model)
        graph = probe.graph
        nodes = self._select_nodes(graph, end)
        made = {out for node in graph.node for out in node.output}
        if self.start == 0:
            made |= {i.name for i in graph.input} | {t.name for t in graph.initializer}
        _keep_initializers(graph, self.outputs)  # a pass's `build` sees the section's own
        spec = Section(graph, NameSource(probe), default_opset(self.model), made, end == len(self.model.graph.node))
        build(spec)
        later = set() if last or spec.complete else set().union(*self.reads[end:], self.outputs)
        handed, copies = _hand_on(spec, nodes, later)
        add_after(graph, spec.after)
        produced = {out for node in graph.node for out in node.output}
        read = _keep_initializers(graph, set(spec.wanted))
        # handed on to here: no need to run
        given = [t for t in spec.wanted if t not in produced and t in self.carried.dtypes]
        outputs = [t for t in spec.wanted if t not in given] + copies
        inputs = self._declare_inputs(graph, read - {t.name for t in graph.initializer}, produced)
        graph.output.extend(helper.make_empty_tensor_value_info(t) for t in outputs)
        session = (
            model_session(self.model, self.what, skeleton=probe, replaced=spec.replaced, probe=True)
            if outputs
            else None
        )
        kept = [t for t in self.carried.dtypes if t in later and t not in produced]
        return _Step(session, inputs, outputs, spec.wanted, handed, copies, kept, bool(later))

    def _select_nodes(self, graph: onnx.GraphProto, end: int) -> list[onnx.NodeProto]:
        """The graph cut to nodes [start, end), after the Constant nodes they read (weights run where they
        are read, never handed on); returns the section's own nodes."""
        needed = set().union(*self.reads[self.start : end])
        constants = [
            node for i, node in enumerate(graph.node[:end]) if i in self.constants and node.output[0] in needed
        ]
        section = [node for i, node in enumerate(graph.node[self.start : end], self.start) if i not in self.constants]
        set_nodes(graph, constants + section)
        return section

    def _declare_inputs(self, graph: onnx.GraphProto, read: set[str], produced: set[str]) -> list[str]:
        """The section's inputs among the tensors it `read`s but holds no initializer for: the model's (not
        initializers listed as inputs, as IR 3 has them) for the first, else those handed on, by type."""
        if self.start == 0:
            declared = [i for i in graph.input if i.name in read]
        else:
            declared = [
                helper.make_tensor_value_info(t, helper.np_dtype_to_tensor_dtype(self.carried.dtypes[t]), None)
                for t in sorted(read - produced)
            ]
        del graph.input[:], graph.output[:]
        graph.input.extend(declared)
        return [i.name for i in declared]


@dataclass
class _Step:
    """One section's session and what flows through it per sample."""

    session: ort.InferenceSession | None  # None: nothing to run, all it wants was handed on
    inputs: list[str]
    outputs: list[str]  # what the session returns: the wanted tensors it makes, and copies of those handed on
    wanted: list[str]
    handed: list[str]  # tensors this section makes that later ones read ...
    copies: list[str]  # ... and the outputs that copy them
    kept: list[str]  # tensors handed to this section that later ones read too
    later: bool  # a section follows


def _hand_on(spec: Section, nodes: list[onnx.NodeProto], later: set[str]) -> tuple[list[str], list[str]]:
    """The tensors the section's nodes make that `later` sections read, and the names of the copies that
    hand them on (Identity readers beside the model, like the checks: see add_after)."""
    handed = [t for t in dict.fromkeys(out for node in nodes for out in node.output) if t in later]
    copies = [spec.fresh(f"{t}_qc_handed") for t in handed]
    for t, copy in zip(handed, copies):
        spec.after.setdefault(t, After()).nodes.append(helper.make_node("Identity", [t], [copy]))
    return handed, copies


def _keep_initializers(graph: onnx.GraphProto, also: set[str]) -> set[str]:
    """Drop the initializers that no node reads (nor `also` names); returns the tensors the nodes read."""
    read = set().union(*(_reads(node) for node in graph.node))
    kept = [t for t in graph.initializer if t.name in read | also]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return read


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
                if self.count * sum(a.nbytes for a in values.values()) > CARRY_BYTES and all(
                    a.dtype != object for a in values.values()
                ):
                    self.folder = tempfile.TemporaryDirectory(prefix="qconvert-")
            if self.folder is None:
                self.items.append({name: np.array(array) for name, array in values.items()})
                return
            path = Path(self.folder.name) / str(len(self.items))
            with path.open("wb") as f:
                for array in values.values():
                    np.ascontiguousarray(array).tofile(f)
        except OSError as e:
            raise OutputError(
                f"cannot keep activations between calibration passes in the temp folder ({tempfile.gettempdir()}): "
                f"{first_line(e)}"
            ) from e
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
            names |= (
                inner
                - {out for n in graph.node for out in n.output}
                - {t.name for t in graph.initializer}
                - {i.name for i in graph.input}
            )
    return names
