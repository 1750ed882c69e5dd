"""The method interface: what k-means, linear and float (and any new storage form) each implement once.

A method turns one weight array into a quantized form (pure numpy), decodes it back, says how many
bytes it takes in the file (data, plus the decode nodes it adds), which opset its encoding needs, and
writes that encoding into the graph. `driver.quantize_model` runs any of them, per weight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.opset import Reach
from qconvert.plan import Granularity, LayerSetting
from qconvert.report import Histogram, WeightReport
from qconvert.select import MAIN_GRAPH, Weight

Progress = Callable[[str], None]
DB_PER_BIT = 6.02  # SNR that one more bit per weight buys: what finer codebooks or scales must beat per bit they cost


class Quantized(Protocol):
    """One weight in a method's stored form."""

    @property
    def weight(self) -> Weight: ...

    @property
    def axis(self) -> int | None:
        """The channel axis of its codebooks or scales; None: one for the whole tensor."""

    @property
    def bits(self) -> int: ...

    def dequantized(self) -> np.ndarray: ...


@dataclass(frozen=True)
class Need:
    """The opset a weight's encoding wants (its tightest storage) and cannot do without."""

    wanted: int
    required: int


@dataclass
class Context:
    """What a method may use while quantizing one model: the plan's settings and a memo of results that
    conversions of the same model share (auto's trials)."""

    opset: int  # the model's opset once prepared: the storage it allows
    max_codebook_overhead: float = 1.0
    group_size: int | None = None  # k-means: one codebook per this many channels, forced
    block_size: int | None = None  # linear: a scale per this many weights along the input axis (None: weighed, 0: none)
    memo: dict[tuple[object, ...], object] | None = None


class Method(Protocol):
    """A way to store weights. Register a new one in `qconvert.methods.METHODS`."""

    name: ClassVar[str]
    runtime_note: ClassVar[str | None]  # how onnxruntime runs the result, for the report; None: as float

    def unsupported(self, weight: Weight) -> str | None:
        """Why this method cannot store the weight (None: it can)."""

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        """The channel axes to try (None: per tensor; several: `choose` picks), and why that differs from
        what was asked, if it does."""

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        """The opset the weight's encoding wants and requires."""

    def opset_reason(self, settings: list[LayerSetting], before: int) -> str | None:
        """What needs an opset above `before` among these weights, in a few words (None: nothing)."""

    def quantize(
        self,
        weight: Weight,
        array: np.ndarray,
        setting: LayerSetting,
        axis: int | None,
        importance: np.ndarray | None,
        context: Context,
    ) -> Quantized:
        """The weight's stored form; with `importance` (error weights broadcastable to the array), the one
        that minimises the weighted error. Deterministic."""

    def choose(
        self, weight: Weight, tried: dict[int | None, Quantized], setting: LayerSetting
    ) -> tuple[int | None, str | None]:
        """Of several axes tried, the one to keep, and why if it is not the last."""

    def storage(self, item: Quantized) -> str:
        """How the integers are stored (uint4, packed, int8 ...)."""

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        """Bytes of the stored data: values, codebooks or scales (not the decode nodes)."""

    def encode(self, model: onnx.ModelProto, items: list[Quantized]) -> None:
        """Replace each item's weight in the graph by its stored form and the nodes that decode it."""

    def report(self, weight: Weight, array: np.ndarray, item: Quantized, note: str | None) -> WeightReport:
        """The weight's line in the report."""

    def histogram(self, name: str, array: np.ndarray, item: Quantized) -> Histogram:
        """The weight's values and the levels they were mapped to (HTML report)."""

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> Quantized:
        """The weight's stored form at one value per channel: what `file_bytes` encodes to measure the
        decode nodes the encoding adds."""


def opset_for(reach: Reach, need: Need) -> int | None:
    """The opset a conversion will give this weight's encoding: what it wants where the model can get there,
    else what it requires (None: not even that)."""
    for target in (need.wanted, need.required):
        if reach.reachable(target):
            return max(reach.current, target)
    return None


def granularity_of(axis: int | None) -> str:
    return (Granularity.PER_TENSOR if axis is None else Granularity.PER_CHANNEL).value


def file_bytes(method: Method, weight: Weight, bits: int, axis: int | None, opset: int) -> int:
    """Bytes the weight takes in the file stored by `method`: its data, plus what its encoding adds (decode
    nodes, small constants, tensor headers: about 1 KB for packed indices, which decides on small
    models). That part is measured by encoding a stand-in with one value per channel, same name: the
    one size model of conversion reports, `qconvert inspect` and `qconvert auto`."""
    dtype = helper.tensor_dtype_to_np_dtype(weight.tensor.data_type)
    channels = weight.shape[axis] if axis is not None else 1
    shape = [channels if a == axis else 1 for a in range(len(weight.shape))]
    model = helper.make_model(helper.make_graph([], "g", [], []), opset_imports=[helper.make_opsetid("", opset)])
    empty = model.ByteSize()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(shape, dtype), weight.name))
    stand_in = Weight(weight.name, model.graph, MAIN_GRAPH, "initializer", model.graph.initializer[0])
    item = method.stand_in(stand_in, bits, axis, opset)
    storage = method.storage(item)
    method.encode(model, [item])
    return (
        model.ByteSize()
        - empty
        + method.data_bytes(weight.elements, channels, dtype.itemsize, bits, storage)
        - method.data_bytes(channels, channels, dtype.itemsize, bits, storage)
    )


def weight_report(
    weight: Weight,
    array: np.ndarray,
    item: Quantized,
    *,
    groups: int,
    stored_bytes: int,
    snr_db: float | None,
    note: str | None,
) -> WeightReport:
    """The fields every method reports alike."""
    return WeightReport(
        name=weight.name,
        source=weight.source,
        graph=weight.graph_path,
        consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape),
        elements=weight.elements,
        dtype=str(array.dtype),
        bits=item.bits,
        granularity=granularity_of(item.axis),
        channel_axis=item.axis,
        groups=groups,
        float_bytes=array.nbytes,
        stored_bytes=stored_bytes,
        snr_db=snr_db,
        note=join(note, readers_note(weight)),
    )


def gain_text(snrs: list[float | None]) -> str:
    """What a finer form gained over a coarser one, from their SNRs (None: exact), in a note's words."""
    return "nothing" if snrs[0] is None else f"{snrs[1] - snrs[0]:.1f} dB" if snrs[1] is not None else "exactness"


def readers_note(weight: Weight) -> str | None:
    if not weight.other_readers:
        return None
    return f"also read by {', '.join(sorted(set(weight.other_readers)))}, which sees the quantized values"


def join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None


__all__ = ["DB_PER_BIT", "Context", "Method", "Need", "Progress", "Quantized", "file_bytes", "granularity_of", "join"]
