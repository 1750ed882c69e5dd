"""Float: the weight stays as it is. The third way to store a weight, for plans that choose per weight
(`qconvert auto`) and for the size model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx

from qconvert.methods.base import Context, Need, weight_report
from qconvert.plan import LayerSetting
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight


@dataclass(frozen=True)
class FloatWeight:
    weight: Weight
    array: np.ndarray
    axis: int | None = None
    bits: int = 0  # its own width, as stored

    def dequantized(self) -> np.ndarray:
        return self.array


class Float:
    name: ClassVar[str] = "float"
    runtime_note: ClassVar[str | None] = None

    def unsupported(self, weight: Weight) -> str | None:
        return None

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        return [None], None

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        return Need(wanted=1, required=1)

    def opset_reason(self, settings: list[LayerSetting], before: int) -> str | None:
        return None

    def quantize(
        self,
        weight: Weight,
        array: np.ndarray,
        setting: LayerSetting,
        axis: int | None,
        importance: np.ndarray | None,
        context: Context,
    ) -> FloatWeight:
        return FloatWeight(weight, array, None, 8 * array.itemsize)

    def choose(
        self,
        weight: Weight,
        tried: dict[int | None, FloatWeight],  # type: ignore[override]
        setting: LayerSetting,
    ) -> tuple[int | None, str | None]:
        return None, None

    def storage(self, item: FloatWeight) -> str:  # type: ignore[override]
        return item.array.dtype.name

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        return elements * itemsize

    def encode(self, model: onnx.ModelProto, items: list[FloatWeight]) -> None:  # type: ignore[override]
        """Nothing to do: the weight is already in the graph."""

    def report(
        self,
        weight: Weight,
        array: np.ndarray,
        item: FloatWeight,  # type: ignore[override]
        note: str | None,
    ) -> WeightReport:
        return weight_report(weight, array, item, groups=1, stored_bytes=array.nbytes, snr_db=None, note=note)

    def histogram(self, name: str, array: np.ndarray, item: FloatWeight) -> Histogram:  # type: ignore[override]
        return Histogram.of(name, array, np.unique(array)[:256])

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> FloatWeight:
        return FloatWeight(weight, weight.array())
