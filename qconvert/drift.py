"""`qconvert debug`: which tensors of a converted model drift from the float one, and why.

The intermediate tensors of the two models are matched by name, as the converted model's consumers see
them: qconvert keeps every name through its rewrites (folded BatchNorm writes the BN's output, decoded
weights and DequantizeLinear outputs keep the tensor's name, bias-correcting Adds write the layer's
output); where a tensor reaches its consumers through QuantizeLinear -> DequantizeLinear under another
name (onnxruntime's quantizers), the DequantizeLinear output stands for it. Both models run on the data
with those tensors exposed, one batch at a time; each tensor gets its SNR against float, in graph order.
Where a node adds the most noise, it runs alone twice: on float's input with the converted model's weight
(and bias), and on the converted model's input with float's: the one that costs its output more SNR is the
cause, the weight's quantization or the activations' (what reaches the node). A node fused into another
in the converted model (a folded BatchNorm, a Relu absorbed into a quantized range) has no node of its own
there to run: its cause stays "unknown"; its SNR and jump are measured all the same.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qconvert import io
from qconvert.errors import UsageError
from qconvert.plan import ValidationPlan
from qconvert.runtime import Feeds, build_feeds, run_batches, session
from qconvert.select import constant_tensors

JUMPS = 5  # the largest SNR drops explained by restoring their weight or their input's quantization
MAX_SAMPLES = 8  # the runs keep the jump tensors of every sample: enough to rank, little memory


@dataclass(frozen=True)
class TensorDrift:
    name: str
    op_type: str  # of the node that makes it (in the float model)
    position: int  # the node's index in the float graph
    snr_db: float | None  # None: identical


@dataclass(frozen=True)
class Jump:
    tensor: str
    op_type: str
    input_snr_db: float | None  # the worst of the node's inputs
    snr_db: float | None
    weight_error_snr_db: float | None  # the node on float's input, with the converted parameters (None: none)
    input_error_snr_db: float | None  # the node on the converted input, with float's parameters
    cause: str  # "weight", "activation", "both" or "unknown"


@dataclass
class DebugReport:
    float_path: str
    converted_path: str
    samples: int
    source: str
    tensors: list[TensorDrift] = field(default_factory=list)
    jumps: list[Jump] = field(default_factory=list)
    unmatched: int = 0  # float tensors the converted model has no counterpart for


def debug(float_path: Path, converted_path: Path, validation: ValidationPlan, jumps: int = JUMPS) -> DebugReport:
    """Per-tensor drift of the converted model, in graph order, and the causes of its largest jumps."""
    reference, _ = io.load_model(float_path)
    converted, _ = io.load_model(converted_path)
    io.materialize(reference)
    io.materialize(converted)
    seen = _as_seen(converted)
    produced = {out for node in converted.graph.node for out in node.output}
    order = [
        (i, node, out)
        for i, node in enumerate(reference.graph.node)
        if node.op_type != "Constant"
        for out in node.output
        if out
    ]
    matched = [(i, node, out) for i, node, out in order if seen.get(out, out) in produced]
    if not matched:
        raise UsageError(f"{converted_path}: no intermediate tensor of {float_path} found in it by name")
    signature = session(str(float_path), "input model")
    batch = signature.get_inputs()[0].shape[0] if signature.get_inputs()[0].shape else None
    feeds = build_feeds(signature, validation)
    del signature
    if isinstance(batch, int) and batch > 1:  # a fixed batch size: whole batches, up to MAX_SAMPLES samples
        kept = feeds.batches[: max(1, MAX_SAMPLES // batch)]
        feeds = Feeds(kept, min(feeds.samples, len(kept) * batch), feeds.source)
    else:  # one sample per run
        feeds = _first_samples(feeds)
    names = [out for _, _, out in matched]
    sums = energies(reference, converted, names, seen, feeds)
    report = DebugReport(
        str(float_path), str(converted_path), feeds.samples, feeds.source, unmatched=len(order) - len(matched)
    )
    report.tensors = [TensorDrift(out, node.op_type, i, db(*sums[out])) for i, node, out in matched]
    snr = {t.name: t.snr_db for t in report.tensors}
    found = _largest_jumps(reference, [(n, o) for _, n, o in matched], snr, jumps)
    report.jumps = _explain(reference, converted, found, snr, seen, feeds)
    return report


def _largest_jumps(
    reference: onnx.ModelProto, matched: list[tuple[onnx.NodeProto, str]], snr: dict[str, float | None], count: int
) -> list[tuple[onnx.NodeProto, str, float | None]]:
    """The nodes that add the most noise-to-signal (their output's less their inputs'), with their inputs' SNR."""
    producers = {o: n for n in reference.graph.node for o in n.output}
    steps = []
    for node, out in matched:
        inputs = [x for name in node.input for x in _measured(name, snr, producers)]
        before = min(inputs, key=_rank) if inputs else None
        steps.append((_noise(snr[out]) - _noise(before), node, out, before))
    steps.sort(key=lambda s: -s[0])
    return [(node, out, before) for added, node, out, before in steps[:count] if added > 0]


