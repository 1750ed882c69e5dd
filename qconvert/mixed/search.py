"""The search of `qconvert auto`: profile the model (each layer's gain, each weight's options with their
predicted noise), then convert and validate plans, moving the aim while the measured result misses the
target or beats it by a wide margin; the smallest plan that meets it wins."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from qconvert import io, runtime
from qconvert.fidelity import bias, statistics
from qconvert.fidelity.statistics import Layer, Moments
from qconvert.gates import Gates
from qconvert.methods.common import Progress, select
from qconvert.mixed.allocation import allocate, total_size
from qconvert.mixed.options import EVAL_CHANNELS, Option, options_for, sampled_kmeans
from qconvert.mixed.sensitivity import (
    GAIN_BUDGET,
    GAIN_SAMPLES,
    PROBE_BITS,
    SLOT_BUDGET,
    SLOTS,
    gain_curve,
    noise_estimate,
    noise_gains,
)
from qconvert.opset import Reach
from qconvert.pipeline import Conversion
from qconvert.plan import AutoPlan, Granularity, KMeansPlan, LayerOverride, ValidationPlan
from qconvert.select import Weight
from qconvert.validate import ValidationResult

MAX_ITERATIONS = 5  # conversions a search may try (two fewer past GAIN_BUDGET weights: ResNet-50 stays under a minute)
STEP_DB = 0.5  # the resolution of the search: predictions are good to about this much at 4-8 bits
TOP1_START_DB = 20.0  # accuracy targets: the SNR aimed at first ...
TOP1_STEP_DB = 4.0  # ... and each step up


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
    # Work grows with model size × samples × probe widths: small models get more of both.
    elements = max(sum(w.elements for w in weights), 1)
    widths = PROBE_BITS if elements * len(PROBE_BITS) <= GAIN_BUDGET else PROBE_BITS[:1]
    count = int(np.clip(GAIN_BUDGET // (elements * len(widths)), 1, GAIN_SAMPLES))
    samples = _singles(runtime.build_feeds(runtime.signature(model), validation), count)
    layers = statistics.find_layers(model, weights)
    moments = statistics.input_moments(model, layers, samples).moments if layers else {}
    layers = {n: layer for n, layer in layers.items() if n in moments}
    # The conversions correct biases wherever that measures better: the probes and the predictions then
    # leave out the mean error (its gain differs from the rest's: ReLUs and normalizations see it differently).
    corrected = {
        n: plan.bias_correction and (plan.calibration or validation.data) is not None and layer.bias_editable
        for n, layer in layers.items()
    }
    progress(f"measuring the sensitivity of {len(layers)} layers on {count} samples")
    rng = np.random.default_rng(0)
    probe = _Probe(
        model, layers, moments, samples, corrected, groups=max(min(SLOT_BUDGET // elements, len(layers)), SLOTS)
    )
    for bits in widths:  # noise grows faster than linearly through a network once it is large
        probe.measure({w.name: w.array() for w in weights if w.name in layers}, bits, rng)
    options: dict[str, list[Option]] = {}
    reach = Reach(model)
    for i, weight in enumerate(weights):
        progress(f"estimating options {i + 1}/{len(weights)}: {weight.name}")
        options[weight.name] = probe.options(weight, plan, rng, reach)
    return Profile(
        options, {name: max(g for _, g in p) for name, p in probe.points.items()}, {w.name: w.elements for w in weights}
    )


def _singles(feeds: runtime.Feeds, count: int) -> runtime.Feeds:
    """The first `count` samples, one per batch."""
    singles = [
        {k: v[i : i + 1] for k, v in batch.items()}
        for batch in feeds.batches
        for i in range(len(next(iter(batch.values()))))
    ]
    return runtime.Feeds(singles[:count], len(singles[:count]), feeds.source)


class _Probe:
    """The layers' measured gains, and each weight's options with their predicted output noise: the layer's
    noise ratio, estimated and calibrated against the measured perturbation, times its gain there."""

    def __init__(
        self,
        model: onnx.ModelProto,
        layers: dict[str, Layer],
        moments: dict[str, Moments],
        samples: runtime.Feeds,
        corrected: dict[str, bool],
        groups: int,
    ) -> None:
        self.model, self.layers, self.moments, self.samples = model, layers, moments, samples
        self.corrected, self.groups = corrected, groups
        self.estimates = {n: noise_estimate(layers[n].weight_shape, layers[n], moments[n]) for n in layers}
        self.points: dict[str, list[tuple[float, float]]] = {name: [] for name in layers}
        self.calibration: dict[str, float] = {}  # measured / estimated layer noise, at the first width

    def measure(self, arrays: dict[str, np.ndarray], bits: int, rng: np.random.Generator) -> None:
        """The gains with every layer's weight perturbed as `bits`-bit k-means would."""
        perturbed = {name: sampled_kmeans(array, bits, rng) for name, array in arrays.items()}  # Ŵ
        shifts = {
            name: shift
            for name in self.layers
            if self.corrected[name]
            and (shift := bias.bias_shift(self.layers[name], self.moments[name], arrays[name], perturbed[name]))
            is not None
        }
        for name, point in noise_gains(self.model, self.layers, self.samples, perturbed, self.groups, shifts).items():
            self.points[name].append(point)
            if name not in self.calibration:
                estimate = self.estimates[name](arrays[name], perturbed[name], None, name in shifts)
                self.calibration[name] = point[0] / estimate if estimate > 0 else 0.0

    def options(self, weight: Weight, plan: AutoPlan, rng: np.random.Generator, reach: Reach) -> list[Option]:
        array = weight.array()
        found = [Option("float", 32, Granularity.PER_TENSOR, array.nbytes, 0.0)]
        axis, channels = weight.channel_axis, None
        if axis is not None and weight.shape[axis] > EVAL_CHANNELS:  # a seeded subset of output channels stands for all
            channels = np.sort(rng.choice(weight.shape[axis], EVAL_CHANNELS, replace=False))
        part = array if channels is None else np.take(array, channels, axis)
        worst_gain = max((max(g for _, g in p) for p in self.points.values()), default=1.0)
        gain = gain_curve(self.points[weight.name]) if weight.name in self.layers else None
        for option, approx in options_for(weight, array, plan, rng, channels, reach):
            if gain is not None:
                ratio = self.calibration[weight.name] * self.estimates[weight.name](
                    part, approx, channels, self.corrected[weight.name]
                )
                noise = gain(ratio) * ratio
            else:  # no layer to measure (subgraphs, RNNs, shared weights): the weight's own error ratio, worst gain
                error = float(np.sum((part.astype(np.float64) - approx) ** 2))
                noise = worst_gain * error / max(float(np.sum(part.astype(np.float64) ** 2)), 1e-30)
            found.append(dataclasses.replace(option, noise=noise))
        return found


