"""Activation ranges from calibration data: one onnxruntime pass, bounded memory per tensor."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import onnx
from onnx import helper

from qconvert.plan import CalibrationMethod
from qconvert.quant.layout import snr_db
from qconvert.quant.linear import dequantize, grid_for, quantize
from qconvert.rewrite import After
from qconvert.runtime import Feeds
from qconvert.sections import Section, Sections

SAMPLE_PER_TENSOR = 1 << 16  # values kept per tensor for percentiles


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
    return {CalibrationMethod.MINMAX: "minmax", CalibrationMethod.ENTROPY: "entropy"}.get(
        method, f"percentile {percentile:g}"
    )


def sample_parts(model: onnx.ModelProto, tensors: list[str], feeds: Feeds, seed: int = 0) -> dict[str, list[Part]]:
    """Per tensor and batch, a bounded random sample of its values and its exact min and max. The tensors
    are fetched a section of the model at a time (`Sections`)."""
    wanted = list(dict.fromkeys(tensors))
    parts: dict[str, list[Part]] = {t: [] for t in wanted}
    rngs = {
        t: np.random.default_rng([seed, index]) for index, t in enumerate(wanted)
    }  # the same draws in any pass order
    fetched: set[str] = set()

    def fetch(section: Section) -> None:
        here = [t for t in wanted if t in section.made and t not in fetched]
        section.wanted += here
        fetched.update(here)

    for outputs in Sections(model, feeds, "model for calibration").passes(fetch):
        for name, values in outputs.items():
            flat = np.asarray(values, np.float32).reshape(-1)
            if flat.size == 0:
                continue
            take = min(flat.size, SAMPLE_PER_TENSOR // max(1, len(feeds.batches)))
            sample = rngs[name].choice(flat, size=take, replace=False) if take < flat.size else flat.copy()
            parts[name].append(Part(sample, float(flat.min()), float(flat.max())))
    return {name: found for name, found in parts.items() if found}


def ranges_by(parts: dict[str, list[Part]], rule: str, batches: slice = slice(None)) -> dict[str, tuple[float, float]]:
    """Each tensor's range by one of `RULES` (or "percentile P", or "per tensor": `choose`), from `batches`."""
    if rule == PER_TENSOR:
        return {name: choose(found[batches])[0] for name, found in parts.items()}
    if rule.startswith("percentile ") and rule not in RULES:
        share = float(rule.split()[1])
        return {name: _percentile(found[batches], share) for name, found in parts.items()}
    return {name: RULES[rule](found[batches]) for name, found in parts.items()}


class Part(NamedTuple):
    """What one batch gave of a tensor: a sample of its values, and its exact min and max."""

    sample: np.ndarray
    lo: float
    hi: float


RULES: dict[str, Callable[[list[Part]], tuple[float, float]]] = {  # the rules `choose` tries, in this order
    "minmax": lambda parts: (min(p.lo for p in parts), max(p.hi for p in parts)),
    "percentile 99.999": lambda parts: _percentile(parts, 99.999),
    "percentile 99.99": lambda parts: _percentile(parts, 99.99),
    "mse": lambda parts: mse_range(np.concatenate([p.sample for p in parts])),
    "entropy": lambda parts: entropy_range(np.concatenate([p.sample for p in parts])),
}


PER_TENSOR = "per tensor"  # each tensor by the rule that quantizes its held-out values best


def choose(parts: list[Part]) -> tuple[tuple[float, float], str]:
    """The rule whose range, found on the even batches, quantizes the odd ones (samples it did not see) with
    the least squared error (the first on a tie; with one batch, judged on it), applied to all batches."""
    fit, held = (parts[0::2], parts[1::2]) if len(parts) > 1 else (parts, parts)
    values = np.concatenate([p.sample for p in held])
    errors = [_error(values, *rule(fit)) for rule in RULES.values()]
    name = list(RULES)[int(np.argmin(errors))]
    return RULES[name](parts), name


