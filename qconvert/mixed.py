"""qconvert auto: per-layer sensitivity, then the smallest mix of methods and bit widths that meets a target.

1. Sensitivity: one onnxruntime probe adds seeded noise of known power after each layer, a different
   layer per batch slot, so a single batched run measures how much of a layer's output noise reaches
   the model's outputs (its gain).
2. Candidates per weight (k-means at each bit width, per tensor and per channel; linear int4/int8;
   float): file size, and output noise predicted as gain × the layer's noise, which is estimated from
   the weight error weighted by the energy of the input each weight multiplies (on samples of the
   weight, so that all widths cost seconds).
3. Allocation: a Lagrangian knapsack picks per weight the candidate minimising size + λ·noise, with λ
   bisected until the predicted output SNR meets the target, and single weights then take smaller
   candidates while the prediction still fits; then the plan is converted and validated, and the aim
   moved while the measured result misses the target or beats it by a wide margin.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import io, runtime
from qconvert.fidelity import bias, checks, statistics
from qconvert.gates import Gates
from qconvert.methods import METHODS
from qconvert.methods.base import file_bytes, opset_for
from qconvert.methods.common import Progress, select
from qconvert.methods.kmeans import overhead_bits
from qconvert.opset import Reach, hole, without_weights
from qconvert.pipeline import Conversion
from qconvert.plan import AutoPlan, Granularity, KMeansPlan, LayerOverride, LayerSetting, ValidationPlan
from qconvert.quant.kmeans import nearest, palettize
from qconvert.quant.layout import from_rows, to_rows
from qconvert.quant.linear import dequantize, grid_for, quantize
from qconvert.rewrite import NameSource, add_after
from qconvert.select import Weight, select_weights

PROBE_BITS = (4, 2)  # the gains are measured with each layer's error at these k-means widths
GAIN_SAMPLES = 32  # samples the gains are averaged over, at most
GAIN_BUDGET = 1 << 24  # weights × samples × widths of the sensitivity probes (ResNet-50: 1 sample, 1 width)
SLOT_BUDGET = 3 << 29  # weights × probe slots: each layer gets a slot of its own, up to this (ResNet-50: all 54)
SLOTS = 16  # layers probed per batched run
FIT_VALUES = 1 << 14  # per tensor: values the k-means codebooks of the estimates are fitted on
ROW_VALUES = 4096  # per channel: values per row
EVAL_CHANNELS = 32  # output channels of a weight the options are measured on
MAX_ITERATIONS = 5  # conversions a search may try (two fewer past GAIN_BUDGET weights: ResNet-50 stays under a minute)
STEP_DB = 0.5  # the resolution of the search: predictions are good to about this much at 4-8 bits
TOP1_START_DB, TOP1_STEP_DB = 20.0, 4.0  # accuracy targets: the SNR aimed at first, and each step up


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


@dataclass
class Profile:
    """Per weight, the options to choose from, and the measured gain of its layer."""

    options: dict[str, list[Option]]
    gains: dict[str, float]  # the larger of the measured gains
    elements: dict[str, int]  # weights per tensor


def profile(model: onnx.ModelProto, plan: AutoPlan, validation: ValidationPlan, progress: Progress) -> Profile:
    """Gains of every layer and the options of every weight, with their predicted output noise."""
    selection = select(model, _base_plan(plan, ()))
    weights = [w for w in selection.weights if np.isfinite(w.array()).all()]
    feeds = runtime.build_feeds(runtime.signature(model), validation)
    # Work grows with model size × samples × probe widths: small models get more of both.
    elements = max(sum(w.elements for w in weights), 1)
    widths = PROBE_BITS if elements * len(PROBE_BITS) <= GAIN_BUDGET else PROBE_BITS[:1]
    count = int(np.clip(GAIN_BUDGET // (elements * len(widths)), 1, GAIN_SAMPLES))
    singles = [{k: v[i : i + 1] for k, v in batch.items()} for batch in feeds.batches for i in range(len(next(iter(batch.values()))))]
    samples = runtime.Feeds(singles[:count], len(singles[:count]), feeds.source)
    layers = statistics.find_layers(model, weights)
    moments = statistics.input_moments(model, layers, samples).moments if layers else {}
    layers = {n: layer for n, layer in layers.items() if n in moments}
    # Layers that share a slot share a gain: one blended over a few layers misleads the allocation (on
    # ResNet-50 per-layer predictions were off by up to 10× with 16 slots), so resolution comes first.
    groups = max(min(SLOT_BUDGET // elements, len(layers)), SLOTS)
    estimates = {n: _noise_estimate(w, layers[n], moments[n]) for w in weights if (n := w.name) in layers}
    # The conversions correct biases wherever that measures better: the probes and the predictions then
    # leave out the mean error (its gain differs from the rest's: ReLUs and normalizations see it differently).
    corrected = {n: plan.bias_correction and (plan.calibration or validation.data) is not None and layer.bias_editable
                 for n, layer in layers.items()}
    progress(f"measuring the sensitivity of {len(layers)} layers on {count} samples")
    rng = np.random.default_rng(0)
    points: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
    calibration: dict[str, float] = {}  # measured / estimated layer noise, at the first width
    for bits in widths:  # noise grows faster than linearly through a network once it is large
        arrays = {w.name: w.array() for w in weights if w.name in layers}
        perturbed = {name: _kmeans(array, bits, rng) for name, array in arrays.items()}  # Ŵ
        shifts = {name: shift for name in layers if corrected[name] and
                  (shift := bias.bias_shift(layers[name], moments[name], arrays[name], perturbed[name])) is not None}
        for name, point in noise_gains(model, layers, samples, perturbed, groups, shifts).items():
            points[name].append(point)
            if name not in calibration:
                estimate = estimates[name](arrays[name], perturbed[name], None, name in shifts)
                calibration[name] = point[0] / estimate if estimate > 0 else 0.0
        del arrays, perturbed
    gains = {name: _gain_curve(p) for name, p in points.items()}
    worst_gain = max((max(g for _, g in p) for p in points.values()), default=1.0)
    options: dict[str, list[Option]] = {}
    reach = Reach(model)
    for i, weight in enumerate(weights):
        progress(f"estimating options {i + 1}/{len(weights)}: {weight.name}")
        array = weight.array()
        options[weight.name] = [Option("float", 32, Granularity.PER_TENSOR, array.nbytes, 0.0)]
        axis = weight.channel_axis
        channels = None
        if axis is not None and weight.shape[axis] > EVAL_CHANNELS:  # a seeded subset of output channels stands for all
            channels = np.sort(rng.choice(weight.shape[axis], EVAL_CHANNELS, replace=False))
        part = array if channels is None else np.take(array, channels, axis)
        for option, approx in _options(weight, array, plan, rng, channels, reach):
            if weight.name in layers:  # the layer's noise ratio, estimated and calibrated, times its gain there
                ratio = calibration[weight.name] * estimates[weight.name](part, approx, channels, corrected[weight.name])
                noise = gains[weight.name](ratio) * ratio
            else:  # no layer to measure (subgraphs, RNNs, shared weights): the weight's own error ratio, worst gain
                error = float(np.sum((part.astype(np.float64) - approx) ** 2))
                noise = worst_gain * error / max(float(np.sum(part.astype(np.float64) ** 2)), 1e-30)
            options[weight.name].append(dataclasses.replace(option, noise=noise))
    return Profile(options, {name: max(g for _, g in p) for name, p in points.items()}, {w.name: w.elements for w in weights})


def _noise_estimate(weight: Weight, layer: statistics.Layer, moments: statistics.Moments) -> Callable[..., float]:
    """(original, quantized[, output channels they hold][, corrected]) -> a number proportional to the
    layer's output noise: Σ Var[x]·ΔW² plus the squared mean error (Σ E[x]·ΔW)² per output channel,
    which bias correction (`corrected`) removes. The constant (the output's power, input correlations)
    is calibrated against one measured perturbation per layer; a subset of output channels stands for
    all of them."""
    spread = statistics.per_weight(layer, np.maximum(moments.square - moments.mean**2, 0.0), weight.shape)
    centre = statistics.per_weight(layer, moments.mean, weight.shape)
    variance = np.broadcast_to(1.0 if spread is None else spread, weight.shape)  # unknown layout: plain weight error
    mean = np.broadcast_to(0.0 if centre is None else centre, weight.shape)
    alpha = next((a.f for a in layer.node.attribute if a.name == "alpha"), 1.0) if layer.op_type == "Gemm" else 1.0
    others = tuple(a for a in range(len(weight.shape)) if a != layer.out_axis)

    def estimate(original: np.ndarray, quantized: np.ndarray, channels: np.ndarray | None = None, corrected: bool = False) -> float:
        delta = original.astype(np.float64) - quantized
        var, mu = (variance, mean) if channels is None else (np.take(variance, channels, layer.out_axis), np.take(mean, channels, layer.out_axis))
        shift = 0.0 if corrected else float(np.sum((alpha * np.sum(delta * mu, axis=others)) ** 2))
        scale = 1.0 if channels is None else weight.shape[layer.out_axis] / channels.size
        return scale * (float(np.sum(var * delta * delta)) + shift)

    return estimate


def _gain_curve(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """Gain as a function of the layer's noise ratio: log-linear between the measured points, flat beyond."""
    points = sorted(p for p in points if p[0] > 0 and p[1] > 0)
    if not points:
        return lambda _: 0.0
    ratios, gains = np.log([r for r, _ in points]), np.log([g for _, g in points])
    return lambda ratio: float(np.exp(np.interp(np.log(max(ratio, 1e-30)), ratios, gains)))


def noise_gains(model: onnx.ModelProto, layers: dict[str, statistics.Layer], samples: runtime.Feeds,
                perturbed: dict[str, np.ndarray], groups: int,
                shifts: dict[str, np.ndarray] | None = None) -> dict[str, tuple[float, float]]:
    """Per layer: the layer's own noise-to-signal ratio with the weights of `perturbed` (a quantized
    version of each layer's weight) and its bias shift from `shifts` if any (bias correction), and the
    gain (the model output's ratio over the layer's), on `samples` (one sample per batch). With fewer
    `groups` than layers, consecutive layers share a slot and a gain (their noise together over their
    noise ratios summed).

    The perturbation's own output conv(x, Ŵ − W) (+ shift) is added after the layer, masked to one batch slot
    per layer, so one batched run measures SLOTS layers. Quantization noise, unlike white noise, has
    the same pattern at every position of the layer's output, so it survives pooling: the gain must be
    measured with noise of that kind.
    """
    names = list(layers)
    if not names:
        return {}
    shifts = shifts or {}
    own = checks.layer_snr(model, [checks.Candidate(layers[n], perturbed[n], shifts.get(n)) for n in names], samples)
    weights = {w.name: w for w in select_weights(model).weights}
    deltas = {n: perturbed[n] - weights[n].array() for n in names}  # Ŵ − W: the error the quantized layer adds
    outputs = scored_outputs(model)
    ys = [layers[n].node.output[0] for n in names]
    references, ranks = [], {}
    for result in runtime.run_with_outputs(model, [*outputs, *ys], samples, "input model"):
        references.append([result[o].astype(np.float64) for o in outputs])
        ranks = {name: result[y].ndim for name, y in zip(names, ys)}
    probe, masks, picks, arrays = _noise_probe(model, layers, deltas, shifts, ranks)
    del deltas
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in outputs if name not in known)
    sess = runtime.model_session(model, "model for the sensitivity probe", skeleton=probe, replaced=arrays, probe=True)
    del probe, arrays
    slots = 1 if _fixed_batch(model) else SLOTS
    units = [list(u) for u in np.array_split(np.array(names, dtype=object), min(groups, len(names)))]
    ratios = {name: 10 ** (-snr / 10) if snr is not None else 0.0 for name, snr in zip(names, own)}
    output_error, signal = [0.0] * len(units), 0.0  # pooled over the samples, as the layer ratios are
    for feed, reference in zip(samples.batches, references):
        signal += sum(float(np.sum(r * r)) for r in reference)
        for start in range(0, len(units), slots):
            chunk = units[start : start + slots]
            run = {k: np.repeat(v, len(chunk), axis=0) for k, v in feed.items()}
            for name in names:
                run[masks[name]] = np.zeros((len(chunk), *([1] * (ranks[name] - 1))), np.float32)
                run[picks[name]] = np.zeros(1, np.int64)
            for slot, unit in enumerate(chunk):
                for name in unit:
                    run[masks[name]][slot] = 1.0
                    run[picks[name]][0] = slot
            noisy = sess.run(outputs, run)
            for slot in range(len(chunk)):
                error = sum(float(np.sum((n[slot : slot + 1].astype(np.float64) - r) ** 2)) for n, r in zip(noisy, reference))
                output_error[start + slot] += error
    measured = {}
    for unit, error in zip(units, output_error):
        total = sum(ratios[name] for name in unit)
        for name in unit:
            measured[name] = ratios[name], error / max(signal, 1e-30) / total if total > 0 else 0.0
    return measured


