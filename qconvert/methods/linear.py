"""Linear quantization r = S(q − Z) of weights: int8/int4 initializers decoded by DequantizeLinear."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import onnx

from qconvert import qdq
from qconvert.encode import PACKED_MIN_OPSET, EncodedWeight, IndexStorage, encode_palettes, index_bytes
from qconvert.methods.base import Context, Need, weight_report
from qconvert.plan import Granularity, LayerSetting
from qconvert.quant.kmeans import Palette
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight

PER_AXIS_OPSET, TYPED_SCALE_OPSET, INT4_OPSET = 13, 19, 21


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
        always per channel."""
        axis = weight.channel_axis
        if setting.granularity is not Granularity.PER_TENSOR:
            return [axis], None if axis is not None else "per-tensor: its consumers disagree on the channel axis"
        if weight.depthwise and axis is not None:
            return [axis], "per-channel: depthwise kernels lose badly under one scale per tensor"
        return [None], None

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        """Per-axis scales need opset 13, scales of another type than float32 19; int4 wants 21, and below it
        is stored bit-packed (opset 10) and unpacked in the graph."""
        required = max(
            PACKED_MIN_OPSET,
            PER_AXIS_OPSET if axis is not None else 10,
            TYPED_SCALE_OPSET if weight.tensor.data_type != onnx.TensorProto.FLOAT else 10,
        )
        return Need(wanted=max(required, INT4_OPSET if setting.bits == 4 else 10), required=required)

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
        item = qdq.quantize_weight(
            weight,
            array,
            bits=setting.bits,
            symmetric=setting.symmetric,
            axis=axis,
            importance=importance,
            keep=importance is None,
        )
        return dataclasses.replace(item, packed=setting.bits == 4 and context.opset < INT4_OPSET)

    def choose(
        self,
        weight: Weight,
        tried: dict[int | None, qdq.LinearWeight],  # type: ignore[override]
        setting: LayerSetting,
    ) -> tuple[int | None, str | None]:
        return next(iter(tried)), None

    def storage(self, item: qdq.LinearWeight) -> str:  # type: ignore[override]
        return IndexStorage.PACKED.value if item.packed else np.dtype(item.storage).name

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        """Integers and zero points at `bits` each, a float32 scale per channel (packed: the integers in
        whole groups of 8, and the grid's levels instead of zero points)."""
        if storage == IndexStorage.PACKED.value:
            return index_bytes(elements, IndexStorage.PACKED, bits) + channels * 4 + (1 << bits) * itemsize
        return ((elements + channels) * bits + 7) // 8 + channels * 4

    def encode(self, model: onnx.ModelProto, items: list[qdq.LinearWeight]) -> None:  # type: ignore[override]
        """DequantizeLinear, or for packed int4 the palette that holds the same grid (`_as_palette`)."""
        qdq.insert_weight_dq(model, [item for item in items if not item.packed])
        encode_palettes(model, [_as_palette(item) for item in items if item.packed])

    def report(
        self,
        weight: Weight,
        array: np.ndarray,
        item: qdq.LinearWeight,  # type: ignore[override]
        note: str | None,
    ) -> WeightReport:
        channels = item.grid.scale.size
        return weight_report(
            weight,
            array,
            item,
            groups=channels,
            stored_bytes=self.data_bytes(weight.elements, channels, array.itemsize, item.bits, self.storage(item)),
            snr_db=snr_db(array, item.dequantized()),
            note=note,
        )

    def histogram(self, name: str, array: np.ndarray, item: qdq.LinearWeight) -> Histogram:  # type: ignore[override]
        return Histogram.of(name, array, self.levels(item), rows=item.grid.scale.size)

    def levels(self, item: qdq.LinearWeight) -> np.ndarray:
        """Per channel (one row per tensor): the values its grid holds, ascending."""
        grid = item.grid
        steps = np.arange(grid.qmin, grid.qmax + 1)[None, :] - grid.zero_point[:, None].astype(np.int64)
        return steps * grid.scale[:, None].astype(np.float64)

    def on_values(self, item: qdq.LinearWeight, array: np.ndarray) -> qdq.LinearWeight:
        """The item holding `array`, whose values lie on its grid."""
        return dataclasses.replace(item, integers=qdq.on_grid(array, item.grid, item.axis))

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> qdq.LinearWeight:
        item = qdq.quantize_weight(weight, weight.array(), bits=bits, symmetric=True, axis=axis)
        return dataclasses.replace(item, packed=bits == 4 and opset < INT4_OPSET)


def _as_palette(item: qdq.LinearWeight) -> EncodedWeight:
    """The grid as a palette of its 2**bits levels, indices q − qmin: symmetric, one codebook of the integers
    times a scale per channel (what DequantizeLinear computes); with zero points, a codebook per channel."""
    grid, dtype = item.grid, onnx.helper.tensor_dtype_to_np_dtype(item.weight.tensor.data_type)
    steps = np.arange(grid.qmin, grid.qmax + 1)
    indices = (to_rows(item.q, item.axis).astype(np.int64) - grid.qmin).astype(np.uint8)
    if not grid.zero_point.any():
        palette = Palette(steps[None, :].astype(dtype), indices, grid.scale.astype(np.float32))
    else:
        levels = (steps[None, :] - grid.zero_point[:, None]).astype(np.float32) * grid.scale[:, None]
        palette = Palette(levels.astype(dtype), indices)
    return EncodedWeight(item.weight, palette, item.axis, item.bits, IndexStorage.PACKED)
