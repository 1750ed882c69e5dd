"""Activation ranges from calibration data: one onnxruntime pass, bounded memory per tensor."""

from __future__ import annotations

from functools import partial

import numpy as np
import onnx
from onnx import helper

from qconvert.plan import CalibrationMethod
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
    """Range [lo, hi] of each named float tensor over the calibration feeds (its min/max, or percentiles).

    Min/max are reduced in the graph. For percentiles the tensors are fetched, a section of the model
    at a time (`Sections`), and each batch adds a bounded random sample of its values.
    """
    if method is CalibrationMethod.MINMAX:
        return _min_max(model, tensors, feeds)
    wanted = list(dict.fromkeys(tensors))
    samples: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
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
            samples[name].append(rngs[name].choice(flat, size=take, replace=False) if take < flat.size else flat.copy())
    ranges = {}
    for name, sample in samples.items():
        if not sample:
            continue
        values = np.concatenate(sample)
        ranges[name] = (float(np.percentile(values, 100 - percentile)), float(np.percentile(values, percentile)))
    return ranges


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