def scored_outputs(model: onnx.ModelProto) -> list[str]:
    """The tensors whose noise the gains measure: the model's outputs, but the scores before a final
    Softmax. Saturated probabilities hide small noise and then flip: noise adds up at the scores, not
    after them (a MobileNetV3 with a Softmax output: predictions there were 24 dB too optimistic)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    scored = []
    for output in model.graph.output:
        node = producers.get(output.name)
        scored.append(node.input[0] if node is not None and node.op_type == "Softmax" else output.name)
    return scored


def _noise_probe(model: onnx.ModelProto, layers: dict[str, statistics.Layer], deltas: dict[str, np.ndarray], shifts: dict[str, np.ndarray],
                 ranks: dict[str, int]) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str], dict[str, np.ndarray]]:
    """A skeleton of the model with y + mask·(layer(x[slot]; Ŵ − W) + shift) after each layer, mask a new
    [batch, 1, ...] input and slot a new [1] input (the batch slot the layer's noise goes to: its error
    is computed for that sample alone); the masks' and slots' names; the arrays of its new initializers."""
    probe = without_weights(model)
    graph, fresh = probe.graph, NameSource(probe)
    masks: dict[str, str] = {}
    picks: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    additions: dict[str, tuple[str | None, list[onnx.NodeProto]]] = {}
    for name, layer in layers.items():
        y = layer.node.output[0]
        delta = fresh(f"{name}_qc_delta")
        arrays[delta] = deltas[name].astype(np.float32)
        graph.initializer.append(hole(delta, arrays[delta]))
        noise, mask, slot, sample, clean, scaled = (fresh(f"{y}_qc_{part}") for part in ("noise", "mask", "slot", "sample", "clean", "scaled"))
        graph.input.append(helper.make_tensor_value_info(mask, onnx.TensorProto.FLOAT, ["batch", *([1] * (ranks[name] - 1))]))
        graph.input.append(helper.make_tensor_value_info(slot, onnx.TensorProto.INT64, [1]))
        batch_axis = 1 if layer.op_type == "Gemm" and layer.x_axis == 0 else 0  # Gemm's transA: x is [K, batch]
        pick = helper.make_node("Gather", [layer.node.input[0], slot], [sample], axis=batch_axis)
        nodes = [pick, checks.layer_copy(layer.node, delta, noise, fresh, bias=False)]  # the weight's error alone
        nodes[1].input[0] = sample
        if name in shifts:  # its mean removed, as bias correction does
            shift, error = fresh(f"{name}_qc_shift"), noise
            arrays[shift] = bias.output_layout(layer, shifts[name]).astype(np.float32)
            graph.initializer.append(numpy_helper.from_array(arrays[shift], shift))
            noise = fresh(f"{y}_qc_corrected")
            nodes.append(helper.make_node("Add", [error, shift], [noise]))
        additions[y] = (clean, [*nodes, helper.make_node("Mul", [mask, noise], [scaled]), helper.make_node("Add", [clean, scaled], [y])])
        masks[name], picks[name] = mask, slot
    add_after(graph, additions)
    return probe, masks, picks, arrays


def _fixed_batch(model: onnx.ModelProto) -> bool:
    """Whether some input's first dimension is a fixed number (then one layer is probed per run)."""
    initializers = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in initializers and dims and dims[0].HasField("dim_value"):
            return True
    return False


