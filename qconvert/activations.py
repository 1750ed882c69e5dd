"""Full QDQ: quantized activations around the integer weights, so that onnxruntime runs integer kernels.

The driver calls these in order: `statistics` (after BatchNorm folding: input moments and the min/max
of the activations in one pass), `ranges` (before the weights are quantized: the pass then has their
memory to itself), `insert` (after the weights are encoded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from qconvert import calibrate, qdq, speed
from qconvert.fidelity import empirical
from qconvert.methods.base import Progress
from qconvert.methods.refine import Refiner, refiner_for
from qconvert.plan import CalibrationMethod, LinearPlan
from qconvert.runtime import Feeds, calibration_feeds, model_session, run_batches
from qconvert.select import Weight
from qconvert.validate import worst_snr

MIN_CALIBRATION_SAMPLES = 16
RUNTIME = (
    "full QDQ: onnxruntime fuses DequantizeLinear -> op -> QuantizeLinear into integer kernels (QLinearConv, QGemm ...)"
)


class Ranges(NamedTuple):
    found: dict[str, tuple[float, float]]  # per tensor (min, max), when nothing is left to the trial
    samples: int  # the calibration samples they come from
    rule: str  # what gave them (minmax, percentile P)
    trial: Trial | None = None  # choices made once the weights are in (`Trial`)
    shift: tuple[empirical.Targets, Feeds] | None = None  # for bias correction, and the calibration batches


EVEN = slice(0, None, 2)  # the calibration samples trial ranges come from; the odd ones are held out ...
ODD = slice(1, None, 2)  # ... and the other way round (`Trial.crossed`)
FLOAT_COUNTS = (0, 1, 2, 4, 8, 16, 32)  # activations left float that `--float-activations auto` tries
FLOAT_TOLERANCE_DB = 0.5  # ... keeping the fewest within this much of the best held-out SNR
SHIFT_GAIN_DB = 0.1  # bias correction is kept where it gains this much on the held-out samples of both folds


@dataclass
class Trial:
    """Choices tried in the quantized model on held-out samples against the float model's outputs there, in two
    folds (ranges from the even calibration samples judged on the odd ones, and the other way round; the figure
    is their mean): the range rule (`--calibration-method auto`: min/max, percentiles, mse, per tensor), then how
    many activations stay float (`--float-activations`: those whose own quantization loses most, fewest within
    FLOAT_TOLERANCE_DB of the best). The final ranges come from all samples."""

    parts: dict[str, list[calibrate.Part]]  # per tensor and sample
    held: Feeds | None  # the odd samples (None: a single sample, nothing to hold out)
    reference: list[np.ndarray]  # the float model's outputs on them (`--optimize speed` judges on these alone)
    rules: tuple[str, ...]  # the candidates (one: fixed)
    keep_float: int | str  # activations left float: a count, or "auto"
    exact: frozenset[str] = frozenset()  # tensors ranged by min/max whatever the rule (`qdq.output_values`)
    crossed: tuple[Feeds, list[np.ndarray]] | None = None  # the even samples and float's outputs on them

    def _judged_samples(self) -> int:
        assert self.held is not None
        return self.held.samples + (self.crossed[0].samples if self.crossed else 0)

    def _fits(self, rule: str) -> list[dict[str, tuple[float, float]]]:
        """The rule's ranges from the even samples, and (crossed) from the odd ones."""
        slices = (EVEN, ODD) if self.crossed else (EVEN,)
        return [calibrate.ranges_by(self.parts, rule, fit, self.exact) for fit in slices]

    def decide(
        self, model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], signed: bool, protected: set[str]
    ) -> tuple[str, dict[str, tuple[float, float]], list[str], dict[str, object]]:
        """The rule, the ranges of the activations to quantize, those left float, and what was measured.
        `protected`: tensors that must stay quantized (an absorbed Relu's clamp is their Quantize)."""
        details: dict[str, object] = {}
        rule = self.rules[0]
        if len(self.rules) > 1 and self.held is not None:
            tried = {r: self._snr(model, weights, signed, self._fits(r)) for r in self.rules}
            rule = max(self.rules, key=lambda r: _rank(tried[r]))  # the first of the best
            details |= {"held_out_samples": self._judged_samples(), "held_out_snr_db": tried}
        ranges = calibrate.ranges_by(self.parts, rule, exact=self.exact)
        if self.keep_float == 0:
            return rule, ranges, [], details
        ranked = sorted(
            (t for t in ranges if t not in protected),
            key=lambda t: _rank(calibrate.quantization_snr(self.parts[t], *ranges[t], signed)),
        )
        count = 0 if self.keep_float == "auto" else int(self.keep_float)
        if self.keep_float == "auto" and self.held is not None:
            fits = self._fits(rule)
            counts = [k for k in FLOAT_COUNTS if k <= len(ranked)]
            kept = {
                k: self._snr(model, weights, signed, [{t: f[t] for t in f if t not in ranked[:k]} for f in fits])
                for k in counts
            }
            best = max(_rank(v) for v in kept.values())
            count = min(k for k in counts if _rank(kept[k]) >= best - FLOAT_TOLERANCE_DB)
            details |= {"held_out_samples": self._judged_samples(), "float_activations_snr_db": kept}
        floated = ranked[:count]
        return rule, {t: r for t, r in ranges.items() if t not in floated}, floated, details

    def _snr(
        self,
        model: onnx.ModelProto,
        weights: dict[str, qdq.LinearWeight],
        signed: bool,
        fits: list[dict[str, tuple[float, float]]],
    ) -> float | None:
        """The worst output SNR on held-out samples of the model with these activations quantized: ranges from
        the even samples judged on the odd ones and (crossed) from the odd ones on the even ones, averaged."""
        assert self.held is not None
        judged = [(self.held, self.reference), *([self.crossed] if self.crossed else [])]
        scores = []
        for ranges, (held, reference) in zip(fits, judged):
            trial = onnx.ModelProto()
            trial.CopyFrom(model)
            qdq.insert_activation_qdq(trial, ranges, weights, signed)
            scores.append(_rank(worst_snr(trial, held, reference, "trial")))
        mean = float(np.mean(scores))
        return None if np.isinf(mean) else mean


