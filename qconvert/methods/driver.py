"""One driver for every method: select, fold, prepare the opset, quantize, refine, report, encode.

Each weight gets the method its layer setting names (a hybrid plan is per-weight methods on this same
driver). The order matters where the comments say so; the methods themselves are in `methods.METHODS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard

import numpy as np
import onnx
from onnx import helper

from qconvert import activations, qdq
from qconvert.equalize import equalize, through_batchnorm
from qconvert.errors import QConvertError, UnsupportedModelError, UsageError
from qconvert.fidelity.statistics import Layer
from qconvert.fold import fold_batchnorm
from qconvert.methods import METHODS
from qconvert.methods.base import Context, Method, Progress, Quantized, file_bytes, join, opset_for
from qconvert.methods.common import Step, finite, in_order, require_weights, select, small_setting
from qconvert.methods.refine import SEQUENTIAL_BATCHES, Decision, Refiner, fold_filter, refiner_for, with_techniques
from qconvert.opset import Reach, default_opset, raise_opset
from qconvert.plan import KMeansPlan, LayerSetting, LinearPlan, Plan, layer_setting
from qconvert.report import Histogram, OpsetChange, WeightReport
from qconvert.select import MAIN_GRAPH, Skipped, Weight

PAYS_PAST_BYTES = 1 << 16  # weights larger than this always shrink when encoded (decode nodes take ~1 KB)
FALLBACK = "\0"  # in an opset note: where the storage its weights fell back to goes, once they are quantized


@dataclass
class _Job:
    """A model being quantized: its weights, and what each of them gets."""

    model: onnx.ModelProto
    plan: Plan
    progress: Progress
    workers: int
    context: Context
    weights: list[Weight] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    settings: dict[str, LayerSetting] = field(default_factory=dict)
    axes: dict[str, tuple[list[int | None], str | None]] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    fell_back: set[str] = field(default_factory=set)  # methods whose storage fell back to a lower opset

    def method(self, weight: Weight) -> Method:
        return METHODS[self.settings[weight.name].method]

    def quantizing(self, name: str) -> tuple[Method, Weight]:
        """A weight's method, and the weight, by name."""
        weight = next(w for w in self.weights if w.name == name)
        return self.method(weight), weight

    def refined(self, weight: Weight) -> bool:
        """The data-aware techniques serve the plan's own method, and the int8 of k-means' small weights (their
        bias correction keeps the response to flat inputs of filters whose values nearly cancel); a layer
        override's other method runs plain."""
        return self.settings[weight.name].method == self.plan.method or self._small(weight)

    def _small(self, weight: Weight) -> bool:
        return self.settings[weight.name] != layer_setting(self.plan, weight.name)

    def note(self, weight: Weight) -> str | None:
        """Why the weight takes another method than the plan's (None: it does not)."""
        if self.settings[weight.name].method == self.plan.method:
            return None
        if self._small(weight):
            return f"int8: {weight.elements} elements < --min-elements {self.plan.min_elements}"
        return f"{self.method(weight).name} by a layer override"

    def select(self) -> None:
        selection = select(self.model, self.plan)
        self.weights, self.skipped = selection.weights, list(selection.skipped)
        self.settings = {w.name: small_setting(self.plan, w) for w in self.weights}
        small = [w for w in self.weights if _float_bytes(w) <= PAYS_PAST_BYTES]
        if isinstance(self.plan, KMeansPlan) and small:  # a palette and its decode nodes may outweigh the values
            reach = Reach(self.model)
            for weight in small:
                if (reason := self._costs_more(weight, reach)) is not None:
                    self.weights.remove(weight)
                    self.skipped.append(Skipped(weight.name, weight.op_types, reason, weight.shape))

    def _costs_more(self, weight: Weight, reach: Reach) -> str | None:
        """Why the weight stays float: its smallest encoding (one codebook or scale, with its decode nodes and
        tensors: `file_bytes`, at the opset the conversion would give it) is no smaller than the float tensor."""
        setting = self.settings[weight.name]
        method = METHODS[setting.method]
        opset = opset_for(reach, method.need(weight, setting, None))
        if opset is None:  # the method's own checks say why, unless it is the int8 of a small weight
            return "int8 needs opset 10" if self._small(weight) else None
        encoded, stored = file_bytes(method, weight, setting.bits, None, opset), _float_bytes(weight)
        if encoded < stored:
            return None
        return f"{encoded} bytes encoded with its decode nodes, {stored} as float"


