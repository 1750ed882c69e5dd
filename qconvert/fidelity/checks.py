"""Measured checks on the calibration data: each candidate layer's output error beside the float layer, and
whole-model variants' output SNR."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.fidelity.bias import output_layout
from qconvert.fidelity.statistics import Layer, reduction
from qconvert.opset import hole, is_hole
from qconvert.rewrite import After, NameSource
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections
from qconvert.select import constant_value

IMPORTANCE_FLOOR = 1e-6  # dead input channels still count a little: keeps the weighted k-means well posed


CANDIDATE_SHARE = (
    3  # a layer-check pass adds candidate weights up to this share of a section's: each adds a layer copy and its error
)


Deferred = np.ndarray | Callable[[], np.ndarray]  # an array, or what makes it when it is needed


def array_of(value: Deferred) -> np.ndarray:
    return value() if callable(value) else value


@dataclass(frozen=True)
class Candidate:
    """A quantized version of a layer's weight (and the bias shift that goes with it) to measure. The
    weight may come as what decodes it: a big model's candidates are then made a group at a time."""

    layer: Layer
    weight: Deferred
    shift: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        if isinstance(self.weight, np.ndarray):
            return self.weight.nbytes
        return 4 * int(np.prod(self.layer.weight_shape))  # float32


def layer_snr(model: onnx.ModelProto, candidates: list[Candidate], feeds: Feeds) -> list[float | None]:
    """Output SNR (dB) of each candidate's layer against the float layer on the calibration data.

    Each candidate weight runs as a copy of its layer beside the float model, reading the float input;
    the error per output channel (its sum and sum of squares) and the signal are reduced in the graph,
    so only vectors come back, and any bias shift's error follows from them: Σ(d + s)² = Σd² + 2sΣd + ns².
    Candidate weights go in groups of a share of a section's budget of bytes, one onnxruntime pass per
    group, in the model's order: each pass runs the part of the model up to its last layer, from where
    the previous one stopped (`Sections`).
    """
    sections = Sections(model, feeds, "model for the layer-error check")
    measured: dict[tuple[str, int], Candidate] = {}  # one run per weight: candidates differ by their shift
    for candidate in candidates:
        measured.setdefault((candidate.layer.weight, id(candidate.weight)), candidate)
    order = sorted(measured.values(), key=lambda c: sections.position[c.layer.node.output[0]])
    groups: list[list[Candidate]] = []
    size = 0
    for candidate in order:  # a layer's candidates stay together: a pass measures the layers it runs
        if not groups or (
            size + candidate.nbytes > sections.budget // CANDIDATE_SHARE
            and candidate.layer.weight != groups[-1][-1].layer.weight
        ):
            groups.append([])
            size = 0
        groups[-1].append(candidate)
        size += candidate.nbytes
    sums: dict[tuple[str, int], tuple[float, np.ndarray, np.ndarray, float]] = {}
    for index, group in enumerate(groups):
        names: dict[tuple[str, int], tuple[str, str, str, str]] = {}  # signal, size, error sum of squares, error sum
        totals: dict[str, np.ndarray] = {}
        end = max(sections.position[c.layer.node.output[0]] for c in group) + 1
        for values in sections.run(end, partial(_layer_checks, group, names), last=index == len(groups) - 1):
            for name, value in values.items():
                totals[name] = totals.get(name, 0) + np.asarray(value, np.float64)
        sums.update(
            {
                key: (
                    float(totals[signal]),
                    totals[squares],
                    totals[total],
                    float(totals[size]) / max(totals[total].size, 1),
                )
                for key, (signal, size, squares, total) in names.items()
            }
        )
    snrs = []
    for candidate in candidates:
        signal, error, total, count = sums[candidate.layer.weight, id(candidate.weight)]
        squares = float(error.sum())
        if candidate.shift is not None:
            shift = candidate.shift.astype(np.float64)
            squares += float(2 * shift @ total + count * (shift @ shift))
        snrs.append(_snr(signal, max(squares, 0.0)))
    return snrs


