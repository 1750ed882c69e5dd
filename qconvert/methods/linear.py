"""Linear quantization r = S(q − Z) of weights: int8/int4 initializers decoded by DequantizeLinear."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx

from qconvert import qdq
from qconvert.encode import PACKED_MIN_OPSET, IndexStorage, encode_palettes, index_bytes
from qconvert.methods.base import DB_PER_BIT, Context, Need, gain_text, join, weight_report
from qconvert.plan import Granularity, LayerSetting
from qconvert.quant.layout import from_rows, snr_db
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight

PER_AXIS_OPSET, TYPED_SCALE_OPSET, INT4_OPSET, BLOCK_OPSET = 13, 19, 21, 21
BLOCKED = "blocked"  # the report's granularity of a weight with a scale per block
BLOCK_SIZE = 32  # blocks weighed against per-channel scales for int4 weights when --block-size is not given


class Linear:
    """Min/max grids per tensor or per output channel (or clipped ones that minimise the layer's output
    error), signed with Z = 0 (symmetric) or unsigned with a zero point."""

    name: ClassVar[str] = "linear"
    runtime_note: ClassVar[str | None] = (
        "weights-only: integer weights stay small in memory, but onnxruntime "
        "dequantizes them at every run (slower than float)"
    )

    def unsupported(self, weight: Weight) -> str | None:
        if weight.tensor.data_type == onnx.TensorProto.DOUBLE:
            return "float64: DequantizeLinear cannot output float64"
        return None

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        """Per channel (a scale costs 4 bytes: it always pays) unless asked per tensor; depthwise kernels
        always per channel. Blocks (a scale per B weights along the input axis, given as that axis) instead
        where --block-size asks, and for int4 beside per channel, to be weighed per stored bit (`choose`)."""
        axis = weight.channel_axis
        if setting.granularity is Granularity.PER_TENSOR:
            if weight.depthwise and axis is not None:
                return [axis], "per-channel: depthwise kernels lose badly under one scale per tensor"
            return [None], None
        if axis is None:
            return [None], "per-tensor: its consumers disagree on the channel axis"
        blocks = _blocks(weight, setting.bits, context.block_size)
        if context.block_size:
            if not blocks:
                return [axis], f"per-channel: blocks of {context.block_size} do not fit its input axis"
            return [_input_axis(weight)], None
        return ([axis, _input_axis(weight)] if blocks else [axis]), None

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        """Per-axis scales need opset 13, scales of another type than float32 19; int4 wants 21, and below it
        is stored bit-packed (opset 10) and unpacked in the graph; blocks want 21, and below it fall back to
        per channel."""
        required = max(
            PACKED_MIN_OPSET,
            PER_AXIS_OPSET if axis is not None else 10,
            TYPED_SCALE_OPSET if weight.tensor.data_type != onnx.TensorProto.FLOAT else 10,
        )
        blocked = axis is not None and axis != weight.channel_axis
        wanted = INT4_OPSET if setting.bits == 4 else BLOCK_OPSET if blocked else 10
        return Need(wanted=max(required, wanted), required=required)

    def opset_reason(self, settings: list[LayerSetting], before: int) -> str | None:
        return f"{'int4' if any(s.bits == 4 for s in settings) else 'per-channel'} DequantizeLinear"

    def quantize(
        self,
        weight: Weight,
        array: np.ndarray,
        setting: LayerSetting,
        axis: int | None,
        importance: np.ndarray | None,
        context: Context,
    ) -> qdq.LinearWeight:
        """With `importance`, the clipped ranges; then only the grid is kept (a result that may be dropped):
        its integers are quantized again from the weight when asked."""
        block = _blocks(weight, setting.bits, context.block_size) if axis not in (None, weight.channel_axis) else 0
        if block and context.opset < BLOCK_OPSET:  # the opset could not be raised: per channel instead
            axis, block = weight.channel_axis, 0
        item = qdq.quantize_weight(
            weight,
            array,
            bits=setting.bits,
            symmetric=setting.symmetric,
            axis=axis,
            importance=importance,
            keep=importance is None,
            block=block,
        )
        return dataclasses.replace(item, packed=setting.bits == 4 and context.opset < INT4_OPSET)

    def choose(
        self,
        weight: Weight,
        tried: dict[int | None, qdq.LinearWeight],  # type: ignore[override]
        setting: LayerSetting,
    ) -> tuple[int | None, str | None]:
        """Blocks where they pay: they must gain more than the ~6 dB per bit that their scales' bits would buy
        as weight bits."""
        axes = list(tried)
        if len(axes) == 1 or not tried[axes[1]].block:
            return axes[0], None
        array = weight.array()
        channel, blocked = (tried[a] for a in axes)
        gains = [snr_db(array, item.dequantized()) for item in (channel, blocked)]
        overhead = (blocked.grid.scale.size - channel.grid.scale.size) * (32 + setting.bits) / weight.elements
        if gains[1] is None or (gains[0] is not None and gains[1] - gains[0] > DB_PER_BIT * overhead):
            return axes[1], None
        note = f"blocks of {blocked.block} gained {gain_text(gains)} for {overhead:.2f} more bits per weight"
        return axes[0], f"per-channel: {note}"

    def storage(self, item: qdq.LinearWeight) -> str:  # type: ignore[override]
        return IndexStorage.PACKED.value if item.packed else np.dtype(item.storage).name

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        """Integers and zero points at `bits` each, a float32 scale per channel (packed: the integers in
        whole groups of 8, and the grid's levels instead of zero points)."""
        if storage == IndexStorage.PACKED.value:
            return index_bytes(elements, IndexStorage.PACKED, bits) + channels * 4 + (1 << bits) * itemsize
        return ((elements + channels) * bits + 7) // 8 + channels * 4

    def encode(self, model: onnx.ModelProto, items: list[qdq.LinearWeight]) -> None:  # type: ignore[override]
        """DequantizeLinear, or for packed int4 the palette that holds the same grid (`qdq.as_palette`)."""
        qdq.insert_weight_dq(model, [item for item in items if not item.packed])
        encode_palettes(model, [qdq.as_palette(item) for item in items if item.packed])

    def report(
        self,
        weight: Weight,
        array: np.ndarray,
        item: qdq.LinearWeight,  # type: ignore[override]
        note: str | None,
    ) -> WeightReport:
        channels = item.grid.scale.size
        report = weight_report(
            weight,
            array,
            item,
            groups=channels,
            stored_bytes=self.data_bytes(weight.elements, channels, array.itemsize, item.bits, self.storage(item)),
            snr_db=snr_db(array, item.dequantized()),
            note=join(note, f"a scale per {item.block} weights along axis {item.axis}" if item.block else None),
        )
        return dataclasses.replace(report, granularity=BLOCKED) if item.block else report

    def histogram(self, name: str, array: np.ndarray, item: qdq.LinearWeight) -> Histogram:  # type: ignore[override]
        drawn = Histogram.of(name, array, self.levels(item), rows=item.grid.scale.size)
        if item.block:  # one grid per block: the widest block's levels
            return dataclasses.replace(drawn, levels_of=drawn.levels_of.replace("channel", "block"))
        return drawn

    def levels(self, item: qdq.LinearWeight) -> np.ndarray:
        """Per channel (one row per tensor): the values its grid holds, ascending."""
        grid = item.grid
        steps = np.arange(grid.qmin, grid.qmax + 1)[None, :] - grid.zero_point[:, None].astype(np.int64)
        return steps * grid.scale[:, None].astype(np.float64)

    def element_grids(self, item: qdq.LinearWeight) -> tuple[np.ndarray, np.ndarray, int] | None:
        """Blocks: each weight's grid, as its lowest value and step in the weight's layout, and the steps
        above the lowest (None: a grid per channel, which `levels` gives)."""
        if not item.block:
            return None
        grid, shape = item.grid, item.weight.shape
        rows = (grid.scale.size, item.block)
        step = np.broadcast_to(grid.scale.astype(np.float64)[:, None], rows)
        low = np.broadcast_to(((grid.qmin - grid.zero_point) * grid.scale.astype(np.float64))[:, None], rows)
        return (
            from_rows(low, shape, item.axis, item.block),
            from_rows(step, shape, item.axis, item.block),
            grid.qmax - grid.qmin,
        )

    def on_values(self, item: qdq.LinearWeight, array: np.ndarray) -> qdq.LinearWeight:
        """The item holding `array`, whose values lie on its grid."""
        return dataclasses.replace(item, integers=qdq.on_grid(array, item.grid, item.axis, item.block))

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> qdq.LinearWeight:
        item = qdq.quantize_weight(weight, weight.array(), bits=bits, symmetric=True, axis=axis)
        return dataclasses.replace(item, packed=bits == 4 and opset < INT4_OPSET)


def _input_axis(weight: Weight) -> int | None:
    """The axis a layer sums over, along which blocks run: the other of a convolution's or a 2-D weight's
    first two axes (None: another layout, or a depthwise kernel, which sums over one input channel)."""
    axis = weight.channel_axis
    return 1 - axis if axis in (0, 1) and len(weight.shape) >= 2 and not weight.depthwise else None


def _blocks(weight: Weight, bits: int, forced: int | None) -> int:
    """The block size to try on the weight (0: none): the one asked for (0: none), else BLOCK_SIZE for int4,
    where its input axis holds at least two whole blocks."""
    size, axis = (BLOCK_SIZE if bits == 4 else 0) if forced is None else forced, _input_axis(weight)
    return (
        size if size and axis is not None and weight.shape[axis] % size == 0 and weight.shape[axis] >= 2 * size else 0
    )
