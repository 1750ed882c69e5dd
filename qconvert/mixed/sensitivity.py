"""How much of each layer's output noise reaches the model's outputs (its gain): one batched onnxruntime
probe with a slot per layer."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qconvert import runtime
from qconvert.fidelity import bias, checks, statistics
from qconvert.opset import hole, without_weights
from qconvert.rewrite import Additions, After, NameSource, add_after
from qconvert.select import select_weights

PROBE_BITS = (4, 2)  # the gains are measured with each layer's error at these k-means widths


GAIN_SAMPLES = 32  # samples the gains are averaged over, at most


GAIN_BUDGET = 1 << 24  # weights × samples × widths of the sensitivity probes (ResNet-50: 1 sample, 1 width)


SLOT_BUDGET = 3 << 29  # weights × probe slots: each layer gets a slot of its own, up to this (ResNet-50: all 54)


SLOTS = 16  # layers probed per batched run


def noise_estimate(
    shape: tuple[int, ...], layer: statistics.Layer, moments: statistics.Moments
) -> Callable[..., float]:
    """(original, quantized[, output channels they hold][, corrected]) -> a number proportional to the
    layer's output noise: Σ Var[x]·ΔW² plus the squared mean error (Σ E[x]·ΔW)² per output channel,
    which bias correction (`corrected`) removes. The constant (the output's power, input correlations)
    is calibrated against one measured perturbation per layer; a subset of output channels stands for
    all of them."""
    spread = statistics.per_weight(layer, np.maximum(moments.square - moments.mean**2, 0.0), shape)
    centre = statistics.per_weight(layer, moments.mean, shape)
    variance = np.broadcast_to(1.0 if spread is None else spread, shape)  # unknown layout: plain weight error
    mean = np.broadcast_to(0.0 if centre is None else centre, shape)
    gain = layer.mean_gain
    others = tuple(a for a in range(len(shape)) if a != layer.out_axis)

    def estimate(
        original: np.ndarray, quantized: np.ndarray, channels: np.ndarray | None = None, corrected: bool = False
    ) -> float:
        delta = original.astype(np.float64) - quantized
        var, mu = (
            (variance, mean)
            if channels is None
            else (np.take(variance, channels, layer.out_axis), np.take(mean, channels, layer.out_axis))
        )
        shift = 0.0 if corrected else float(np.sum((gain * np.sum(delta * mu, axis=others)) ** 2))
        scale = 1.0 if channels is None else shape[layer.out_axis] / channels.size
        return scale * (float(np.sum(var * delta * delta)) + shift)

    return estimate


def gain_curve(points: list[tuple[float, float]]) -> Callable[[float], float]:
    """Gain as a function of the layer's noise ratio: log-linear between the measured points, flat beyond."""
    points = sorted(p for p in points if p[0] > 0 and p[1] > 0)
    if not points:
        return lambda _: 0.0
    ratios, gains = np.log([r for r, _ in points]), np.log([g for _, g in points])
    return lambda ratio: float(np.exp(np.interp(np.log(max(ratio, 1e-30)), ratios, gains)))


def noise_gains(
    model: onnx.ModelProto,
    layers: dict[str, statistics.Layer],
    samples: runtime.Feeds,
    perturbed: dict[str, np.ndarray],
    groups: int,
    shifts: dict[str, np.ndarray] | None = None,
) -> dict[str, tuple[float, float]]:
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
            noisy = sess.run(outputs, _slotted(feed, chunk, names, masks, picks, ranks))
            for slot in range(len(chunk)):
                error = sum(
                    float(np.sum((n[slot : slot + 1].astype(np.float64) - r) ** 2)) for n, r in zip(noisy, reference)
                )
                output_error[start + slot] += error
    measured = {}
    for unit, error in zip(units, output_error):
        total = sum(ratios[name] for name in unit)
        for name in unit:
            measured[name] = ratios[name], error / max(signal, 1e-30) / total if total > 0 else 0.0
    return measured


def _slotted(
    feed: dict[str, np.ndarray],
    chunk: list[list[str]],
    names: list[str],
    masks: dict[str, str],
    picks: dict[str, str],
    ranks: dict[str, int],
) -> dict[str, np.ndarray]:
    """One probe run: the sample repeated once per slot, each unit's layers adding their noise in its slot only."""
    run = {k: np.repeat(v, len(chunk), axis=0) for k, v in feed.items()}
    for name in names:
        run[masks[name]] = np.zeros((len(chunk), *([1] * (ranks[name] - 1))), np.float32)
        run[picks[name]] = np.zeros(1, np.int64)
    for slot, unit in enumerate(chunk):
        for name in unit:
            run[masks[name]][slot] = 1.0
            run[picks[name]][0] = slot
    return run


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


def _noise_probe(
    model: onnx.ModelProto,
    layers: dict[str, statistics.Layer],
    deltas: dict[str, np.ndarray],
    shifts: dict[str, np.ndarray],
    ranks: dict[str, int],
) -> tuple[onnx.ModelProto, dict[str, str], dict[str, str], dict[str, np.ndarray]]:
    """A skeleton of the model with y + mask·(layer(x[slot]; Ŵ − W) + shift) after each layer, mask a new
    [batch, 1, ...] input and slot a new [1] input (the batch slot the layer's noise goes to: its error
    is computed for that sample alone); the masks' and slots' names; the arrays of its new initializers."""
    probe = without_weights(model)
    graph, fresh = probe.graph, NameSource(probe)
    masks: dict[str, str] = {}
    picks: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}
    additions: Additions = {}
    for name, layer in layers.items():
        y = layer.node.output[0]
        delta = fresh(f"{name}_qc_delta")
        arrays[delta] = deltas[name].astype(np.float32)
        graph.initializer.append(hole(delta, arrays[delta]))
        noise, mask, slot, sample, clean, scaled = (
            fresh(f"{y}_qc_{part}") for part in ("noise", "mask", "slot", "sample", "clean", "scaled")
        )
        graph.input.append(
            helper.make_tensor_value_info(mask, onnx.TensorProto.FLOAT, ["batch", *([1] * (ranks[name] - 1))])
        )
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
        additions[y] = After(
            [*nodes, helper.make_node("Mul", [mask, noise], [scaled]), helper.make_node("Add", [clean, scaled], [y])],
            clean,
        )
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