def _layer_checks(
    group: list[Candidate], names: dict[tuple[str, int], tuple[str, str, str, str]], section: Section
) -> None:
    """Beside each candidate's layer, a copy with the candidate weight; per candidate weight, `names` gets
    the outputs: the layer's signal and size, and the error's sum of squares and sum per output channel."""
    graph, fresh = section.graph, section.fresh
    signals: dict[str, tuple[str, str]] = {}
    for candidate in group:
        layer = candidate.layer
        y = layer.node.output[0]
        checks = section.after.setdefault(y, After()).nodes
        if y not in signals:
            signals[y] = (fresh(f"{y}_qc_signal"), fresh(f"{y}_qc_size"))
            checks += [
                helper.make_node("ReduceSumSquare", [y], [signals[y][0]], keepdims=0),
                helper.make_node("Size", [y], [signals[y][1]]),
            ]
        w = fresh(f"{layer.weight}_qc_candidate")
        section.replaced[w] = array_of(candidate.weight)
        graph.initializer.append(hole(w, section.replaced[w]))
        out, diff = fresh(f"{y}_qc_candidate"), fresh(f"{y}_qc_diff")
        checks += [layer_copy(layer.node, w, out, fresh), helper.make_node("Sub", [out, y], [diff])]
        axes = [0, *range(2, len(layer.weight_shape))] if layer.convolution else [0]
        if layer.op_type == "MatMul":  # [..., C] -> [rows, C]
            shape, rows = fresh(f"{y}_qc_rows_shape"), fresh(f"{y}_qc_rows")
            graph.initializer.append(
                numpy_helper.from_array(np.array([-1, layer.weight_shape[layer.out_axis]], np.int64), shape)
            )
            checks.append(helper.make_node("Reshape", [diff, shape], [rows]))
            diff = rows
        squares, total = fresh(f"{y}_qc_error"), fresh(f"{y}_qc_error_sum")
        checks += [
            *reduction("ReduceSumSquare", diff, axes, squares, graph, fresh, section.opset),
            *reduction("ReduceSum", diff, axes, total, graph, fresh, section.opset),
        ]
        names[layer.weight, id(candidate.weight)] = (*signals[y], squares, total)
    section.wanted += list(dict.fromkeys(name for four in names.values() for name in four))


def layer_copy(
    node: onnx.NodeProto, weight: str, output: str, fresh: NameSource, *, bias: bool = True
) -> onnx.NodeProto:
    """The layer's node reading another weight (and, without `bias`, no bias) into another output."""
    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.name = fresh(f"{node.name or node.op_type}_qc_copy")
    copy.input[1] = weight
    if not bias:
        del copy.input[2:]
    del copy.output[:]
    copy.output.append(output)
    return copy


def _snr(signal: float, error: float) -> float | None:
    if error == 0.0:
        return None
    return 10.0 * float(np.log10(signal / error)) if signal > 0 else float("-inf")


def model_snr(
    model: onnx.ModelProto,
    variants: list[tuple[dict[str, Deferred], dict[str, tuple[Layer, np.ndarray]]]],
    feeds: Feeds,
    reference: list[np.ndarray],
) -> list[float | None]:
    """SNR (dB) of the model's outputs, all outputs together, for each variant against the float
    model's `reference` outputs on the same feeds.

    A variant replaces weights by float arrays (their dequantized values, made one section at a time)
    and adds bias shifts after their layers, in a copy of the model: the quantized model's arithmetic
    without encoding it. Each variant is a pass in sections (`Sections`).
    """
    signal = sum(float(np.sum(r * r)) for r in reference)
    model_outputs = [o.name for o in model.graph.output]
    sections = Sections(model, feeds, "model for the whole-model check")
    snrs = []
    for arrays, shifts in variants:
        outputs: list[list[np.ndarray]] = [[] for _ in model_outputs]
        for values in sections.passes(partial(variant, arrays, shifts, model_outputs)):
            for kept, name in zip(outputs, model_outputs):
                if name in values:
                    kept.append(np.asarray(values[name], np.float64))
        error = sum(float(np.sum((r - np.concatenate(q)) ** 2)) for r, q in zip(reference, outputs))
        snrs.append(_snr(signal, error))
    return snrs


def variant(
    arrays: dict[str, Deferred], shifts: dict[str, tuple[Layer, np.ndarray]], model_outputs: list[str], section: Section
) -> None:
    """A section of a whole-model variant: its weights replaced, bias shifts added after its layers."""
    graph = section.graph
    for tensor in graph.initializer:
        if tensor.name in arrays:
            array = array_of(arrays[tensor.name]).astype(np.float32, copy=False)
            if is_hole(tensor):
                section.replaced[tensor.name] = array
            else:
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    for node in graph.node:
        value = constant_value(node)
        if value is not None and node.output[0] in arrays:
            value.CopyFrom(
                numpy_helper.from_array(array_of(arrays[node.output[0]]).astype(np.float32, copy=False), value.name)
            )
    for layer, shift in shifts.values():
        y = layer.node.output[0]
        if y in section.made:
            bias = numpy_helper.from_array(
                output_layout(layer, shift).astype(np.float32), section.fresh(f"{layer.weight}_qc_shift")
            )
            graph.initializer.append(bias)
            product = section.fresh(f"{y}_qc_unshifted")
            section.after[y] = After([helper.make_node("Add", [product, bias.name], [y])], product)
    if section.complete:
        section.wanted += model_outputs