def _rank(snr: float | None) -> float:
    return np.inf if snr is None else snr


def statistics(
    model: onnx.ModelProto, weights: list[Weight], plan: LinearPlan, data: Path | None, progress: Progress
) -> Refiner | None:
    """The data-aware techniques' statistics, and in the same pass what the activation ranges come from (min
    and max, or samples). A MatMul keeps no bias here: an Add after it would sit outside the integer kernel."""
    extremes = calibrated(model, {w.name for w in weights}, plan.activation_type == "int8")
    return refiner_for(
        model, weights, plan, data, progress, matmul_bias=False, extremes=extremes, sampled=_sampled(plan)
    )


def _tried(plan: LinearPlan) -> bool:
    """Whether choices are tried on held-out samples (`Trial`)."""
    return plan.calibration_method is CalibrationMethod.AUTO or plan.float_activations != 0 or plan.optimize == "speed"


def _sampled(plan: LinearPlan) -> bool:
    """Whether the ranges need samples of the activations (else their min and max do)."""
    return plan.calibration_method is not CalibrationMethod.MINMAX or _tried(plan)


def ranges(
    model: onnx.ModelProto,
    weights: list[Weight],
    plan: LinearPlan,
    data: Path | None,
    refiner: Refiner | None,
    progress: Progress,
    warnings: list[str],
) -> Ranges:
    """Activation ranges: from what the statistics pass gathered when it read the same data, else from a
    pass of their own over the calibration data; for a trial (`auto`, `--float-activations`, `--optimize
    speed`), with the float model's outputs on the held-out samples."""
    assert plan.calibration is not None
    method = plan.calibration_method
    shared = refiner if refiner and data == plan.calibration else None  # its pass read the same data
    feeds = calibration_feeds(model, plan.calibration, plan.preprocessing)
    shift = _targets(model, weights, plan, feeds, progress)
    if not _sampled(plan):
        if shared is not None:
            return _warned(Ranges(shared.stats.ranges, shared.samples, "minmax", shift=shift), warnings)
        progress("calibrating activation ranges")
        found = calibrate.activation_ranges(model, _tensors(model, weights, plan), feeds, method=method)
        return _warned(Ranges(found, feeds.samples, "minmax", shift=shift), warnings)
    if shared is not None and shared.stats.parts:
        parts = shared.stats.parts
    else:
        progress("calibrating activation ranges")
        parts = calibrate.sample_parts(model, _tensors(model, weights, plan), feeds)
    fixed = calibrate.rule_for(method, plan.percentile)
    exact = frozenset(qdq.output_values(model.graph))
    if not _tried(plan):
        return _warned(
            Ranges(calibrate.ranges_by(parts, fixed, exact=exact), feeds.samples, fixed, shift=shift), warnings
        )
    held: Feeds | None = None
    reference: list[np.ndarray] = []
    crossed = None
    if len(feeds.batches) > 1:
        outputs = _float_outputs(model, feeds, shift)
        held, reference = _judged(outputs, feeds, ODD)
        crossed = _judged(outputs, feeds, EVEN)
    rules = (fixed,) if method is not CalibrationMethod.AUTO else AUTO_RULES if held else (calibrate.PER_TENSOR,)
    trial = Trial(parts, held, reference, rules, plan.float_activations, exact, crossed)
    return _warned(Ranges({}, feeds.samples, "", trial, shift), warnings)