def _measured(name: str, snr: dict[str, float | None], producers: dict[str, onnx.NodeProto]) -> list[float | None]:
    """The SNRs of the matched tensors a tensor comes from: itself, or through unmatched producers (a layer
    whose BatchNorm was folded into it) the tensors they read. Model inputs and constants give none."""
    if name in snr:
        return [snr[name]]
    producer = producers.get(name)
    if producer is None or producer.op_type == "Constant":
        return []
    return [x for source in producer.input for x in _measured(source, snr, producers)]


def _as_seen(model: onnx.ModelProto) -> dict[str, str]:
    """tensor -> the name its consumers read it by, where it passes Quantize -> DequantizeLinear first."""
    quantized = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    return {
        quantized[n.input[0]]: n.output[0]
        for n in model.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in quantized
    }


def _first_samples(feeds: Feeds) -> Feeds:
    """At most MAX_SAMPLES samples, one per batch: a run holds one sample's tensors of each model at a time
    (a model of a fixed batch size keeps its batches)."""
    singles = [
        {k: v[i : i + 1] for k, v in batch.items()}
        for batch in feeds.batches
        for i in range(len(next(iter(batch.values()))))
    ]
    kept = singles[: min(MAX_SAMPLES, feeds.samples)]
    labels = feeds.labels[: len(kept)] if feeds.labels is not None else None
    return Feeds(kept, len(kept), feeds.source, labels)


def _exposed(model: onnx.ModelProto, names: list[str]) -> bytes:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    known = {o.name for o in copy.graph.output}
    copy.graph.output.extend(
        onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(names) if n not in known
    )
    return copy.SerializeToString()


def _runs(model: onnx.ModelProto, names: list[str], feeds: Feeds, what: str) -> list[dict[str, np.ndarray]]:
    sess = session(_exposed(model, names), what)
    return [dict(zip(names, out)) for out in run_batches(sess, feeds, what, output_names=list(dict.fromkeys(names)))]


def energies(
    reference: onnx.ModelProto, converted: onnx.ModelProto, names: list[str], seen: dict[str, str], feeds: Feeds
) -> dict[str, tuple[float, float]]:
    """Per tensor: (signal, error) energy over the samples, one batch of both models at a time."""
    sums = {n: (0.0, 0.0) for n in names}
    seen_names = [seen.get(n, n) for n in names]
    float_sess = session(_exposed(reference, names), "input model")
    converted_sess = session(_exposed(converted, seen_names), "converted model")
    for batch in feeds.batches:
        one = Feeds([batch], 1, feeds.source)
        ours = next(run_batches(float_sess, one, "input model", output_names=names))
        theirs = next(run_batches(converted_sess, one, "converted model", output_names=seen_names))
        for name, a, b in zip(names, ours, theirs):
            signal, error = sums[name]
            a64 = np.asarray(a, np.float64)
            diff = a64 - np.asarray(b, np.float64) if np.shape(a) == np.shape(b) else np.full(1, np.inf)
            sums[name] = (signal + float(np.sum(a64 * a64)), error + float(np.sum(diff * diff)))
    return sums


@dataclass
class _Attribution:
    """What running a jump's node alone takes: its data inputs, and its parameters in each model (the
    converted model's either as initializers, or as tensors its graph makes: decoded, dequantized)."""

    node: onnx.NodeProto
    data: list[str]
    float_params: dict[str, np.ndarray]
    fixed: dict[str, np.ndarray]
    exposed: dict[str, str]  # float input name -> the converted tensor that computes it


