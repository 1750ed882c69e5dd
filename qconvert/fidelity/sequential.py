"""Sequential error-compensating rounding towards the float model (GPTQ with float targets, as GPTAQ, Li et al.
2025).

GPTQ rounds each layer for the inputs x the float model gives it. In the quantized model a layer sees the error
of every layer before it, and at 3 bits that error is most of what reaches the output (PP-OCRv4 recognizer:
each layer 15-22 dB alone, the model 7.9 dB). Here the layers are rounded again in graph order, each on the
inputs x̂ that the model quantized so far gives it, towards what the float layer gives on the float inputs:
min ‖W x − Ŵ x̂‖². Its unconstrained minimum is W' = W + W (C − Ĥ)(Ĥ + λI)⁻¹, with C = Σ x x̂ᵀ and Ĥ = Σ x̂ x̂ᵀ
(the ridge pulls towards W, not towards 0); what is left is GPTQ of W' on Ĥ. The layer's bias takes the
mean output error that remains, W x̄ − Ŵ x̄̂ (except where the held-out samples refuse it: see
`Refiner.sequential_pays`). A layer with fewer input rows than ROWS_PER_COLUMN per column (after
a global pool: one row per sample) keeps W as its target: C − Ĥ would be fitted to the noise of a few samples.

`Refiner.round_sequentially` drives it; `driver._quantize` fits on the batches the statistics came from, keeps
the result where the whole model measures better on the held-out ones, and fits again on all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import helper

from qconvert.fidelity import gptq, hessian
from qconvert.fidelity.checks import Deferred, variant
from qconvert.fidelity.statistics import Layer
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections

ROWS_PER_COLUMN = 4  # input rows a layer needs per column of its weight to be fitted to the float outputs
MAX_ROWS = 8192  # rows of a batch that the sums take (evenly spaced): a 240x240 map's 57600 say little more
MACS = 1e12  # a fit's multiply-accumulates in the fitted layers, at most, on ...
MIN_BATCHES = 4  # ... at least this many batches

# a layer, its target weight (the float weight's shape) and Ĥ -> its values rounded on them
Reround = Callable[[str, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class _Sums:
    """Σ x̂ x̂ᵀ, Σ x x̂ᵀ ([G, C, C]), Σ x and Σ x̂ ([G, C]) over a layer's input rows."""

    quantized: np.ndarray
    cross: np.ndarray
    mean: np.ndarray
    mean_quantized: np.ndarray
    rows: int = 0

    @staticmethod
    def zeros(groups: int, columns: int) -> _Sums:
        square, vector = np.zeros((groups, columns, columns)), np.zeros((groups, columns))
        return _Sums(square, square.copy(), vector, vector.copy())

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """One batch's rows, every `step`-th of them past MAX_ROWS (the same ones of both)."""
        step = -(-x.shape[2] // MAX_ROWS)
        x, x_hat = x[:, :, ::step], x_hat[:, :, ::step]
        columns = x.shape[1]
        products = np.concatenate([x, x_hat], axis=1) @ x_hat.transpose(0, 2, 1)  # one product for both
        self.cross += products[:, :columns]
        self.quantized += products[:, columns:]
        self.mean += x.sum(axis=2, dtype=np.float64)
        self.mean_quantized += x_hat.sum(axis=2, dtype=np.float64)
        self.rows += x.shape[2]


def affordable(model: onnx.ModelProto, layers: list[Layer], feeds: Feeds, batches: int) -> bool:
    """Whether a fit on this many batches stays within MACS, from the layers' input shapes on the first batch."""
    if not layers or not feeds.batches:
        return False
    inputs = list(dict.fromkeys(layer.node.input[0] for layer in layers))
    shapes: dict[str, tuple[int, ...]] = {}
    for values in Sections(model, Feeds(feeds.batches[:1], 1, feeds.source), "float model").passes(
        partial(_wanting, inputs)
    ):
        shapes |= {name: value.shape for name, value in values.items()}
    macs = 0  # per batch: the layers in the float and the quantized model, and their input products (`_Sums`)
    for layer in layers:
        groups, columns = hessian.shape(layer)
        rows = _rows(layer, shapes[layer.node.input[0]])
        macs += 2 * int(np.prod(layer.weight_shape)) * rows + 2 * groups * columns**2 * min(rows, MAX_ROWS)
    return macs * max(batches, MIN_BATCHES) <= MACS


def supported(layer: Layer) -> bool:
    """Layers whose input rows `patches` can make: Gemm, MatMul, and 2-D convolutions (and ConvTranspose without
    an output_shape) with explicit pads."""
    if not layer.convolution:
        return True
    attributes = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}
    return (
        len(layer.weight_shape) == 4
        and attributes.get("auto_pad", b"NOTSET") in (b"NOTSET", b"VALID")
        and "output_shape" not in attributes
    )