def _targets(
    model: onnx.ModelProto, weights: list[Weight], plan: LinearPlan, feeds: Feeds, progress: Progress
) -> tuple[empirical.Targets, Feeds] | None:
    """What bias correction needs of the float model, where it is asked for and there are samples to hold out."""
    if not plan.bias_correction or len(feeds.batches) < 2:
        return None
    progress("measuring the float model's layer outputs")
    names = {w.name for w in weights}
    absorbed = {} if plan.activation_type == "int8" else qdq.absorbed_outputs(model, names)
    return empirical.float_targets(model, names, absorbed, feeds), feeds


def _float_outputs(
    model: onnx.ModelProto, feeds: Feeds, shift: tuple[empirical.Targets, Feeds] | None
) -> list[list[np.ndarray]]:
    """The float model's outputs on each calibration batch: those bias correction's pass took, else a run."""
    if shift is not None and len(shift[0].outputs) == len(feeds.batches):
        return shift[0].outputs
    return list(run_batches(model_session(model, "float model"), feeds, "float model"))


def _judged(outputs: list[list[np.ndarray]], feeds: Feeds, batches: slice) -> tuple[Feeds, list[np.ndarray]]:
    """Those calibration batches, and the float model's outputs on them (`outputs`: on each batch)."""
    some = Feeds(feeds.batches[batches], len(feeds.batches[batches]), feeds.source)
    return some, [np.concatenate(o) for o in zip(*outputs[batches])]


def _tensors(model: onnx.ModelProto, weights: list[Weight], plan: LinearPlan) -> list[str]:
    return calibrated(model, {w.name for w in weights}, plan.activation_type == "int8")


AUTO_RULES = ("minmax", "percentile 99.999", "percentile 99.99", "mse", calibrate.PER_TENSOR)


def _warned(found: Ranges, warnings: list[str]) -> Ranges:
    if found.samples < MIN_CALIBRATION_SAMPLES:
        warnings.append(
            f"only {found.samples} calibration samples; activation ranges may not generalize "
            f"(use {MIN_CALIBRATION_SAMPLES}+)"
        )
    return found


def insert(
    model: onnx.ModelProto,
    weights: dict[str, qdq.LinearWeight],
    found: Ranges,
    signed: bool = False,
    optimize: str = "size",
) -> dict[str, object]:
    """Relu/Clip(0, x) absorbed into the range of the op before them, Quantize/DequantizeLinear pairs on
    the activations, int32 biases; returns what the report's details say of it. `optimize` "speed": the
    layers that run faster in float stay float (`qconvert.speed`)."""
    pristine = _copy(model) if optimize == "speed" and found.trial is not None and found.trial.held else None
    names = set(weights)
    protected = set() if signed else qdq.absorbing_outputs(model, names)
    absorbed = 0 if signed else qdq.absorb_activations(model, names)
    rule, ranges_of = found.rule, found.found
    floated: list[str] = []
    details: dict[str, object] = {}
    if found.trial is not None:
        rule, ranges_of, floated, details = found.trial.decide(model, weights, signed, protected)
    if pristine is not None:
        assert found.trial is not None and found.trial.held is not None

        def place(candidate: onnx.ModelProto, kept: dict[str, qdq.LinearWeight]) -> None:
            _place(candidate, kept, ranges_of, signed)

        layers, details["speed"] = speed.choose(pristine, weights, place, found.trial.held, found.trial.reference)
        qdq.decode_at_load(pristine, {n: weights[n] for n in layers})
        model.CopyFrom(pristine)
        weights = {n: item for n, item in weights.items() if n not in layers}
        absorbed, count = _place(model, weights, ranges_of, signed)
    else:
        count = _quantize_around(model, weights, ranges_of, signed)
    if found.shift is not None:
        details["bias_correction"] = _shift_biases(model, *found.shift)
    return {
        "calibration_samples": found.samples,
        "activations_quantized": count,
        "activations_absorbed": absorbed,
        "activation_ranges": {"rule": rule, **details},
        "activations_left_float": floated,
        "runtime": RUNTIME,
    }


