"""The float16 step: `qconvert float16`, and `--float16` after another method's step.

`qconvert.fp16` rewrites the graph; this step decides on data which nodes stay float32 beyond those that
must (`fp16.analyse`) and those the plan keeps:
1. range: the model runs in float32 with its float tensors exposed; a node that reads or makes a value
   past float16's largest / RANGE_MARGIN there stays float32 (in float16 it would be Inf);
2. drift: the float16 model runs on the same inputs; while an output is not finite or its SNR against the
   model before is under the plan's bound, the nodes whose own float16 rounding costs most (the largest
   drop from their inputs' SNR to their output's) stay float32 too, 1, 2, 4 ... more each round.
The inputs are the calibration data, else the validation data, else the seeded random validation inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx

from qconvert import fp16, io
from qconvert.drift import db, energies
from qconvert.errors import UnsupportedModelError
from qconvert.methods.base import weight_report
from qconvert.methods.common import Progress, Step
from qconvert.methods.float import FloatWeight
from qconvert.opset import default_opset
from qconvert.plan import Float16Plan, ValidationPlan
from qconvert.report import OpsetChange, WeightReport
from qconvert.runtime import Feeds, build_feeds, calibration_feeds, run_with_outputs, signature
from qconvert.select import MAIN_GRAPH, Skipped, Weight, constant_tensors, select_weights

RANGE_MARGIN = 2.0  # values seen up to half of float16's largest: unseen inputs may go further
ROUNDS = 6  # of the drift search: at most 1 + 2 + ... + 32 nodes kept for drift
MAX_BATCHES = 16
MIN_GAIN = 0.5  # dB: a search round that gains less is undone
ROUNDING_DB = 68.0  # dB: float16 rounding of a tensor (11 significant bits): what an exact input stands for


def step(
    model: onnx.ModelProto, plan: Float16Plan, progress: Progress, data: Path | None, validation: ValidationPlan | None
) -> Step:
    """`qconvert float16`: the model in float16, its weights reported as stored."""
    opset = default_opset(model)
    selection = select_weights(model, min_elements=1, exclude=())
    converted, details, warnings = halve(model, plan, progress, data, validation)
    weights, skipped = _weights(selection.weights, converted)
    return Step(
        converted,
        OpsetChange(opset, opset, "-"),
        weights,
        [*selection.skipped, *skipped],
        warnings,
        {"float16": details},
    )


def halve(
    model: onnx.ModelProto, plan: Float16Plan, progress: Progress, data: Path | None, validation: ValidationPlan | None
) -> tuple[onnx.ModelProto, dict[str, object], list[str]]:
    """The model in float16 where it holds on the data; what was kept float32 and why; warnings."""
    progress("float16: finding the ops that stay float32")
    if sum(io.data_bytes(t) for t in model.graph.initializer) > io.PROTOBUF_LIMIT:
        raise UnsupportedModelError("float16 takes models under 2 GB: its search runs the model from memory")
    io.materialize(model)  # the runs below serialize it
    graph = fp16.analyse(model)
    nodes = model.graph.node
    kept = dict(graph.fixed)
    kept |= {i: "kept by the plan" for i, n in enumerate(nodes) if i not in kept and plan.keeps(n.op_type, n.name)}
    feeds = _feeds(model, plan, data, validation)
    kept |= _out_of_range(graph, feeds, kept)
    kept, converted, casts, history = _search(graph, feeds, kept, plan, progress)
    reached = history[-1]
    warnings = []
    if reached is not None and reached < plan.target_snr:
        warnings.append(
            f"float16: outputs at {reached:.1f} dB against float32 on the search data, under the "
            f"{plan.target_snr:g} dB asked for, with {len(kept)} ops kept float32"
        )
    details: dict[str, object] = {
        "float16_ops": sum(1 for i, n in enumerate(nodes) if i not in kept and n.op_type not in fp16.SOURCES),
        "float32_ops": len(kept),
        "casts": casts,
        "keep_io_types": plan.keep_io_types,
        "target_snr_db": plan.target_snr,
        "search": {"samples": feeds.samples, "data": feeds.source, "snr_db": reached, "rounds_snr_db": history[:-1]},
        "kept_float32": [
            {"node": graph.label(i), "op": nodes[i].op_type, "reason": why} for i, why in sorted(kept.items())
        ],
    }
    return converted, details, warnings


def _search(
    graph: fp16.Graph, feeds: Feeds, kept: dict[int, str], plan: Float16Plan, progress: Progress
) -> tuple[dict[int, str], onnx.ModelProto, int, list[float | None]]:
    """While an output is under the target, keep float32 the nodes that drift most (and the float16 nodes
    that feed them: what reaches them was rounded there), more each round; a round that does not gain
    MIN_GAIN dB is undone and ends the search. The kept nodes, the model, its Casts, and the worst output SNR
    of each model tried, the one returned last (None: exact)."""
    converted, casts = fp16.convert(graph, kept, plan.keep_io_types)
    worst = _worst(graph, _errors(converted, graph, feeds, inside=False))
    history = [worst]
    producers = {out: i for i, node in enumerate(graph.model.graph.node) for out in node.output}
    for round_ in range(ROUNDS):
        if worst >= plan.target_snr:
            break
        progress(f"float16: outputs at {worst:.1f} dB, under {plan.target_snr:g}: keeping more ops float32")
        sums = _errors(converted, graph, feeds, inside=True)
        trial = dict(kept)
        for i, drop in _largest_drops(graph, sums, kept, 1 << round_):
            trial[i] = _why(drop)
            for x in graph.model.graph.node[i].input:
                feeder = producers.get(x)
                if feeder is not None and feeder not in trial and graph.half_outputs[feeder]:
                    trial[feeder] = f"feeds {graph.label(i)}, which drifts in float16"
        if len(trial) == len(kept):
            break
        trial_model, trial_casts = fp16.convert(graph, trial, plan.keep_io_types)
        history.append(_worst(graph, _errors(trial_model, graph, feeds, inside=False)))
        if history[-1] < worst + MIN_GAIN:
            break
        kept, converted, casts, worst = trial, trial_model, trial_casts, history[-1]
    return kept, converted, casts, [None if h == float("inf") else round(h, 2) for h in (*history, worst)]


def _worst(graph: fp16.Graph, sums: dict[str, tuple[float, float]]) -> float:
    return min((_snr(*sums[o.name]) for o in graph.model.graph.output if o.name in sums), default=float("inf"))


def _feeds(model: onnx.ModelProto, plan: Float16Plan, data: Path | None, validation: ValidationPlan | None) -> Feeds:
    path = plan.calibration or data
    feeds = (
        calibration_feeds(model, path, plan.preprocessing)
        if path is not None
        else build_feeds(signature(model), validation or ValidationPlan())
    )
    kept = feeds.batches[:MAX_BATCHES]
    samples = sum(len(next(iter(b.values()))) for b in kept) if kept and kept[0] else feeds.samples
    return Feeds(kept, min(samples, feeds.samples), feeds.source)


def _float_tensors(graph: fp16.Graph) -> list[str]:
    """The float tensors the graph's nodes make (not its constants), in order."""
    return [
        out
        for node in graph.model.graph.node
        if node.op_type not in fp16.SOURCES
        for out in node.output
        if graph.is_float(out)
    ]