def mse_range(values: np.ndarray, bins: int = 2048) -> tuple[float, float]:
    """The range whose uint8 grid quantizes `values` with the least squared error: each end shrunk from the
    min/max towards 0 in turn, errors counted on a histogram of the values."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    if hi - lo <= 0:
        return lo, hi
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
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


def entropy_range(values: np.ndarray, bins: int = 2048) -> tuple[float, float]:
    """The range clipped at the magnitude t that loses the least information (TensorRT's entropy calibration):
    over the histogram of |values|, P keeps the bins below t with the counts past it added to the last, Q
    merges those bins (without the counts past t) into as many groups as the 8-bit grid has levels there
    (256 for values of one sign, else 128), each spread evenly over the bins where P is not empty; t
    minimises KL(P || Q)."""
    lo, hi = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    top = max(-lo, hi)
    if top <= 0:
        return lo, hi
    levels = 256 if lo == 0 or hi == 0 else 128
    # exact zeros (half of a ReLU's output) stay exact on every grid: counted, their spike in the first bin
    # would decide, as a wide range smears it over more bins (the digits CNN: 11 dB instead of min/max's 34)
    counts = np.histogram(np.abs(values[values != 0]), bins=bins, range=(0.0, top))[0].astype(np.float64)
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
    floor = float(np.percentile(np.abs(values), ENTROPY_FLOOR))  # the tail that clipping may not cut
    return max(lo, -max(threshold, floor)), min(hi, max(threshold, floor))


def quantization_snr(parts: list[Part], lo: float, hi: float, signed: bool = False) -> float | None:
    """SNR (dB) of a tensor's sampled values quantized on the 8-bit grid of [lo, hi] (None: exact)."""
    values = np.concatenate([p.sample for p in parts]).reshape(1, -1).astype(np.float64)
    return snr_db(values, _on_grid(values, lo, hi, signed))


def _error(values: np.ndarray, lo: float, hi: float) -> float:
    rows = values.reshape(1, -1)
    return float(np.mean((_on_grid(rows, lo, hi) - rows) ** 2))


def _on_grid(row: np.ndarray, lo: float, hi: float, signed: bool = False) -> np.ndarray:
    """A row of values ([1, n]) quantized and dequantized on the 8-bit activation grid of [lo, hi]."""
    grid = grid_for(np.zeros((1, 1)), bits=8, symmetric=signed, lo=np.array([lo]), hi=np.array([hi]))
    return dequantize(quantize(row, grid), grid)


def _percentile(parts: list[Part], percentile: float) -> tuple[float, float]:
    values = np.concatenate([p.sample for p in parts])
    return float(np.percentile(values, 100 - percentile)), float(np.percentile(values, percentile))


def _min_max(model: onnx.ModelProto, tensors: list[str], feeds: Feeds) -> dict[str, tuple[float, float]]:
    """Min and max of each tensor, reduced in the graph as soon as it exists (`add_after`): only scalars come
    back, and onnxruntime frees every activation as usual (fetching them took 7 GB on ResNet-50). The
    pass runs in sections (`Sections`): each session holds a share of the weights."""
    reduced: dict[str, tuple[str, str]] = {}
    ranges = Extremes(reduced)
    for values in Sections(model, feeds, "model for calibration").passes(partial(read_extremes, tensors, reduced)):
        ranges.add(values)
    return ranges.ranges()


def read_extremes(tensors: list[str], reduced: dict[str, tuple[str, str]], section: Section) -> None:
    """ReduceMin and ReduceMax of those `tensors` the section makes first and `reduced` (tensor -> min and
    max output names) lacks, as readers of the section (`Section.after`: placed in one `add_after` call
    with its other readers, see its note on onnxruntime's order) and outputs it wants."""
    for t in dict.fromkeys(tensors):
        if t in section.made and t not in reduced:
            lo, hi = reduced[t] = (section.fresh(f"{t}_qc_min"), section.fresh(f"{t}_qc_max"))
            section.after.setdefault(t, After()).nodes.extend(
                [
                    helper.make_node("ReduceMin", [t], [lo], keepdims=0),
                    helper.make_node("ReduceMax", [t], [hi], keepdims=0),
                ]
            )
            section.wanted += [lo, hi]


class Extremes:
    """Running min and max of tensors over batches, from the outputs `read_extremes` named (`reduced`,
    which may grow as a pass's sections name theirs)."""

    def __init__(self, reduced: dict[str, tuple[str, str]]) -> None:
        self.reduced = reduced
        self.lo: dict[str, float] = {}
        self.hi: dict[str, float] = {}

    def add(self, outputs: dict[str, np.ndarray]) -> None:
        for t, (low, high) in self.reduced.items():
            if low in outputs:
                self.lo[t] = min(self.lo.get(t, np.inf), float(outputs[low]))
                self.hi[t] = max(self.hi.get(t, -np.inf), float(outputs[high]))

    def ranges(self) -> dict[str, tuple[float, float]]:
        return {t: (self.lo[t], self.hi[t]) for t in self.reduced if t in self.lo and np.isfinite(self.lo[t])}