def fit(
    model: onnx.ModelProto,
    fitted: list[Layer],
    values: Mapping[str, Deferred],
    shifts: dict[str, tuple[Layer, np.ndarray]],
    original: Callable[[str], np.ndarray],
    reround: Reround,
    feeds: Feeds,
    correct_bias: bool,
    unshifted: Collection[str] = (),
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The `fitted` layers (graph order) rounded again one after the other, on these batches: their values and
    (`correct_bias`, where their bias can take it, but not the `unshifted` layers') bias shifts. `values`: every
    quantized weight's dequantized values; `shifts`: the layers' bias shifts so far.

    The float and the quantized model run in step, in sections (`Sections`) that end at each fitted layer: each
    section continues from the tensors the previous one handed on, so a fit costs about one run of each model
    per batch, and the quantized one's next section already holds the layer just rounded."""
    arrays, offsets = dict(values), dict(shifts)
    float_model = Sections(model, feeds, "float model")
    quantized = Sections(model, feeds, "quantized model")
    result: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for layer in fitted:
        x, end = layer.node.input[0], quantized.position[layer.node.output[0]]
        sums = _Sums.zeros(*hessian.shape(layer))
        for before, after in zip(
            float_model.run(end, partial(_wanting_one, x)), quantized.run(end, partial(_quantized, arrays, offsets, x))
        ):
            sums.add(patches(layer, before[x]), patches(layer, after[x]))
        floats = hessian.matrix(layer, original(layer.weight)).astype(np.float64)
        target = _target(floats, sums) if sums.rows >= ROWS_PER_COLUMN * floats.shape[2] else floats
        rounded = reround(layer.weight, hessian.from_matrix(layer, target), sums.quantized)
        arrays[layer.weight] = rounded
        shifted = correct_bias and layer.bias_editable and layer.weight not in unshifted
        shift = _shift(floats, hessian.matrix(layer, rounded), sums) if shifted else None
        if shift is None:
            offsets.pop(layer.weight, None)
        else:
            offsets[layer.weight] = (layer, shift)
        result[layer.weight] = (rounded, shift)
    return result


def _wanting(names: list[str], section: Section) -> None:
    section.wanted += [name for name in names if name in section.made]


def _wanting_one(x: str, section: Section) -> None:
    """The layer's input, made in this section or handed on to it."""
    section.wanted.append(x)


def _quantized(
    arrays: dict[str, Deferred], shifts: dict[str, tuple[Layer, np.ndarray]], x: str, section: Section
) -> None:
    """A section of the model quantized so far: its weights' values and bias shifts, and the layer's input `x`."""
    variant(arrays, shifts, [], section)
    _wanting_one(x, section)


def patches(layer: Layer, x: np.ndarray) -> np.ndarray:
    """The layer's input as the rows its weight's columns multiply, [G, C, rows] in `hessian.matrix`'s column
    order (a Conv's Cin/G·kh·kw patch: im2col; a ConvTranspose's the same count of values its taps bring)."""
    if not layer.convolution:
        rows = x.T if layer.op_type == "Gemm" and layer.x_axis == 0 else x.reshape(-1, layer.in_channels)
        return np.ascontiguousarray(rows.T[None], np.float32)
    columns = (_brought if layer.op_type == "ConvTranspose" else _columns)(layer, x)
    n, channels, kh, kw = columns.shape[:4]
    groups = layer.groups
    grouped = columns.reshape(n, groups, channels // groups, kh, kw, -1).transpose(1, 2, 3, 4, 0, 5)
    return grouped.reshape(groups, (channels // groups) * kh * kw, -1)


def _columns(layer: Layer, x: np.ndarray) -> np.ndarray:
    """A Conv's input patches, [N, Cin, kh, kw, out_h, out_w]."""
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = _geometry(layer)
    padded = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    n, channels, height, width = padded.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    columns = np.empty((n, channels, kh, kw, out_h, out_w), np.float32)
    for i in range(kh):
        taken = slice(i * dh, i * dh + (out_h - 1) * sh + 1, sh)
        for j in range(kw):
            columns[:, :, i, j] = padded[:, :, taken, j * dw : j * dw + (out_w - 1) * sw + 1 : sw]
    return columns


def _brought(layer: Layer, x: np.ndarray) -> np.ndarray:
    """What each kernel tap of a ConvTranspose brings to each output pixel, [N, Cin, kh, kw, out_h, out_w]: the
    input placed every stride from the tap's offset, cropped by the pads (zero where the tap brings nothing)."""
    (kh, kw), (sh, sw), (dh, dw), (top, left, _, _) = _geometry(layer)
    n, channels, height, width = x.shape
    out_h, out_w = _transposed_size(layer, x.shape)
    reach_h, reach_w = (height - 1) * sh + 1, (width - 1) * sw + 1
    canvas = np.zeros(
        (n, channels, max(top + out_h, (kh - 1) * dh + reach_h), max(left + out_w, (kw - 1) * dw + reach_w)),
        np.float32,
    )
    columns = np.empty((n, channels, kh, kw, out_h, out_w), np.float32)
    for i in range(kh):
        for j in range(kw):
            placed = np.s_[:, :, i * dh : i * dh + reach_h : sh, j * dw : j * dw + reach_w : sw]
            canvas[placed] = x
            columns[:, :, i, j] = canvas[:, :, top : top + out_h, left : left + out_w]
            canvas[placed] = 0  # the canvas is all zeros again for the next tap
    return columns


def _transposed_size(layer: Layer, shape: tuple[int, ...]) -> tuple[int, int]:
    """A ConvTranspose's output height and width for an input of this shape."""
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = _geometry(layer)
    extra = next((list(a.ints) for a in layer.node.attribute if a.name == "output_padding"), [0, 0])
    return (
        sh * (shape[2] - 1) + extra[0] + (kh - 1) * dh + 1 - top - bottom,
        sw * (shape[3] - 1) + extra[1] + (kw - 1) * dw + 1 - left - right,
    )


def _geometry(layer: Layer) -> tuple[list[int], list[int], list[int], list[int]]:
    """A 2-D Conv's (or ConvTranspose's) kernel, strides, dilations and pads."""
    attributes = {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}
    kernel = list(layer.weight_shape[2:])
    strides, dilations = attributes.get("strides", [1, 1]), attributes.get("dilations", [1, 1])
    return kernel, strides, dilations, attributes.get("pads", [0] * 4)


def _rows(layer: Layer, shape: tuple[int, ...]) -> int:
    """How many input rows (`patches`) a batch of this shape gives the layer."""
    if not layer.convolution:
        return int(np.prod(shape)) // layer.in_channels
    if layer.op_type == "ConvTranspose":
        return shape[0] * int(np.prod(_transposed_size(layer, shape)))
    (kh, kw), (sh, sw), (dh, dw), (top, left, bottom, right) = _geometry(layer)
    out_h = (shape[2] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    out_w = (shape[3] + left + right - dw * (kw - 1) - 1) // sw + 1
    return shape[0] * out_h * out_w


def _target(floats: np.ndarray, sums: _Sums) -> np.ndarray:
    """W + W (C − Ĥ)(Ĥ + λI)⁻¹ per group ([G, R, C]), λ GPTQ's damping."""
    columns = sums.quantized.shape[1]
    diagonal = np.diagonal(sums.quantized, axis1=1, axis2=2)
    damping = gptq.DAMPING * np.maximum(diagonal.mean(axis=1), 1e-30)
    ridged = sums.quantized + damping[:, None, None] * np.eye(columns)
    # (Ĥ + λI) is symmetric: W (C − Ĥ)(Ĥ + λI)⁻¹ = ((Ĥ + λI)⁻¹ (C − Ĥ)ᵀ Wᵀ)ᵀ
    correction = np.linalg.solve(ridged, (sums.cross - sums.quantized).transpose(0, 2, 1) @ floats.transpose(0, 2, 1))
    return floats + correction.transpose(0, 2, 1)


def _shift(floats: np.ndarray, rounded: np.ndarray, sums: _Sums) -> np.ndarray:
    """The mean output error per output channel: W x̄ − Ŵ x̄̂ ([Cout], groups in order)."""
    mean, mean_quantized = sums.mean / sums.rows, sums.mean_quantized / sums.rows
    return (floats @ mean[:, :, None] - rounded @ mean_quantized[:, :, None]).reshape(-1)