def _out_of_range(graph: fp16.Graph, feeds: Feeds, kept: dict[int, str]) -> dict[int, str]:
    """The nodes that read or make a value past float16's range (with the margin) on the data."""
    names = _float_tensors(graph)
    largest = dict.fromkeys(names, 0.0)
    for values in run_with_outputs(graph.model, names, feeds, "input model"):
        for name, value in values.items():
            if value.size:
                largest[name] = max(largest[name], float(np.max(np.abs(value))))
    limit = fp16.HALF_MAX / RANGE_MARGIN
    found = {}
    for i, node in enumerate(graph.model.graph.node):
        peak = max((largest.get(x, 0.0) for x in (*node.input, *node.output)), default=0.0)
        if i not in kept and peak > limit:
            found[i] = f"sees values past float16's range on the data (|x| up to {peak:.3g})"
    return found


def _errors(
    converted: onnx.ModelProto, graph: fp16.Graph, feeds: Feeds, inside: bool
) -> dict[str, tuple[float, float]]:
    """(signal, error) energy of the float16 model's outputs (`inside`: and of every float tensor) against
    the model before."""
    outputs = [o.name for o in graph.model.graph.output if graph.is_float(o.name)]
    names = [*_float_tensors(graph), *outputs] if inside else outputs
    return energies(graph.model, converted, [*dict.fromkeys(names)], {}, feeds)


def _snr(signal: float, error: float) -> float:
    value = db(signal, error)
    return float("inf") if value is None else value


def _largest_drops(
    graph: fp16.Graph, sums: dict[str, tuple[float, float]], kept: dict[int, str], count: int
) -> list[tuple[int, float]]:
    """The `count` float16 nodes whose output's SNR falls furthest below their inputs' worst (inputs exact in
    float16 count as its rounding, ROUNDING_DB; a node whose output is not finite first of all)."""
    drops = []
    for i, node in enumerate(graph.model.graph.node):
        outs = [_snr(*sums[o]) for o in node.output if o in sums]
        if i in kept or not graph.half_outputs[i] or not outs:
            continue
        drop = min([_snr(*sums[x]) for x in node.input if x in sums] + [ROUNDING_DB]) - min(outs)
        if drop > 0:
            drops.append((i, drop))
    return sorted(drops, key=lambda d: -d[1])[:count]


def _why(drop: float) -> str:
    if not np.isfinite(drop):
        return "its float16 output is not finite"
    return f"drifts in float16 (its output's SNR falls {drop:.1f} dB below its inputs')"


def _weights(weights: Iterable[Weight], converted: onnx.ModelProto) -> tuple[list[WeightReport], list[Skipped]]:
    """Each weight as the float16 model stores it: float16 with its rounding's SNR, or float32 (skipped)."""
    stored = constant_tensors(converted.graph)
    reports, skipped = [], []
    for weight in weights:
        tensor = stored.get(weight.name)
        if weight.graph_path != MAIN_GRAPH or tensor is None or tensor.data_type != fp16.HALF:
            why = "read by an op that stays float32" if weight.graph_path == MAIN_GRAPH else "in a subgraph"
            skipped.append(Skipped(weight.name, weight.op_types, why, weight.shape))
            continue
        array = weight.array()
        half = onnx.numpy_helper.to_array(tensor)
        error = float(np.sum((array.astype(np.float64) - half) ** 2))
        snr = db(float(np.sum(array.astype(np.float64) ** 2)), error)
        item = FloatWeight(weight, half, None, 16)
        reports.append(weight_report(weight, array, item, groups=1, stored_bytes=half.nbytes, snr_db=snr, note=None))
    return reports, skipped