def plan_for(choice: dict[str, Option], plan: AutoPlan) -> KMeansPlan:
    """The chosen options as a kmeans plan with one [[layer]] override per weight."""
    kmeans_bits = [o.bits for o in choice.values() if o.method == "kmeans"]
    base = max(set(kmeans_bits), key=kmeans_bits.count) if kmeans_bits else max(plan.bits)
    overrides = tuple(
        LayerOverride(name, skip=True)
        if o.method == "float"
        else LayerOverride(name, bits=o.bits, granularity=o.granularity, method=o.method)
        for name, o in sorted(choice.items())
    )
    return _base_plan(plan, overrides, base)


def _base_plan(plan: AutoPlan, overrides: tuple[LayerOverride, ...], bits: int = 8) -> KMeansPlan:
    """The plan's settings as a kmeans plan; with data, the techniques as qconvert kmeans has them."""
    return KMeansPlan(
        bits=bits,
        granularity=Granularity.PER_TENSOR,
        min_elements=plan.min_elements,
        exclude=plan.exclude,
        max_codebook_overhead=plan.max_codebook_overhead,
        overrides=overrides,
        calibration=plan.calibration,
        preprocessing=plan.preprocessing,
        fold_batchnorm=plan.fold_batchnorm,
        equalize=plan.equalize,
        data_aware=plan.data_aware,
        bias_correction=plan.bias_correction,
        sequential=plan.sequential,
    )


def target_gates(plan: AutoPlan) -> Gates:
    return Gates(
        min_snr_db=plan.target_snr,
        min_top1=plan.min_top1,
        max_accuracy_drop=plan.max_accuracy_drop,
        max_metric_drop=plan.max_metric_drop,
    )


def search(
    input_path: Path,
    plan: AutoPlan,
    validation: ValidationPlan,
    progress: Progress,
    convert: Callable[[KMeansPlan], Conversion],
) -> Conversion:
    """Plans of decreasing predicted noise, each converted by `convert` (not written), until one meets it
    or MAX_ITERATIONS are spent. Returns the smallest conversion that met the target, else the last one;
    its report gets the plan and the search in details["auto"]. The others are discarded."""
    model, _ = io.load_model(input_path)
    found = profile(model, plan, validation, progress)
    del model
    big = sum(found.elements.values()) > GAIN_BUDGET  # fewer conversions to spend (ResNet-50 in under a minute)
    state = _Search(
        found.options, plan.target_snr, big, plan.target_snr if plan.target_snr is not None else TOP1_START_DB
    )
    iterations: list[dict[str, object]] = []
    conversion: Conversion | None = None
    for iteration in range(MAX_ITERATIONS - 2 if big else MAX_ITERATIONS):
        choice = state.next_plan()
        if choice is None:
            break
        predicted = -10 * float(np.log10(max(sum(o.noise for o in choice.values()), 1e-30)))
        progress(f"converting plan {iteration + 1} (aiming at {state.aim:.1f} dB output SNR)")
        state.release(conversion)
        conversion = convert(plan_for(choice, plan))
        report = conversion.report
        measured = _worst_snr(report.validation)
        iterations.append(
            {
                "aimed_snr_db": round(state.aim, 2),
                "predicted_snr_db": round(predicted, 2),
                "measured_snr_db": measured,
                "output_bytes": report.output_bytes,
                "passed": report.passed,
            }
        )
        if state.learn(conversion, choice, measured):
            break
    assert conversion is not None, "the first plan is always converted"
    state.release(conversion)
    conversion, choice = state.best if state.best is not None else (conversion, state.tried[-1])
    conversion.report.details["auto"] = {
        "calibrated": plan.calibration is not None or validation.data is not None,
        "target": {
            k: v
            for k, v in (
                ("snr_db", plan.target_snr),
                ("top1", plan.min_top1),
                ("accuracy_drop", plan.max_accuracy_drop),
                ("metric_drop", plan.max_metric_drop),
            )
            if v is not None
        },
        "iterations": iterations,
        "plan": [
            {
                "weight": name,
                "choice": o.label,
                "method": o.method,
                "bits": o.bits,
                "granularity": o.granularity.value,
                "bytes": o.size,
                "gain": found.gains.get(name),
                "predicted_noise": o.noise,
            }
            for name, o in sorted(choice.items())
        ],
    }
    return conversion