def _options(weight: Weight, array: np.ndarray, plan: AutoPlan, rng: np.random.Generator,
             channels: np.ndarray | None, reach: Reach) -> list[tuple[Option, np.ndarray]]:
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
        fit = _sample(fitted.shape[1], FIT_VALUES if row_axis is None else ROW_VALUES, rng)
        rows = to_rows(part, row_axis)
        for bits in plan.bits:
            if row_axis is not None and overhead_bits(weight, bits, row_axis) > plan.max_codebook_overhead:
                continue
            setting = LayerSetting("kmeans", bits, granularity, False)
            opset = opset_for(reach, METHODS["kmeans"].need(weight, setting, row_axis))
            assert opset is not None  # indices can always be stored as uint8
            size = file_bytes(METHODS["kmeans"], weight, bits, row_axis, opset)
            codebook = _codebook(fitted[:, fit], bits)
            approx = np.take_along_axis(codebook, nearest(rows, codebook).astype(np.intp), axis=1)
            found.append((Option("kmeans", bits, granularity, size, 0.0), from_rows(approx, part.shape, row_axis)))
    if "linear" in plan.methods and weight.tensor.data_type != onnx.TensorProto.DOUBLE:
        rows = to_rows(part, axis)
        granularity = Granularity.PER_CHANNEL if axis is not None else Granularity.PER_TENSOR
        for bits in (4, 8):
            opset = opset_for(reach, METHODS["linear"].need(weight, LayerSetting("linear", bits, granularity, False), axis))
            if opset is None:
                continue
            grid = grid_for(rows, bits=bits, symmetric=True)
            approx = from_rows(dequantize(quantize(rows, grid), grid), part.shape, axis)
            size = file_bytes(METHODS["linear"], weight, bits, axis, opset)
            found.append((Option("linear", bits, granularity, size, 0.0), approx))
    return found