def _explain(
    reference: onnx.ModelProto,
    converted: onnx.ModelProto,
    found: list[tuple[onnx.NodeProto, str, float | None]],
    snr: dict[str, float | None],
    seen: dict[str, str],
    feeds: Feeds,
) -> list[Jump]:
    """Each jump's node alone, twice: on float's input with the converted model's parameters (the weight's
    error), and on the converted model's input with float's parameters (the input's quantization); the one
    that costs the output more SNR is the cause. One run of each model gives what all the jumps need."""
    float_constants, converted_constants = constant_tensors(reference.graph), constant_tensors(converted.graph)
    producers = {o: n for n in converted.graph.node for o in n.output}
    computed = set(producers) | {i.name for i in converted.graph.input}
    attributions: dict[str, _Attribution] = {}
    ready: dict[str, Jump] = {}
    for node, out, before in found:
        layer = _producer(producers, out, seen)
        data = [x for x in node.input if x and x not in float_constants]
        params = {x: io.tensor_array(float_constants[x]) for x in node.input if x in float_constants}
        missing = any(seen.get(x, x) not in computed for x in data)  # absorbed there (a Relu's input ...)
        if layer is None or len(layer.input) != len(node.input) or not data or missing:  # or fused into another node
            ready[out] = Jump(out, node.op_type, before, snr[out], None, None, "unknown")
        elif not params:  # no parameters: only what reaches the node can be the cause
            ready[out] = Jump(out, node.op_type, before, snr[out], None, snr[out], "activation")
        else:
            pairs = [(x, y) for x, y in zip(node.input, layer.input) if x in params]
            fixed = {x: io.tensor_array(converted_constants[y]) for x, y in pairs if y in converted_constants}
            exposed = {x: y for x, y in pairs if y not in converted_constants}
            attributions[out] = _Attribution(node, data, params, fixed, exposed)
    float_names = [*{x: None for out, a in attributions.items() for x in (*a.data, out)}]
    converted_names = [
        *{x: None for a in attributions.values() for x in (*(seen.get(d, d) for d in a.data), *a.exposed.values())}
    ]
    float_runs = _runs(reference, float_names, feeds, "input model") if attributions else []
    converted_runs = _runs(converted, converted_names, feeds, "converted model") if attributions else []
    return [
        ready[out]
        if out in ready
        else _attributed(attributions[out], out, before, snr[out], float_runs, converted_runs, seen, reference)
        for _, out, before in found
    ]


def _attributed(
    a: _Attribution,
    out: str,
    before: float | None,
    after: float | None,
    float_runs: list[dict[str, np.ndarray]],
    converted_runs: list[dict[str, np.ndarray]],
    seen: dict[str, str],
    reference: onnx.ModelProto,
) -> Jump:
    weight_only = [
        {**{x: run[x] for x in a.data}, **a.fixed, **{x: c[y] for x, y in a.exposed.items()}}
        for run, c in zip(float_runs, converted_runs)
    ]
    input_only = [{**{x: c[seen.get(x, x)] for x in a.data}, **a.float_params} for c in converted_runs]
    truth = [run[out] for run in float_runs]
    weight_snr = db(*_energy(truth, _single(a.node, weight_only, reference)))
    input_snr = db(*_energy(truth, _single(a.node, input_only, reference)))
    weight_noise, input_noise = _noise(weight_snr), _noise(input_snr)
    cause = "unknown"
    if max(weight_noise, input_noise) > 0:
        ratio = min(weight_noise, input_noise) / max(weight_noise, input_noise)
        cause = "both" if ratio > 0.5 else ("weight" if weight_noise > input_noise else "activation")
    return Jump(out, a.node.op_type, before, after, weight_snr, input_snr, cause)


def _producer(producers: dict[str, onnx.NodeProto], out: str, seen: dict[str, str]) -> onnx.NodeProto | None:
    """The converted model's node that computes `out` (before any Quantize/DequantizeLinear after it)."""
    node = producers.get(seen.get(out, out))
    while node is not None and node.op_type in ("DequantizeLinear", "QuantizeLinear"):
        node = producers.get(node.input[0])
    return node


def _single(node: onnx.NodeProto, feeds: list[dict[str, np.ndarray]], model: onnx.ModelProto) -> list[np.ndarray]:
    """The node alone on each feed (its inputs by their names)."""
    names = [x for x in node.input if x]
    inputs = [
        onnx.helper.make_tensor_value_info(x, onnx.helper.np_dtype_to_tensor_dtype(feeds[0][x].dtype), None)
        for x in names
    ]
    graph = onnx.helper.make_graph([node], "node", inputs, [onnx.helper.make_empty_tensor_value_info(node.output[0])])
    alone = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sess = session(alone.SerializeToString(), "node")
    return [sess.run([node.output[0]], {x: feed[x] for x in names})[0] for feed in feeds]


def _energy(truth: list[np.ndarray], found: list[np.ndarray]) -> tuple[float, float]:
    signal = sum(float(np.sum(np.asarray(t, np.float64) ** 2)) for t in truth)
    error = sum(float(np.sum((np.asarray(t, np.float64) - f) ** 2)) for t, f in zip(truth, found))
    return signal, error


def db(signal: float, error: float) -> float | None:
    if error == 0:
        return None
    if not np.isfinite(error):
        return float("-inf")
    return 10.0 * float(np.log10(signal / error)) if signal > 0 else float("-inf")


def _noise(snr: float | None) -> float:
    """Noise-to-signal power ratio (0: identical)."""
    return 0.0 if snr is None else 10 ** (-snr / 10) if np.isfinite(snr) else float("inf")


def _rank(snr: float | None) -> float:
    """None (identical) ranks as the best SNR there is."""
    return 1e9 if snr is None else snr


def to_dict(report: DebugReport) -> dict[str, object]:
    """The report as JSON takes it (non-finite SNRs as null)."""
    data = dataclasses.asdict(report)
    for row in (*data["tensors"], *data["jumps"]):
        for key, value in row.items():
            if isinstance(value, float) and not np.isfinite(value):
                row[key] = None
    return data
