"""What the driver and the techniques share: the Step it returns, how weights are picked and vetted, threads."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx

from qconvert.errors import UnsupportedModelError
from qconvert.plan import Granularity, KMeansPlan, LayerSetting, Plan, layer_setting
from qconvert.report import Histogram, OpsetChange, WeightReport
from qconvert.select import Selection, Skipped, Weight, select_weights

Progress = Callable[[str], None]
PARALLEL_MIN_ELEMENTS = 1 << 21  # weights below which a second thread gains nothing
Result = TypeVar("Result")


def in_order(
    compute: Callable[..., Result], jobs: Iterable[tuple[object, ...]], workers: int, elements: int
) -> Iterator[Result]:
    """compute(*job) for each job, in order. Over `elements` ≥ PARALLEL_MIN_ELEMENTS weights, a thread per
    worker (numpy releases the GIL in the heavy parts; threads share the weights instead of copying them
    into processes), with at most `workers` jobs in flight so memory stays bounded. The results do not
    depend on the number of workers."""
    if workers < 2 or elements < PARALLEL_MIN_ELEMENTS:
        for job in jobs:
            yield compute(*job)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        in_flight: deque[Future[Result]] = deque()
        for job in jobs:
            in_flight.append(pool.submit(compute, *job))
            if len(in_flight) >= workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


@dataclass
class Step:
    """What a method's step did to the model (in place, or a converted copy in `model`)."""

    model: onnx.ModelProto
    opset: OpsetChange
    weights: list[WeightReport]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)


def select(model: onnx.ModelProto, plan: Plan) -> Selection:
    """The weights to quantize: selection minus those a layer override skips (reported as skipped); with
    `--small-weights int8`, a k-means plan's small weights too (`small_setting`)."""
    smallest = 1 if isinstance(plan, KMeansPlan) and plan.small_weights == "int8" else plan.min_elements
    selection = select_weights(model, min_elements=smallest, exclude=plan.exclude)
    kept = []
    for weight in selection.weights:
        if layer_setting(plan, weight.name).skip:
            selection.skipped.append(Skipped(weight.name, weight.op_types, "skipped by a layer override", weight.shape))
        else:
            kept.append(weight)
    selection.weights = kept
    return selection


def small_setting(plan: Plan, weight: Weight) -> LayerSetting:
    """How a weight is quantized (`layer_setting`); in a k-means plan, one under --min-elements that no layer
    override names is too small for a palette (its codebook and decode nodes would outweigh its indices): with
    `--small-weights int8` it takes int8 DequantizeLinear."""
    setting = layer_setting(plan, weight.name)
    if (
        isinstance(plan, KMeansPlan)
        and plan.small_weights == "int8"
        and weight.elements < plan.min_elements
        and not any(o.applies_to(weight.name) for o in plan.overrides)
    ):
        return LayerSetting("linear", 8, Granularity.AUTO, setting.skip, True)
    return setting


def finite(weights: list[Weight], skipped: list[Skipped]) -> list[Weight]:
    """The weights without NaN/Inf; the others join `skipped`."""
    kept = []
    for weight in weights:
        if np.isfinite(weight.array()).all():
            kept.append(weight)
        else:
            skipped.append(Skipped(weight.name, weight.op_types, "contains NaN or Inf", weight.shape))
    return kept


def require_weights(items: Sequence[object], skipped: list[Skipped]) -> None:
    if not items:
        reasons = (
            "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3])
            or "no Conv, ConvTranspose, Gemm, MatMul or RNN reads a constant weight"
        )
        raise UnsupportedModelError(f"nothing to quantize ({reasons})")


def fold_pays(
    array: np.ndarray,
    factor: np.ndarray,
    axis: int,
    quantize: Callable[[np.ndarray], np.ndarray],
    importance: np.ndarray | None,
) -> bool:
    """Whether to fold a BatchNorm factor f (per channel along `axis`) into a weight before quantizing it.

    Folded, the layer computes Q(f·W); kept, f·Q(W). Folding saves the BN op, but one codebook or
    scale for the whole tensor fits f·W worse when f varies between channels: channels with a large f
    take the centroids and the others lose them. Compared on the mean over output channels of the
    relative (importance-weighted) error, so that no channel's scale decides for the others; a tie folds.
    """
    shape = [1] * array.ndim
    shape[axis] = -1
    w = array.astype(np.float64)
    folded = (w * factor.reshape(shape)).astype(array.dtype)
    h = np.ones_like(w) if importance is None else np.broadcast_to(importance, w.shape)
    others = tuple(a for a in range(w.ndim) if a != axis)

    def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
        signal = np.sum(h * reference.astype(np.float64) ** 2, axis=others)
        error = np.sum(h * (reference.astype(np.float64) - approximation) ** 2, axis=others)
        return float(np.mean(error / np.where(signal > 0, signal, 1.0)))

    return relative_error(folded, quantize(folded)) <= relative_error(w, quantize(array))