@dataclass
class _Search:
    """Where the search aims (dB of output SNR), and what the plans converted so far taught it."""

    options: dict[str, list[Option]]
    target_snr: float | None
    big: bool  # few conversions to spend: stop close to the target, else aim lower by the whole margin
    aim: float
    missed: float = -np.inf  # the highest aim whose plan missed the target ...
    met: float = np.inf  # ... and the lowest that met it
    direction: float = (
        1.0  # where the aim moves when it allocates a plan already tried: up after a miss, down after a pass
    )
    tried: list[dict[str, Option]] = field(default_factory=list)
    best: tuple[Conversion, dict[str, Option]] | None = None  # the smallest conversion that met the target

    @property
    def bracketed(self) -> bool:
        return bool(np.isfinite(self.missed) and np.isfinite(self.met))

    def next_plan(self) -> dict[str, Option] | None:
        """The plan for the aim (moved while it gives one already tried); None: nothing new to try."""
        choice = allocate(self.options, 10 ** (-self.aim / 10))
        for _ in range(40):  # options are discrete: a small move of the aim may not change the plan
            if choice not in self.tried or self.bracketed:
                break
            self.aim += self.direction * STEP_DB / 2
            choice = allocate(self.options, 10 ** (-self.aim / 10))
        if choice in self.tried:  # the same plan again: nothing new to learn
            return None
        if self.best is not None and total_size(choice) >= total_size(self.best[1]):  # aimed lower, yet no smaller
            return None
        self.tried.append(choice)
        return choice

    def release(self, conversion: Conversion | None) -> None:
        """Discard a conversion that is not the best one."""
        if conversion is not None and (self.best is None or conversion is not self.best[0]):
            conversion.discard()

    def learn(self, conversion: Conversion, choice: dict[str, Option], measured: float | None) -> bool:
        """Move the aim by what the conversion measured; True: stop searching."""
        passed = conversion.report.passed
        by_snr = self.target_snr is not None and measured is not None
        slack = 0.0
        if passed:
            if self.best is None or conversion.report.output_bytes < self.best[0].report.output_bytes:
                if self.best is not None:
                    self.best[0].discard()
                self.best = conversion, choice
            self.met, self.direction = min(self.met, self.aim), -1.0
            slack = measured - self.target_snr if by_snr else TOP1_STEP_DB  # type: ignore[operator]
            if self.big:
                if slack <= STEP_DB / 2:
                    return True
            elif slack <= 2 * STEP_DB:
                return bool(np.isfinite(self.missed))  # on to the next smaller plan while none missed
        else:
            self.missed, self.direction = max(self.missed, self.aim), 1.0
            if all(o.method == "float" for o in choice.values()):
                return True
        if self.bracketed:  # halve it
            if self.met - self.missed < STEP_DB:
                return True
            self.aim = (self.missed + self.met) / 2
        elif passed:
            self.aim -= slack if self.big else slack - STEP_DB / 2  # the prediction was this much too strict
        else:
            self.aim += (self.target_snr - measured + STEP_DB) if by_snr else TOP1_STEP_DB  # type: ignore[operator]
        return False


def _worst_snr(validation: ValidationResult | None) -> float | None:
    if validation is None:
        return None
    return min((o.snr_db for o in validation.outputs if o.snr_db is not None), default=None)


def plan_toml(details: dict[str, object], model: str) -> str:
    """The chosen plan in the --config format: `qconvert kmeans MODEL --config plan.toml` redoes it."""
    rows = details["plan"]
    assert isinstance(rows, list)
    kmeans_bits = [r["bits"] for r in rows if r["method"] == "kmeans"]
    lines = [
        f"# qconvert auto plan for {model}; reuse: qconvert kmeans {model} --config THIS_FILE",
        f"bits = {max(set(kmeans_bits), key=kmeans_bits.count) if kmeans_bits else 8}",
        *([] if details.get("calibrated") else ["no_data_aware = true", "no_bias_correction = true"]),
        "",
    ]
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