def _float_bytes(weight: Weight) -> int:
    return weight.elements * helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize


def quantize_model(
    model: onnx.ModelProto,
    plan: Plan,
    progress: Progress,
    workers: int,
    data: Path | None = None,
    memo: dict[tuple[object, ...], object] | None = None,
) -> Step:
    """The plan's methods applied to the model's weights (in place, or on a copy converted to another opset:
    `Step.model`). With `data` (calibration inputs), the data-aware techniques refine each layer where that
    measurably beats the plain result on the layer's output. `memo`: results shared by conversions of one model."""
    unknown = [o for o in plan.overrides if o.method is not None and o.method not in METHODS]
    if unknown:
        raise UsageError(
            f"[[layer]] {unknown[0].match!r}: method must be one of {', '.join(METHODS)}, got {unknown[0].method!r}"
        )
    kmeans = plan if isinstance(plan, KMeansPlan) else None
    linear = plan if isinstance(plan, LinearPlan) else None
    full_qdq = linear if linear and linear.activations else None  # activations quantized too
    context = Context(
        opset=default_opset(model),
        max_codebook_overhead=kmeans.max_codebook_overhead if kmeans else 1.0,
        group_size=kmeans.group_size if kmeans else None,
        block_size=0 if full_qdq else linear.block_size if linear else None,  # integer kernels take no blocks
        memo=memo,
    )
    job = _Job(model, plan, progress, workers, context)
    job.select()
    # before the statistics: they see the equalized model
    folded = _equalize(job) if plan.equalize or (plan.equalize is None and not full_qdq) else {}
    # Folding BatchNorm where it costs no accuracy needs the statistics; integer kernels need every one folded,
    # so full QDQ folds first and then gathers the statistics and the activation ranges in one pass.
    refiner = None if full_qdq else refiner_for(model, [w for w in job.weights if job.refined(w)], plan, data, progress)
    folded |= _fold(job, refiner, everything=full_qdq is not None)
    if full_qdq and (divisions := qdq.divisions_as_products(job.model)):
        job.details["divisions_as_products"] = divisions
    if folded:
        job.details["folded_batchnorm"] = list(folded)
    if full_qdq:
        refiner = activations.statistics(job.model, job.weights, full_qdq, data, progress)
    _vet(job)
    opset = _prepare_opset(job)
    if refiner is not None:
        refiner.bind(job.model, job.weights)
    ranges = (
        activations.ranges(job.model, job.weights, full_qdq, data, refiner, progress, job.warnings)
        if full_qdq
        else None
    )
    items, decisions, chosen = _quantize(job, refiner)
    reports, histograms = _reports(job, items, decisions, chosen, set(folded.values()))
    opset = _described(job, opset, items)
    if refiner is not None:  # after the ranges: those are the float model's
        refiner.apply_shifts(job.model, decisions)
    progress("encoding")
    for method in METHODS.values():
        if encoded := [items[w.name] for w in job.weights if job.method(w) is method]:
            method.encode(job.model, encoded)
    if full_qdq:
        assert ranges is not None
        _insert_activations(job, items, ranges)
    elif (note := METHODS[plan.method].runtime_note) is not None:
        job.details["runtime"] = note
    return Step(job.model, opset, reports, job.skipped, job.warnings, job.details, histograms)


def _reports(
    job: _Job,
    items: dict[str, Quantized],
    decisions: dict[str, Decision],
    chosen: dict[str, str | None],
    folded: set[str],
) -> tuple[list[WeightReport], list[Histogram]]:
    """Each weight's line in the report (its method's, with the techniques applied and why), and its histogram."""
    reports, histograms = [], []
    for weight in job.weights:
        item, decision = items[weight.name], decisions.get(weight.name)
        method, array = job.method(weight), weight.array()
        overridden = job.note(weight)
        note = join(overridden, job.axes[weight.name][1], chosen[weight.name], decision.note if decision else None)
        reports.append(with_techniques(method.report(weight, array, item, note), weight.name in folded, decision))
        histograms.append(method.histogram(weight.name, array, item))
    return reports, histograms


