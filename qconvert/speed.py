"""`--optimize speed` (full QDQ): which layers run integer kernels, chosen by measured latency.

An integer kernel pays for itself where a layer does enough arithmetic; a small layer (a squeeze-excite
block's 1x1 convolutions, a depthwise kernel) between float ops costs a Quantize and a Dequantize for little
gain, and onnxruntime's float kernels fuse the activation after it. The candidates keep families of layers
float (their weights decoded from the same integers by ops that onnxruntime folds at load, so every layer
computes what it did): none, the small ones, the depthwise ones, both, all but 1x1 convolutions and matrix
products, all (the weights-only model, as fast as float: the choice where no integer kernel pays). Each
candidate's worst output SNR on the held-out calibration samples must be within TOLERANCE_DB of the full
plan's, or the noise it adds NEGLIGIBLE_DB below the outputs (at 55 dB, a few dB are chance). Of those, the
one with the lowest median latency (one thread, the candidates' runs taking turns) is kept if it beats the
full plan by MARGIN. The choice depends on the machine's timings: the report lists every candidate's, and
`--exclude` with the floated weights keeps the same layers float without measuring (their weights then keep
their original values).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from qconvert import qdq
from qconvert.runtime import Feeds, model_session
from qconvert.select import MAIN_GRAPH, Weight
from qconvert.validate import medians, worst_snr

SMALL = 4096  # weights below this many elements count as small layers
TOLERANCE_DB = 0.5
NEGLIGIBLE_DB = 50.0
RUNS = 20  # timed runs of each candidate
MARGIN = 0.05  # a candidate must be this much faster than the full plan to be kept (the rest is noise)


def _small(weight: Weight) -> bool:
    return weight.elements < SMALL


def _spatial(weight: Weight) -> bool:
    return len(weight.shape) == 4 and weight.shape[2] * weight.shape[3] > 1


FAMILIES: dict[str, Callable[[Weight], bool]] = {
    "none": lambda _: False,
    "small": _small,
    "depthwise": lambda w: w.depthwise,
    "small and depthwise": lambda w: _small(w) or w.depthwise,
    "all but 1x1 and matrix products": _spatial,
    "all": lambda _: True,  # weights-only: where no integer kernel pays for its Quantize and Dequantize
}


def choose(
    model: onnx.ModelProto,
    weights: dict[str, qdq.LinearWeight],
    insert: Callable[[onnx.ModelProto, dict[str, qdq.LinearWeight]], None],
    held: Feeds,
    reference: list[np.ndarray],
) -> tuple[set[str], dict[str, object]]:
    """The weights whose layers stay float, and what was measured. `model` has its weights encoded;
    `insert` puts the quantized activations around a candidate's integer layers."""
    candidates: dict[str, set[str]] = {}
    for family, floats in FAMILIES.items():
        floated = {n for n, item in weights.items() if item.weight.graph_path == MAIN_GRAPH and floats(item.weight)}
        if floated not in candidates.values():
            candidates[family] = floated
    built = {family: candidate(model, weights, floated, insert) for family, floated in candidates.items()}
    snr = {family: _worst_snr(trial, held, reference) for family, trial in built.items()}
    feed = {k: v[:1] for k, v in held.batches[0].items()}
    sessions = {family: model_session(trial, "candidate", threads=1) for family, trial in built.items()}
    times = medians(sessions, feed, RUNS)
    floor = _floor(snr["none"])
    kept = min((f for f in candidates if _rank(snr[f]) >= floor), key=lambda f: times[f])
    if times[kept] > (1 - MARGIN) * times["none"]:  # within the timings' noise: every layer quantized
        kept = "none"
    measured = [
        {"float": f, "layers_float": len(candidates[f]), "ms": round(times[f], 3), "snr_db": snr[f]} for f in candidates
    ]
    details: dict[str, object] = {"chosen": kept, "floated": sorted(candidates[kept]), "candidates": measured}
    return candidates[kept], details


def candidate(
    model: onnx.ModelProto,
    weights: dict[str, qdq.LinearWeight],
    floated: set[str],
    insert: Callable[[onnx.ModelProto, dict[str, qdq.LinearWeight]], None],
) -> onnx.ModelProto:
    """A copy of the encoded model with these weights' layers float and the others' activations quantized."""
    trial = onnx.ModelProto()
    trial.CopyFrom(model)
    qdq.decode_at_load(trial, {n: weights[n] for n in floated})
    insert(trial, {n: item for n, item in weights.items() if n not in floated})
    return trial


def _worst_snr(model: onnx.ModelProto, held: Feeds, reference: list[np.ndarray]) -> float | None:
    """None: exact."""
    snr = worst_snr(model, held, reference, "candidate")
    return None if snr is None else round(float(snr), 3)


def _floor(full: float | None) -> float:
    """The worst SNR that keeps the full plan's fidelity: its noise TOLERANCE_DB louder, plus NEGLIGIBLE_DB's."""
    if full is None:
        return np.inf
    noise = 10 ** (-(full - TOLERANCE_DB) / 10) + 10 ** (-NEGLIGIBLE_DB / 10)
    return float(-10 * np.log10(noise))


def _rank(snr: float | None) -> float:
    return np.inf if snr is None else snr
