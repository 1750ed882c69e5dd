"""Activation ranges from calibration data: one onnxruntime pass, bounded memory per tensor."""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import partial
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert.plan import CalibrationMethod
from qconvert.quant.linear import dequantize, grid_for, quantize
from qconvert.rewrite import After
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections

SAMPLE_PER_TENSOR = 1 << 15  # values sampled per tensor, over all batches ...
TAIL_PER_TENSOR = 1 << 14  # ... and its largest and its smallest, exactly, over all batches (each)


def activation_ranges(
    model: onnx.ModelProto,
    tensors: list[str],
    feeds: Feeds,
    *,
    method: CalibrationMethod,
    percentile: float = 99.999,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Range [lo, hi] of each named float tensor over the calibration feeds: its min/max (reduced in the
    graph), or percentiles or the entropy rule on a sample of its values (`sample_parts`)."""
    if method is CalibrationMethod.MINMAX:
        return _min_max(model, tensors, feeds)
    return ranges_by(sample_parts(model, tensors, feeds, seed), rule_for(method, percentile))


def rule_for(method: CalibrationMethod, percentile: float) -> str:
    """The `RULES` name (or "percentile P") of a fixed calibration method (not auto, which chooses)."""
    return {CalibrationMethod.MINMAX: "minmax", CalibrationMethod.MSE: "mse", CalibrationMethod.ENTROPY: "entropy"}.get(
        method, f"percentile {percentile:g}"
    )


def sample_parts(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, seed: int = 0) -> dict[str, list[Part]]:
    """Per tensor and batch, its values as a weighted sample and its exact min and max (`Sampler`), in a pass
    of their own."""
    sampler = Sampler(tensors, len(feeds.batches), seed=seed)
    for outputs in Sections(model, feeds, "model for calibration").passes(sampler.read):
        sampler.add(outputs)
    return sampler.parts()


class Sampler:
    """What a pass over the model (`Sections`, `read` its build step, `add` per batch) gathers of `tensors`,
    per batch: their min and max, and (`sampled`) a weighted sample of their values (`Part`), all taken in the
    graph as soon as the tensor exists (`read_samples`, `read_extremes`), so that only those come back and
    onnxruntime frees every activation as usual (fetching whole tensors peaked at 900 MB on ResNet-50, against
    240 MB)."""

    def __init__(self, tensors: Collection[str], batches: int, *, sampled: bool = True, seed: int = 0) -> None:
        batches = max(1, batches)
        take, self.tail = max(1, SAMPLE_PER_TENSOR // batches), max(1, TAIL_PER_TENSOR // batches)
        self.places = (np.arange(take) + np.random.default_rng(seed).random(take)) / take
        self.sampled = sampled
        self.taken: dict[str, list[str]] = {}  # tensor -> the outputs that hold what is read of it
        self.found: dict[str, list[Part]] = {t: [] for t in dict.fromkeys(tensors)}

    def read(self, section: Section) -> None:
        if self.sampled:
            read_samples(self.found, self.places, self.tail, self.taken, section)
        else:
            read_extremes(self.found, self.taken, section)

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        for t, names in self.taken.items():
            if names[0] not in outputs:
                continue
            values = [np.asarray(outputs[n]) for n in names]
            if not self.sampled:
                values = [np.zeros(0, np.float32), *values]
            if np.isfinite(float(values[1])):  # else empty in this batch
                self.found[t].append(_part(*values))

    def parts(self) -> dict[str, list[Part]]:
        return {name: found for name, found in self.found.items() if found}

    def ranges(self) -> dict[str, tuple[float, float]]:
        """Each tensor's min and max over the batches."""
        return {name: RULES["minmax"](found) for name, found in self.parts().items()}


def _part(
    sample: np.ndarray, lo: np.ndarray, hi: np.ndarray, size: np.ndarray | None = None, *tails: np.ndarray
) -> Part:
    """A batch's weighted sample: the values past the tails' innermost ones exactly (weight 1), and the
    sampled values between them standing for the rest; without tails (or with tails that overlap), the sample
    alone. Values equal to a tail's innermost stay with the sample: a ReLU6's many sixes are not a tail."""
    if size is None:  # min and max only
        return Part(sample, float(lo), float(hi))
    count, sample = float(size), sample.astype(np.float32).reshape(-1)
    top, bottom = (t.astype(np.float32).reshape(-1) for t in tails) if tails else (sample[:0], sample[:0])
    if top.size and bottom.size and 2 * top.size < count:
        high, low = float(top.min()), float(bottom.max())
        beyond = np.concatenate([top[top > high], bottom[bottom < low]])
        inside = sample[(sample >= low) & (sample <= high)]
        if inside.size:
            return Part(inside, float(lo), float(hi), (count - beyond.size) / inside.size, beyond)
    return Part(sample, float(lo), float(hi), count / sample.size)


def read_samples(
    tensors: Collection[str], places: np.ndarray, tail: int, taken: dict[str, list[str]], section: Section
) -> None:
    """For those `tensors` the section makes first and `taken` lacks, as readers of the section (`read_extremes`
    says why) and outputs it wants: a sample (the flattened tensor at `places` of its length, fractions in
    [0, 1): one value in each of as many equal stretches of it, or each value about equally often when it is
    shorter; from a copy with one value more, as Gather fails on an empty tensor), its min, max and size, and
    from opset 10 (TopK with k an input) its `tail` largest and smallest values."""
    here = [t for t in tensors if t in section.made and t not in taken]
    if not here:
        return
    shared = {
        "places": places,
        "fill": np.array([-np.inf], np.float32),
        "flat_shape": np.array([-1], np.int64),
        "tail": np.array([tail], np.float32),
    }
    constant = {key: section.fresh(f"qc_sample_{key}") for key in shared}
    section.graph.initializer.extend(numpy_helper.from_array(v, constant[k]) for k, v in shared.items())
    tails = section.opset >= 10
    for t in here:
        name = partial(_fresh_for, section, t)
        outputs = taken[t] = [name(s) for s in ("sample", "min", "max", "size", "top", "bottom")[: 6 if tails else 4]]
        sample, lo, hi, size = outputs[:4]
        flat, padded, wide, at, floor, index = (name(s) for s in ("flat", "padded", "wide", "at", "floor", "index"))
        nodes = [
            helper.make_node("ReduceMin", [t], [lo], keepdims=0),
            helper.make_node("ReduceMax", [t], [hi], keepdims=0),
            helper.make_node("Size", [t], [size]),
            helper.make_node("Reshape", [t, constant["flat_shape"]], [flat]),
            helper.make_node("Concat", [flat, constant["fill"]], [padded], axis=0),
            helper.make_node("Cast", [size], [wide], to=onnx.TensorProto.DOUBLE),
            helper.make_node("Mul", [wide, constant["places"]], [at]),
            helper.make_node("Floor", [at], [floor]),
            helper.make_node("Cast", [floor], [index], to=onnx.TensorProto.INT64),
            helper.make_node("Gather", [padded, index], [sample], axis=0),
        ]
        if tails:
            nodes += _tails(flat, size, constant["tail"], outputs[4:], section.opset, name)
        section.after.setdefault(t, After()).nodes.extend(nodes)
        section.wanted += outputs


def _tails(
    flat: str, size: str, tail: str, made: list[str], opset: int, name: Callable[[str], str]
) -> list[onnx.NodeProto]:
    """TopK of the min(`tail`, size) largest and smallest values of `flat` into `made` (the smallest by
    negating before opset 11, which has no `largest`)."""
    top, bottom = made
    count, fewer, k = name("size_float"), name("tail_float"), name("k")
    nodes = [
        helper.make_node("Cast", [size], [count], to=onnx.TensorProto.FLOAT),
        helper.make_node("Min", [count, tail], [fewer]),
        helper.make_node("Cast", [fewer], [k], to=onnx.TensorProto.INT64),
        helper.make_node("TopK", [flat, k], [top, name("top_at")], axis=0),
    ]
    if opset >= 11:
        return [*nodes, helper.make_node("TopK", [flat, k], [bottom, name("bottom_at")], axis=0, largest=0)]
    negated, negated_top = name("negated"), name("negated_top")
    return [
        *nodes,
        helper.make_node("Neg", [flat], [negated]),
        helper.make_node("TopK", [negated, k], [negated_top, name("bottom_at")], axis=0),
        helper.make_node("Neg", [negated_top], [bottom]),
    ]


def _fresh_for(section: Section, tensor: str, suffix: str) -> str:
    return section.fresh(f"{tensor}_qc_{suffix}")


def ranges_by(
    parts: dict[str, list[Part]], rule: str, batches: slice = slice(None), exact: Collection[str] = ()
) -> dict[str, tuple[float, float]]:
    """Each tensor's range by one of `RULES` (or "percentile P", or "per tensor": `choose`), from `batches`;
    the `exact` ones' by min/max whatever the rule (a model's outputs: clipping them clips what it delivers)."""
    by_rule = _rule(rule)
    return {name: (RULES["minmax"] if name in exact else by_rule)(found[batches]) for name, found in parts.items()}


def _rule(rule: str) -> Callable[[list[Part]], tuple[float, float]]:
    if rule == PER_TENSOR:
        return lambda parts: choose(parts)[0]
    if rule.startswith("percentile ") and rule not in RULES:
        return partial(_percentile, percentile=float(rule.split()[1]))
    return RULES[rule]


class Part(NamedTuple):
    """What one batch gave of a tensor: its exact min and max, a sample of its values each standing for
    `weight` of them, and the values past the sample's (`Sampler`), exactly."""

    sample: np.ndarray
    lo: float
    hi: float
    weight: float = 1.0
    tails: np.ndarray = np.zeros(0, np.float32)


def pooled(parts: list[Part]) -> tuple[np.ndarray, np.ndarray]:
    """The batches' samples and tails, and what each value weighs."""
    values = np.concatenate([v for p in parts for v in (p.sample, p.tails)])
    weights = np.concatenate([np.full(v.size, w) for p in parts for v, w in ((p.sample, p.weight), (p.tails, 1.0))])
    return values, weights


RULES: dict[str, Callable[[list[Part]], tuple[float, float]]] = {  # the rules `choose` tries, in this order
    "minmax": lambda parts: (min(p.lo for p in parts), max(p.hi for p in parts)),
    "percentile 99.999": lambda parts: _percentile(parts, 99.999),
    "percentile 99.99": lambda parts: _percentile(parts, 99.99),
    "mse": lambda parts: mse_range(*pooled(parts)),
    "entropy": lambda parts: entropy_range(*pooled(parts)),
}


PER_TENSOR = "per tensor"  # each tensor by the rule that quantizes its held-out values best


def choose(parts: list[Part]) -> tuple[tuple[float, float], str]:
    """The rule whose range, found on the even batches, quantizes the odd ones (samples it did not see) with
    the least squared error (the first on a tie; with one batch, judged on it), applied to all batches."""
    fit, held = (parts[0::2], parts[1::2]) if len(parts) > 1 else (parts, parts)
    values, weights = pooled(held)
    errors = [_error(values, weights, *rule(fit)) for rule in RULES.values()]
    name = list(RULES)[int(np.argmin(errors))]
    return RULES[name](parts), name


def mse_range(values: np.ndarray, weights: np.ndarray | None = None, bins: int = 2048) -> tuple[float, float]:
    """The range whose uint8 grid quantizes `values` (each counting `weights` times) with the least squared
    error: each end shrunk from the min/max towards 0 in turn, errors counted on a histogram of the values."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if hi - lo <= 0:
        return lo, hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi), weights=weights)
    centres = ((edges[1:] + edges[:-1]) / 2)[counts > 0]
    counts = counts[counts > 0].astype(np.float64)
    shares = np.geomspace(1.0, 1e-3, 96)

    def best(los: np.ndarray, his: np.ndarray) -> tuple[float, float]:
        grid = grid_for(np.zeros((len(los), 1)), bits=8, symmetric=False, lo=los, hi=his)
        rows = np.broadcast_to(centres, (len(los), centres.size))
        error = ((dequantize(quantize(rows, grid), grid) - rows) ** 2) @ counts
        at = int(np.argmin(error))
        return float(los[at]), float(his[at])

    lo, hi = best(lo * shares, hi * shares)  # both ends together, then each alone
    _, hi = best(np.full(shares.size, lo), np.linspace(hi, max(float(values.max()), 0.0), shares.size))
    lo, _ = best(np.linspace(lo, min(float(values.min()), 0.0), shares.size), np.full(shares.size, hi))
    return lo, hi


ENTROPY_FLOOR = 99.99  # percentile of |x| below which the entropy rule never clips


def entropy_range(values: np.ndarray, weights: np.ndarray | None = None, bins: int = 2048) -> tuple[float, float]:
    """The range clipped at the magnitude t that loses the least information (TensorRT's entropy calibration):
    over the histogram of |values|, P keeps the bins below t with the counts past it added to the last, Q
    merges those bins (without the counts past t) into as many groups as the 8-bit grid has levels there
    (256 for values of one sign, else 128), each spread evenly over the bins where P is not empty; t
    minimises KL(P || Q). Each value counts `weights` times."""
    weights = np.ones(values.size) if weights is None else weights
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    top = max(-lo, hi)
    if top <= 0:
        return lo, hi
    levels = 256 if lo == 0 or hi == 0 else 128
    # exact zeros (half of a ReLU's output) stay exact on every grid: counted, their spike in the first bin
    # would decide, as a wide range smears it over more bins (the digits CNN: 11 dB instead of min/max's 34)
    nonzero = values != 0
    counts = np.histogram(np.abs(values[nonzero]), bins=bins, range=(0.0, top), weights=weights[nonzero])[0]
    best, threshold = np.inf, top
    for kept in range(levels, bins + 1, max(1, (bins - levels) // 120)):
        p = counts[:kept].copy()
        p[-1] += counts[kept:].sum()
        group = (np.arange(kept) * levels) // kept
        used = p > 0
        spread = np.bincount(group, weights=counts[:kept], minlength=levels) / np.maximum(
            np.bincount(group, weights=used, minlength=levels), 1
        )
        q = np.where(used, spread[group], 0.0)[used]
        q = np.maximum(q, 1e-4 * q.max()) if q.max() > 0 else np.ones(q.size)  # clipped mass Q cannot hold
        p = p[used] / p.sum()
        divergence = float(np.sum(p * np.log(p / (q / q.sum()))))
        if divergence < best:
            best, threshold = divergence, top * kept / bins
    floor = _quantile(np.abs(values), weights, ENTROPY_FLOOR / 100)  # the tail that clipping may not cut
    return max(lo, -max(threshold, floor)), min(hi, max(threshold, floor))


def quantization_snr(parts: list[Part], lo: float, hi: float, signed: bool = False) -> float | None:
    """SNR (dB) of a tensor's sampled values quantized on the 8-bit grid of [lo, hi] (None: exact)."""
    values, weights = pooled(parts)
    noise = _error(values, weights, lo, hi, signed)
    if noise == 0:
        return None
    return 10 * float(np.log10(max(float(np.average(values.astype(np.float64) ** 2, weights=weights)), 1e-300) / noise))


def _error(values: np.ndarray, weights: np.ndarray, lo: float, hi: float, signed: bool = False) -> float:
    """The weighted mean squared error of the values on the 8-bit grid of [lo, hi]."""
    rows = values.reshape(1, -1).astype(np.float64)
    return float(np.average(((_on_grid(rows, lo, hi, signed) - rows) ** 2).reshape(-1), weights=weights))


def _on_grid(row: np.ndarray, lo: float, hi: float, signed: bool = False) -> np.ndarray:
    """A row of values ([1, n]) quantized and dequantized on the 8-bit activation grid of [lo, hi]."""
    grid = grid_for(np.zeros((1, 1)), bits=8, symmetric=signed, lo=np.array([lo]), hi=np.array([hi]))
    return dequantize(quantize(row, grid), grid)


def _percentile(parts: list[Part], percentile: float) -> tuple[float, float]:
    values, weights = pooled(parts)
    return _quantile(values, weights, 1 - percentile / 100), _quantile(values, weights, percentile / 100)


def _quantile(values: np.ndarray, weights: np.ndarray, share: float) -> float:
    """The value below which `share` of the weight lies (each value's weight centred on it, interpolated)."""
    order = np.argsort(values, kind="stable")
    ordered, cumulative = values[order].astype(np.float64), np.cumsum(weights[order], dtype=np.float64)
    return float(np.interp(share * cumulative[-1], cumulative - weights[order] / 2, ordered))


def _min_max(model: onnx.ModelProto, tensors: list[str], feeds: Feeds) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor, reduced in the graph as soon as it exists (`Sampler`): only scalars come
    back (fetching them took 7 GB on ResNet-50). The pass runs in sections (`Sections`): each session holds
    a share of the weights."""
    sampler = Sampler(tensors, len(feeds.batches), sampled=False)
    for values in Sections(model, feeds, "model for calibration").passes(sampler.read):
        sampler.add(values)
    return sampler.ranges()


def read_extremes(tensors: Collection[str], taken: dict[str, list[str]], section: Section) -> None:
    """ReduceMin and ReduceMax of those `tensors` the section makes first and `taken` (tensor -> min and
    max output names) lacks, as readers of the section (`Section.after`: placed in one `add_after` call
    with its other readers, see its note on onnxruntime's order) and outputs it wants."""
    for t in tensors:
        if t in section.made and t not in taken:
            lo, hi = taken[t] = [section.fresh(f"{t}_qc_min"), section.fresh(f"{t}_qc_max")]
            section.after.setdefault(t, After()).nodes.extend(
                [
                    helper.make_node("ReduceMin", [t], [lo], keepdims=0),
                    helper.make_node("ReduceMax", [t], [hi], keepdims=0),
                ]
            )
            section.wanted += [lo, hi]