def _insert_activations(job: _Job, items: dict[str, Quantized], ranges: activations.Ranges) -> None:
    """Full QDQ: the activations around the encoded integer weights."""
    assert isinstance(job.plan, LinearPlan)
    weights = {w.name: items[w.name] for w in job.weights}
    floats = {n: i for n, i in weights.items() if _float_layer(i)}
    if floats:
        qdq.decode_at_load(job.model, floats)
        job.details["decoded_at_load"] = sorted(floats)
        weights = {n: i for n, i in weights.items() if n not in floats}
    signed = job.plan.activation_type == "int8"
    details = activations.insert(job.model, weights, ranges, signed, job.plan.optimize)  # type: ignore[arg-type]
    job.details.update(details)
    if any(s.bits == 4 for s in job.settings.values()):
        job.warnings.append(
            "int4 weights in a full QDQ graph are not fused into integer kernels by onnxruntime; int8 runs faster"
        )


def _float_layer(item: Quantized) -> TypeGuard[qdq.LinearWeight]:
    """A DequantizeLinear weight that no integer kernel reads (an LSTM's): decoded on every inference, unless
    decoded at load instead (`qdq.decode_at_load`, main graph)."""
    return (
        isinstance(item, qdq.LinearWeight)
        and not item.packed
        and item.weight.graph_path == MAIN_GRAPH
        and not all(c.op_type in qdq.WEIGHTED_OPS for c in item.weight.consumers)
    )


def _fold(job: _Job, refiner: Refiner | None, *, everything: bool) -> dict[str, str]:
    """Fold BatchNorm into the layer before it (where that costs no accuracy once quantized, unless
    `everything`), then select again: folding rebuilt the graph."""
    if not job.plan.fold_batchnorm:
        return {}

    unshared = dataclasses.replace(job.context, memo=None)  # results for arrays that may not be kept

    def quantizer(
        weight: Weight, importance: np.ndarray | None
    ) -> tuple[int | None, Callable[[np.ndarray], np.ndarray]]:
        method, setting = job.method(weight), job.settings[weight.name]
        axis = method.axes(weight, setting, job.context)[0][-1]  # granularity auto: as if per channel
        return axis, lambda values: method.quantize(weight, values, setting, axis, importance, unshared).dequantized()

    folded = fold_batchnorm(job.model, None if everything else fold_filter(job.weights, quantizer, refiner))
    job.select()
    return folded


def _equalize(job: _Job) -> dict[str, str]:
    """Cross-layer equalization (`qconvert.equalize`), the BatchNorms inside its pairs folded first (where
    folding is on): returns what was folded. (On the PP-OCR direction classifier's full QDQ it cost 1.6 dB of
    output SNR, moving the activations' ranges; on a MobileNetV2-shaped model it gained 0.6: off by default
    there.)"""
    quantized = {w.name for w in job.weights}
    inside = through_batchnorm(job.model, quantized) if job.plan.fold_batchnorm else set()
    folded = fold_batchnorm(job.model, lambda weight, *_: weight in inside) if inside else {}
    if equalized := equalize(job.model, quantized):
        job.details["equalized"] = equalized
    job.select()
    return folded


def _vet(job: _Job) -> None:
    """Weights without NaN/Inf that their method can store; the others join the skipped."""
    kept = []
    for weight in finite(job.weights, job.skipped):
        reason = job.method(weight).unsupported(weight)
        if reason is None:
            kept.append(weight)
        else:
            job.skipped.append(Skipped(weight.name, weight.op_types, reason, weight.shape))
    require_weights(kept, job.skipped)
    job.weights = kept
    job.axes = {w.name: job.method(w).axes(w, job.settings[w.name], job.context) for w in job.weights}