def _shift_biases(model: onnx.ModelProto, targets: empirical.Targets, feeds: Feeds) -> dict[str, object]:
    """Empirical bias correction (`qconvert.fidelity.empirical`) in two folds: fitted on the even calibration
    samples and judged on the odd ones, and the other way round; where both raise the worst output SNR by
    SHIFT_GAIN_DB (below speed.NEGLIGIBLE_DB), the mean of the two fits is kept, in place."""
    if not targets.batches():
        return {"skipped": f"{len(targets.ranks)} layers of {targets.macs / 1e9:.1f} GMAC: too costly to fit"}
    folds = [(EVEN, ODD), (ODD, EVEN)]
    fits = [empirical.fit(model, targets, feeds, fitted) for fitted, _ in folds]
    if not fits[0]:
        return {"layers": 0}
    measured = []
    for fit, (_, judged) in zip(fits, folds):
        trial = _copy(model)
        empirical.apply(trial, fit)
        held, reference = _judged(targets.outputs, feeds, judged)
        measured.append([worst_snr(m, held, reference, "quantized model") for m in (model, trial)])
    kept = all(_audible(after) >= _audible(before) + SHIFT_GAIN_DB for before, after in measured)
    if kept:
        empirical.apply(model, {name: (fits[0][name] + fits[1][name]) / 2 for name in fits[0]})
    figures = [{"without": _round(before), "with": _round(after)} for before, after in measured]
    return {"layers": len(fits[0]), "samples": targets.batches(), "held_out_snr_db": figures, "kept": kept}


def _audible(snr: float | None) -> float:
    """An SNR as a judge of bias correction: past speed.NEGLIGIBLE_DB the noise is chance (the direction
    classifier's halves gained 7 dB at 57, its evaluation images lost 5 at 49)."""
    return min(_rank(snr), speed.NEGLIGIBLE_DB)


def _round(snr: float | None) -> float | None:
    return None if snr is None else round(float(snr), 2)


def _place(
    model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], ranges: dict[str, tuple[float, float]], signed: bool
) -> tuple[int, int]:
    """Absorb the Relus after these integer layers and quantize the activations around them, in place: how
    many were absorbed and quantized. None without an integer layer: a pool or an Add alone does not pay for
    its transitions."""
    if not weights:
        return 0, 0
    absorbed = 0 if signed else qdq.absorb_activations(model, set(weights))
    return absorbed, _quantize_around(model, weights, ranges, signed)


def _quantize_around(
    model: onnx.ModelProto, weights: dict[str, qdq.LinearWeight], ranges: dict[str, tuple[float, float]], signed: bool
) -> int:
    """Quantize/DequantizeLinear on the activations around these integer layers that have a range: how many."""
    tensors = [t for t in qdq.activation_tensors(model, set(weights)) if t in ranges]
    return qdq.insert_activation_qdq(model, {t: ranges[t] for t in tensors}, weights, signed)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def calibrated(model: onnx.ModelProto, quantized: set[str], signed: bool = False) -> list[str]:
    """The activations whose ranges full QDQ will use: all but those absorbed into their producer (uint8
    only: a range from 0 does the Relu's work; a symmetric int8 range keeps the negative values)."""
    absorbed = set() if signed else qdq.absorbed_tensors(model, quantized)
    return [t for t in qdq.activation_tensors(model, quantized) if t not in absorbed]
