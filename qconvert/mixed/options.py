"""The ways to store one weight that `qconvert auto` weighs: each with its size in the file (the methods'
size model) and what its channels decode to (codebooks fitted on samples, so that all options cost seconds)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from qconvert.methods import METHODS
from qconvert.methods.base import file_bytes, opset_for
from qconvert.methods.kmeans import overhead_bits
from qconvert.opset import Reach
from qconvert.plan import AutoPlan, Granularity, LayerSetting
from qconvert.quant.kmeans import nearest, palettize
from qconvert.quant.layout import from_rows, to_rows
from qconvert.quant.linear import dequantize, grid_for, quantize
from qconvert.select import Weight

FIT_VALUES = 1 << 14  # per tensor: values the k-means codebooks of the estimates are fitted on


ROW_VALUES = 4096  # per channel: values per row


EVAL_CHANNELS = 32  # output channels of a weight the options are measured on


@dataclass(frozen=True)
class Option:
    """One way to store one weight: what the plan says, its size, and its predicted output noise."""

    method: str  # kmeans | linear | float
    bits: int
    granularity: Granularity
    size: int  # bytes in the file
    noise: float  # predicted share of the output's noise-to-signal ratio

    @property
    def label(self) -> str:
        if self.method == "float":
            return "float"
        short = "pc" if self.granularity is Granularity.PER_CHANNEL else "pt"
        return f"{self.method} {self.bits}-bit {short}"


def options_for(
    weight: Weight,
    array: np.ndarray,
    plan: AutoPlan,
    rng: np.random.Generator,
    channels: np.ndarray | None,
    reach: Reach,
) -> list[tuple[Option, np.ndarray]]:
    """Every quantized way to store the weight that the model's opset allows, with its size, and what
    the output `channels` (None: all) decode to. K-means codebooks are fitted on a sample of the
    tensor or of each channel."""
    axis = weight.channel_axis
    part = array if channels is None else np.take(array, channels, axis)
    found = []
    for granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL) if "kmeans" in plan.methods else ():
        if granularity is Granularity.PER_CHANNEL and axis is None:
            continue
        row_axis = axis if granularity is Granularity.PER_CHANNEL else None
        fitted = to_rows(array if row_axis is None else part, row_axis)  # per tensor: a sample of all of it
        fit = sample_positions(fitted.shape[1], FIT_VALUES if row_axis is None else ROW_VALUES, rng)
        rows = to_rows(part, row_axis)
        for bits in plan.bits:
            if row_axis is not None and overhead_bits(weight, bits, row_axis) > plan.max_codebook_overhead:
                continue
            setting = LayerSetting("kmeans", bits, granularity, False)
            opset = opset_for(reach, METHODS["kmeans"].need(weight, setting, row_axis))
            assert opset is not None  # indices can always be stored as uint8
            size = file_bytes(METHODS["kmeans"], weight, bits, row_axis, opset)
            codebook = estimate_codebook(fitted[:, fit], bits)
            approx = np.take_along_axis(codebook, nearest(rows, codebook).astype(np.intp), axis=1)
            found.append((Option("kmeans", bits, granularity, size, 0.0), from_rows(approx, part.shape, row_axis)))
    if "linear" in plan.methods and weight.tensor.data_type != onnx.TensorProto.DOUBLE:
        rows = to_rows(part, axis)
        granularity = Granularity.PER_CHANNEL if axis is not None else Granularity.PER_TENSOR
        for bits in (4, 8):
            opset = opset_for(
                reach, METHODS["linear"].need(weight, LayerSetting("linear", bits, granularity, False), axis)
            )
            if opset is None:
                continue
            grid = grid_for(rows, bits=bits, symmetric=True)
            approx = from_rows(dequantize(quantize(rows, grid), grid), part.shape, axis)
            size = file_bytes(METHODS["linear"], weight, bits, axis, opset)
            found.append((Option("linear", bits, granularity, size, 0.0), approx))
    return found


def sampled_kmeans(array: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """The array palettized with one codebook fitted on a sample of it."""
    rows = to_rows(array, None)
    codebook = estimate_codebook(rows[:, sample_positions(rows.shape[1], FIT_VALUES, rng)], bits)
    return np.take_along_axis(codebook, nearest(rows, codebook).astype(np.intp), axis=1).reshape(array.shape)


def estimate_codebook(rows: np.ndarray, bits: int) -> np.ndarray:
    """Codebooks for an estimate: a coarse DP (none past 6 bits) seeds Lloyd; about as good as the real
    conversion's up to 6 bits, a little worse past it (the prediction errs on the safe side)."""
    return palettize(rows, bits=bits, max_points=min(rows.shape[1], (4 << bits) if bits <= 6 else 1 << bits)).codebook


def sample_positions(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted column positions to fit codebooks on (all of them when there are few)."""
    return np.arange(n) if n <= count else np.sort(rng.choice(n, count, replace=False))