def _prepare_opset(job: _Job) -> OpsetChange:
    """Raise the opset to what every weight's tightest encoding wants, if the plan allows; where the version
    converter cannot, to what they require (each method then stores its weights as that opset allows)."""
    before = default_opset(job.model)
    needs = {w.name: job.method(w).need(w, job.settings[w.name], job.axes[w.name][0][-1]) for w in job.weights}
    wanted, required = max(n.wanted for n in needs.values()), max(n.required for n in needs.values())
    if before >= wanted:
        return OpsetChange(before, before, "-")

    def above(level: int) -> dict[str, list[LayerSetting]]:
        """Per method, the settings of the weights that want an opset above `level`."""
        found: dict[str, list[LayerSetting]] = {}
        for weight in job.weights:
            if needs[weight.name].wanted > level:
                found.setdefault(job.method(weight).name, []).append(job.settings[weight.name])
        return found

    reasons = _reasons(above(before), before)
    allowed = getattr(job.plan, "raise_opset", True)
    if not allowed and required > before:
        raise UnsupportedModelError(
            f"linear layers need opset {required}, and --keep-opset forbids raising it from {before}"
        )
    reason = "--keep-opset"
    if allowed:
        try:
            _convert(job, wanted)
            return OpsetChange(before, wanted, "-", f"opset raised from {before} to {wanted} for {reasons}")
        except QConvertError as e:
            if required == wanted:  # nothing to fall back to
                raise UnsupportedModelError(f"{reasons} needs opset {wanted}: {e}") from e
            reason = str(e)
    after = max(before, required)  # what the weights cannot do without; their storage can
    missing = above(after)
    job.fell_back = set(missing)
    note = f"{_reasons(missing, before)} need opset {wanted} ({reason}); stored as {FALLBACK} instead"
    if after > before:
        _convert(job, after)
        note += f"; opset raised from {before} to {after} for the linear layers"
    return OpsetChange(before, after, "-", note)


def _reasons(by_method: dict[str, list[LayerSetting]], before: int) -> str:
    """What needs an opset above `before`, per method, in a few words."""
    return ", ".join(
        r for name, settings in by_method.items() if settings and (r := METHODS[name].opset_reason(settings, before))
    )


def _convert(job: _Job, target: int) -> None:
    """The model converted to `target` (in place of the input), its weights selected again there."""
    names = {w.name for w in job.weights}
    job.model = raise_opset(job.model, target, keep_input=False)
    job.context.opset = target
    skipped = job.skipped
    job.select()  # the converted model holds other proto objects
    job.weights = [w for w in job.weights if w.name in names]
    job.skipped = skipped


def _quantize(
    job: _Job, refiner: Refiner | None
) -> tuple[dict[str, Quantized], dict[str, Decision], dict[str, str | None]]:
    """Per weight: its method's result on each axis to try (the method chooses), then with the layer's
    input statistics the data-aware result on the chosen axis, and the check that keeps the better."""
    weights, settings, context = job.weights, job.settings, job.context

    def data_aware(weight: Weight, axis: int | None, array: np.ndarray | None = None) -> Quantized | None:
        """Each job makes its own error weights (as large as the weight's channels) and reads its own array:
        holding them all took 100 MB more on ResNet-50-shaped full QDQ."""
        importance = refiner.importance(weight) if refiner is not None else None
        if importance is None:
            return None
        values = weight.array() if array is None else array
        method = job.method(weight)
        result = method.quantize(weight, values, settings[weight.name], axis, importance, context)
        return refiner.compensated_result(method, weight, result, values) if refiner is not None else result

    def compute(weight: Weight, axis: int | None, refine: bool) -> tuple[Quantized, Quantized | None]:
        """The plain result and (`refine`) the data-aware one, from one read of the array."""
        array = weight.array()
        plain = job.method(weight).quantize(weight, array, settings[weight.name], axis, None, context)
        return plain, data_aware(weight, axis, array) if refine else None

    def refinable(weight: Weight) -> bool:
        return refiner is not None and job.refined(weight)

    job.progress(f"quantizing {len(weights)} weights")
    # A weight with one axis to try gets its data-aware result in the same job; with several, once its
    # method has chosen one.
    jobs = [(w, axis, refinable(w) and len(job.axes[w.name][0]) == 1) for w in weights for axis in job.axes[w.name][0]]
    arriving = in_order(compute, jobs, job.workers, sum(w.elements for w, *_ in jobs))
    plain: dict[str, Quantized] = {}
    refined: dict[str, Quantized] = {}
    chosen: dict[str, str | None] = {}
    for weight in weights:  # decided as each weight's results arrive: only the chosen ones stay
        tried = {axis: next(arriving) for axis in job.axes[weight.name][0]}
        options = {axis: result for axis, (result, _) in tried.items()}
        axis, chosen[weight.name] = job.method(weight).choose(weight, options, settings[weight.name])
        plain[weight.name] = options[axis]
        if (better := tried[axis][1]) is not None:
            refined[weight.name] = better
    if refiner is None:
        return plain, {}, chosen
    job.progress("quantizing for the layer outputs")
    later = [(w, plain[w.name].axis) for w in weights if refinable(w) and len(job.axes[w.name][0]) > 1]
    for (weight, *_), better in zip(
        later, in_order(data_aware, later, job.workers, sum(w.elements for w, *_ in later))
    ):
        if better is not None:
            refined[weight.name] = better
    job.progress("checking each layer's output on the calibration data")
    by_name = {w.name: w for w in weights}
    results = {
        w.name: (plain[w.name].dequantized, refined[w.name].dequantized if w.name in refined else None)
        for w in weights
        if refinable(w)
    }
    decisions = refiner.decide(job.model, results, lambda name: by_name[name].array())  # type: ignore[arg-type]
    job.details["calibration"] = refiner.summary(decisions)
    in_order_again, unshifted, decisions = _rounded_again(
        job, refiner, plain, _chosen(plain, refined, decisions), decisions
    )
    if refiner.stats.held_out:  # decided on samples the statistics did not see; the results use them all
        refiner.learn_from_all()  # GPTQ's results need every sample; energy-weighted clipping barely moves
        again = [
            (w, refined[w.name].axis)
            for w in weights
            if (d := decisions.get(w.name)) and d.refined and w.name in refiner.compensated
        ]
        for (weight, _), better in zip(
            again, in_order(data_aware, again, job.workers, sum(w.elements for w, _ in again))
        ):
            if better is not None:
                refined[weight.name] = better
    items = _chosen(plain, refined, decisions)
    if refiner.stats.held_out:
        decisions = refiner.final_shifts(
            decisions, {n: items[n].dequantized for n in decisions}, lambda n: by_name[n].array()
        )
    if in_order_again and refiner.feeds is not None:  # kept: fitted again on every batch
        job.progress(f"rounding {len(in_order_again)} layers again in graph order, on all calibration batches")
        batches = list(range(len(refiner.feeds.batches)))
        items, decisions = refiner.round_sequentially(
            job.model, in_order_again, items, decisions, job.quantizing, batches, unshifted
        )
    return items, decisions, chosen