def _kmeans(array: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """The array palettized with one codebook fitted on a sample of it."""
    rows = to_rows(array, None)
    codebook = _codebook(rows[:, _sample(rows.shape[1], FIT_VALUES, rng)], bits)
    return np.take_along_axis(codebook, nearest(rows, codebook).astype(np.intp), axis=1).reshape(array.shape)


def _codebook(rows: np.ndarray, bits: int) -> np.ndarray:
    """Codebooks for an estimate: a coarse DP (none past 6 bits) seeds Lloyd; about as good as the real
    conversion's up to 6 bits, a little worse past it (the prediction errs on the safe side)."""
    return palettize(rows, bits=bits, max_points=min(rows.shape[1], (4 << bits) if bits <= 6 else 1 << bits)).codebook


def _sample(n: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted column positions to fit codebooks on (all of them when there are few)."""
    return np.arange(n) if n <= count else np.sort(rng.choice(n, count, replace=False))


def allocate(options: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Per weight the option minimising size + λ·noise, with the smallest λ (searched in log space)
    whose total predicted noise fits `budget`; float everywhere if none does."""

    def pick(lam: float) -> dict[str, Option]:
        return {name: min(opts, key=lambda o: (o.size + lam * o.noise, o.noise)) for name, opts in options.items()}

    def fits(lam: float) -> bool:
        return sum(o.noise for o in pick(lam).values()) <= budget

    fitting = next((lam for lam in np.logspace(-3, 30, 331) if fits(lam)), None)  # every 0.1 decade
    if fitting is None:
        return {name: next(o for o in opts if o.method == "float") for name, opts in options.items()}
    low, high = fitting / 10**0.1, fitting
    for _ in range(30):
        mid = float(np.sqrt(low * high))
        low, high = (low, mid) if fits(mid) else (mid, high)
    return _fill(pick(high), options, budget)


def _fill(choice: dict[str, Option], options: dict[str, list[Option]], budget: float) -> dict[str, Option]:
    """Spend what the budget has left: the Lagrangian only reaches plans on the convex hull of size
    against noise, so move single weights to smaller options while the total noise still fits, the
    most bytes saved per noise added first."""
    choice = dict(choice)
    noise = sum(o.noise for o in choice.values())
    while True:
        moves = [(name, o) for name, current in choice.items() for o in options[name]
                 if o.size < current.size and noise - current.noise + o.noise <= budget]
        if not moves:
            return choice
        name, option = max(moves, key=lambda m: ((choice[m[0]].size - m[1].size) / max(m[1].noise - choice[m[0]].noise, 1e-30), m[0]))
        noise += option.noise - choice[name].noise
        choice[name] = option


def _size(choice: dict[str, Option]) -> int:
    return sum(o.size for o in choice.values())


def plan_for(choice: dict[str, Option], plan: AutoPlan) -> KMeansPlan:
    """The chosen options as a kmeans plan with one [[layer]] override per weight."""
    kmeans_bits = [o.bits for o in choice.values() if o.method == "kmeans"]
    base = max(set(kmeans_bits), key=kmeans_bits.count) if kmeans_bits else max(plan.bits)
    overrides = tuple(
        LayerOverride(name, skip=True) if o.method == "float"
        else LayerOverride(name, bits=o.bits, granularity=o.granularity, method=o.method)
        for name, o in sorted(choice.items())
    )
    return _base_plan(plan, overrides, base)


def _base_plan(plan: AutoPlan, overrides: tuple[LayerOverride, ...], bits: int = 8) -> KMeansPlan:
    return KMeansPlan(bits=bits, granularity=Granularity.PER_TENSOR, min_elements=plan.min_elements, exclude=plan.exclude,
                      max_codebook_overhead=plan.max_codebook_overhead, overrides=overrides, calibration=plan.calibration,
                      preprocessing=plan.preprocessing, fold_batchnorm=plan.fold_batchnorm,
                      data_aware=plan.data_aware, bias_correction=plan.bias_correction)  # with data, as kmeans does


def target_gates(plan: AutoPlan) -> Gates:
    return Gates(min_snr_db=plan.target_snr, min_top1=plan.min_top1, max_accuracy_drop=plan.max_accuracy_drop)


def search(input_path: Path, plan: AutoPlan, validation: ValidationPlan, progress: Progress,
           convert: Callable[[KMeansPlan], Conversion]) -> Conversion:
    """Plans of decreasing predicted noise, each converted by `convert` (not written), until one meets it
    or MAX_ITERATIONS are spent. Returns the smallest conversion that met the target, else the last one;
    its report gets the plan and the search in details["auto"]. The others are discarded."""
    model, _ = io.load_model(input_path)
    found = profile(model, plan, validation, progress)
    del model
    iterations: list[dict[str, object]] = []
    big = sum(found.elements.values()) > GAIN_BUDGET  # fewer conversions to spend (ResNet-50 in under a minute)
    aim = plan.target_snr if plan.target_snr is not None else TOP1_START_DB
    best: tuple[Conversion, dict[str, Option]] | None = None
    missed, met = -np.inf, np.inf  # the highest aim whose plan missed the target, the lowest that met it
    direction = 1.0  # where the aim moves when it allocates a plan already tried: up after a miss, down after a pass
    tried: list[dict[str, Option]] = []
    conversion: Conversion | None = None
    for iteration in range(MAX_ITERATIONS - 2 if big else MAX_ITERATIONS):
        choice = allocate(found.options, 10 ** (-aim / 10))
        for _ in range(40):  # options are discrete: a small move of the aim may not change the plan
            if choice not in tried or (np.isfinite(missed) and np.isfinite(met)):
                break
            aim += direction * STEP_DB / 2
            choice = allocate(found.options, 10 ** (-aim / 10))
        if choice in tried:  # the same plan again: nothing new to learn
            break
        if best is not None and _size(choice) >= _size(best[1]):  # aimed lower, yet no smaller than a plan that passed
            break
        tried.append(choice)
        predicted = -10 * float(np.log10(max(sum(o.noise for o in choice.values()), 1e-30)))
        progress(f"converting plan {iteration + 1} (aiming at {aim:.1f} dB output SNR)")
        if conversion is not None and (best is None or conversion is not best[0]):
            conversion.discard()
        conversion = convert(plan_for(choice, plan))
        report = conversion.report
        measured = min((o.snr_db for o in report.validation.outputs if o.snr_db is not None), default=None) if report.validation else None
        iterations.append({"aimed_snr_db": round(aim, 2), "predicted_snr_db": round(predicted, 2), "measured_snr_db": measured,
                           "output_bytes": report.output_bytes, "passed": report.passed})
        by_snr = plan.target_snr is not None and measured is not None
        if report.passed:
            if best is None or report.output_bytes < best[0].report.output_bytes:
                if best is not None:
                    best[0].discard()
                best = conversion, choice
            met, direction = min(met, aim), -1.0
            slack = measured - plan.target_snr if by_snr else TOP1_STEP_DB  # type: ignore[operator]
            if big:  # few conversions to spend: stop close to the target, else aim lower by the whole margin
                if slack <= STEP_DB / 2:
                    break
            elif slack <= 2 * STEP_DB:
                if np.isfinite(missed):
                    break
                continue  # on to the next smaller plan while none missed
        else:
            missed, direction = max(missed, aim), 1.0
            if all(o.method == "float" for o in choice.values()):
                break
        if np.isfinite(missed) and np.isfinite(met):  # bracketed: halve it
            if met - missed < STEP_DB:
                break
            aim = (missed + met) / 2
        elif report.passed:
            aim -= slack if big else slack - STEP_DB / 2  # the prediction was this much too strict
        else:
            aim += (plan.target_snr - measured + STEP_DB) if by_snr else TOP1_STEP_DB  # type: ignore[operator]
    assert conversion is not None, "the first plan is always converted"
    if best is not None and conversion is not best[0]:
        conversion.discard()
    conversion, choice = best if best is not None else (conversion, choice)
    report = conversion.report
    report.details["auto"] = {
        "calibrated": plan.calibration is not None or validation.data is not None,
        "target": {k: v for k, v in (("snr_db", plan.target_snr), ("top1", plan.min_top1), ("accuracy_drop", plan.max_accuracy_drop)) if v is not None},
        "iterations": iterations,
        "plan": [{"weight": name, "choice": o.label, "method": o.method, "bits": o.bits, "granularity": o.granularity.value,
                  "bytes": o.size, "gain": found.gains.get(name), "predicted_noise": o.noise} for name, o in sorted(choice.items())],
    }
    return conversion


def plan_toml(details: dict[str, object], model: str) -> str:
    """The chosen plan in the --config format: `qconvert kmeans MODEL --config plan.toml` redoes it."""
    rows = details["plan"]
    assert isinstance(rows, list)
    kmeans_bits = [r["bits"] for r in rows if r["method"] == "kmeans"]
    lines = [f"# qconvert auto plan for {model}; reuse: qconvert kmeans {model} --config THIS_FILE",
             f"bits = {max(set(kmeans_bits), key=kmeans_bits.count) if kmeans_bits else 8}",
             *([] if details.get("calibrated") else ["no_data_aware = true", "no_bias_correction = true"]), ""]
    for r in rows:
        lines += ["[[layer]]", f"match = {_toml_string(r['weight'])}"]
        if r["method"] == "float":
            lines.append("skip = true")
        else:
            lines += [f'method = "{r["method"]}"', f"bits = {r['bits']}", f'granularity = "{r["granularity"]}"']
        lines.append("")
    return "\n".join(lines)


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