def _chosen(
    plain: dict[str, Quantized], refined: dict[str, Quantized], decisions: dict[str, Decision]
) -> dict[str, Quantized]:
    return {name: refined[name] if (d := decisions.get(name)) and d.refined else item for name, item in plain.items()}


def _rounded_again(
    job: _Job,
    refiner: Refiner,
    plain: dict[str, Quantized],
    items: dict[str, Quantized],
    decisions: dict[str, Decision],
) -> tuple[list[Layer], list[str], dict[str, Decision]]:
    """The layers that `fidelity.sequential` rounds again, those of them whose bias it leaves alone, and the
    decisions: where a fit on the batches the statistics came from measures better on the held-out ones (the
    report's calibration details say), the last of them rounded again or plain, whichever measures better. Not in
    full QDQ: its fit would not see the activations' rounding."""
    if isinstance(job.plan, LinearPlan) and job.plan.activations:
        return [], [], decisions
    fitted = refiner.sequential_layers(job.model, decisions)
    if not fitted:
        return [], [], decisions
    job.progress(f"rounding {len(fitted)} layers again in graph order")
    after = refiner.round_sequentially(job.model, fitted, items, decisions, job.quantizing, refiner.stats.learned)
    name = fitted[-1].weight
    last = (name, plain[name], job.quantizing(name)[1].array())
    verdict, chosen = refiner.sequential_pays(job.model, (items, decisions), after, last)
    samples = min(len(refiner.feeds.batches), SEQUENTIAL_BATCHES) if refiner.feeds else 0
    job.details["calibration"]["sequential"] = {"layers": len(fitted), "samples": samples, **verdict}  # type: ignore[index]
    if not verdict["kept"]:
        return [], [], decisions
    if not chosen.refined:  # plainly rounded: not fitted again
        return fitted[:-1], [], {**decisions, name: chosen}
    return fitted, [name] if after[1][name].shift is not None and chosen.shift is None else [], decisions


def _described(job: _Job, opset: OpsetChange, items: dict[str, Quantized]) -> OpsetChange:
    """The opset change with how the weights are stored, and in its note how those that fell back are."""
    storage = ", ".join(sorted({job.method(w).storage(items[w.name]) for w in job.weights})) or "-"
    note = opset.note
    if note is not None and FALLBACK in note:
        fell_back = ", ".join(
            sorted({job.method(w).storage(items[w.name]) for w in job.weights if job.method(w).name in job.fell_back})
        )
        note = note.replace(FALLBACK, fell_back)
    return dataclasses.replace(opset, storage=storage, note=note)
