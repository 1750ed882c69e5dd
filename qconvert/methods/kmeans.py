"""The k-means method: palettes per weight (a thread per core for big models), decoded in the graph."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from qconvert import qdq
from qconvert.encode import (
    EncodedWeight,
    IndexStorage,
    encode_palettes,
    fallback_storage,
    min_opset,
    preferred_storage,
    stored_bytes,
)
from qconvert.errors import QConvertError, UnsupportedModelError
from qconvert.fidelity import Deferred
from qconvert.fold import fold_batchnorm
from qconvert.methods.common import Progress, Step, finite, in_order, join, readers_note, require_weights, select
from qconvert.methods.linear import linear_axis, linear_histogram, linear_opset, linear_report
from qconvert.methods.refine import Quantizer, fold_filter, refiner_for, with_techniques
from qconvert.opset import default_opset, raise_opset
from qconvert.plan import Granularity, KMeansPlan, LayerSetting, layer_setting
from qconvert.quant.kmeans import Palette, palettize, palettize_tensor, reconstruct
from qconvert.quant.layout import from_rows, snr_db, to_rows
from qconvert.report import Histogram, OpsetChange, WeightReport
from qconvert.select import Weight

DB_PER_BIT = 6.02  # SNR that one more index bit buys: what per-channel codebooks must beat per bit they cost
ESTIMATE_MIN_ELEMENTS = 1 << 20  # granularity auto: larger weights first estimate per-channel's gain on a sample
ESTIMATE_CHANNELS = 32

PaletteMemo = dict[tuple[bytes, int, int | None], Palette]  # (digest of the values and error weights, bits, axis) -> palette


def kmeans_step(model: onnx.ModelProto, plan: KMeansPlan, progress: Progress, workers: int, data: Path | None = None,
                memo: PaletteMemo | None = None) -> Step:
    """Palettize the weights; layers that an override switches to linear get DequantizeLinear instead.

    With `data` (calibration inputs), palettes minimise each layer's output error and biases absorb
    the mean error, wherever that measurably beats plain k-means on the layer's output. A `memo`
    shared by conversions of one model (auto's trials) gives back palettes already computed.
    """
    details: dict[str, object] = {}
    selection = select(model, plan)
    settings = {w.name: layer_setting(plan, w.name) for w in selection.weights}
    palette_bits = {s.bits for s in settings.values() if s.method == "kmeans"}
    linear_weights = [w for w in selection.weights if settings[w.name].method == "linear"]
    linear_axes = {w.name: linear_axis(w, settings[w.name].granularity) for w in linear_weights}
    linear_bits = {settings[w.name].bits for w in linear_weights}
    linear_needs = linear_opset(linear_weights, linear_axes, linear_bits) if linear_weights else 1
    del linear_weights  # they hold tensors of the model that an opset change replaces
    refiner = refiner_for(model, [w for w in selection.weights if settings[w.name].method == "kmeans"], plan, data, progress)
    folded = {}
    if plan.fold_batchnorm:
        folded = fold_batchnorm(model, where=fold_filter(selection.weights, _quantizer(plan, settings, linear_axes), refiner))
        selection = select(model, plan)  # folding rebuilt the graph
    if folded:
        details["folded_batchnorm"] = list(folded)
    model, opset, storages = _prepare_opset(model, plan, palette_bits, linear_needs)
    if opset.after != opset.before:
        selection = select(model, plan)  # the converted model holds other proto objects
    skipped = list(selection.skipped)
    weights = finite(selection.weights, skipped)
    if refiner is not None:
        refiner.bind(model, weights)
    items: list[EncodedWeight] = []
    linear_items: list[qdq.LinearWeight] = []
    reports: list[WeightReport] = []
    histograms: list[Histogram] = []
    pending: list[tuple[Weight, list[int | None], str | None]] = []  # weight, codebook axes to try, note
    for weight in weights:
        setting = settings[weight.name]
        if setting.method == "linear":
            array = weight.array()
            axis, why = linear_axes[weight.name]
            linear = qdq.quantize_weight(weight, array, bits=setting.bits, symmetric=True, axis=axis)
            linear_items.append(linear)
            reports.append(linear_report(weight, array, linear, join("linear by a layer override", why)))
            histograms.append(linear_histogram(weight.name, array, linear))
        else:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize
            pending.append((weight, *_codebook_axes(weight, itemsize, plan, setting.bits, setting.granularity)))
    progress(f"palettizing {len(pending)} weights")
    arriving = _run([(w, axis, None) for w, axes, _ in pending for axis in axes], settings, workers, memo)
    plain: dict[tuple[str, int | None], Palette] = {}
    chosen: dict[str, tuple[int | None, str | None]] = {}
    for weight, axes, note in pending:  # decided as each weight's palettes arrive: only the chosen ones stay
        tried = dict(next(arriving) for _ in axes)
        axis, why = _granularity(weight, tried, axes, settings[weight.name].bits)
        chosen[weight.name] = axis, join(note, why)
        plain[weight.name, axis] = tried[weight.name, axis]
    decisions = {}
    refined: dict[tuple[str, int | None], Palette] = {}
    if refiner is not None:
        importance = {w.name: refiner.importance(w) for w, _, _ in pending}
        progress("palettizing for the layer outputs")
        refined = dict(_run([(w, chosen[w.name][0], importance[w.name]) for w, _, _ in pending if importance[w.name] is not None],
                            settings, workers, memo))
        progress("checking each layer's output on the calibration data")
        results: dict[str, tuple[Deferred, Deferred | None]] = {}
        for weight, _, _ in pending:
            axis = chosen[weight.name][0]
            better = refined.get((weight.name, axis))
            results[weight.name] = (partial(_decoded, plain[weight.name, axis], weight.shape, axis),
                                    partial(_decoded, better, weight.shape, axis) if better else None)
        by_name = {w.name: w for w, _, _ in pending}
        decisions = refiner.decide(model, results, lambda name: by_name[name].array())
        details["calibration"] = refiner.summary(decisions)
        del results
        refiner.apply_shifts(model, decisions)
    for weight, _, _ in pending:
        bits = settings[weight.name].bits
        axis, note = chosen[weight.name]
        decision = decisions.get(weight.name)
        palette = (refined if decision and decision.refined else plain)[weight.name, axis]
        array = weight.array()
        item = EncodedWeight(weight, palette, axis, bits, storages[bits])
        items.append(item)
        report = _palette_report(weight, array, item, join(note, decision.note if decision else None))
        reports.append(with_techniques(report, weight.name in folded.values(), decision))
        histograms.append(Histogram.of(weight.name, array, palette.codebook, rows=palette.codebook.shape[0]))
    del plain, refined
    require_weights([*items, *linear_items], skipped)
    progress("encoding")
    encode_palettes(model, items)
    qdq.insert_weight_dq(model, linear_items)
    if linear_items:
        kinds = {np.dtype(x.storage).name for x in linear_items}
        opset = dataclasses.replace(opset, storage=", ".join(sorted({*opset.storage.split(", "), *kinds} - {"-"})))
    return Step(model, opset, reports, skipped, details=details, histograms=histograms)


def _decoded(palette: Palette, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    return from_rows(reconstruct(palette), shape, axis)


def _quantizer(plan: KMeansPlan, settings: dict[str, LayerSetting], linear_axes: dict[str, tuple[int | None, str | None]]) -> Quantizer:
    """How each weight will be quantized (its axis, and the array it comes back as), for the fold decision."""

    def quantizer(weight: Weight, importance: np.ndarray | None) -> tuple[int | None, Callable[[np.ndarray], np.ndarray]]:
        setting = settings[weight.name]
        if setting.method == "linear":
            axis = linear_axes[weight.name][0]
            return axis, lambda values: qdq.quantize_weight(weight, values, bits=setting.bits, symmetric=True, axis=axis).dequantized()
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize
        axis = _codebook_axes(weight, itemsize, plan, setting.bits, setting.granularity)[0][-1]  # auto: as if per channel
        return axis, lambda values: _decoded(palettize_tensor(values, setting.bits, axis, importance), weight.shape, axis)

    return quantizer


def _prepare_opset(model: onnx.ModelProto, plan: KMeansPlan, bits_used: set[int],
                   linear_needs: int = 1) -> tuple[onnx.ModelProto, OpsetChange, dict[int, IndexStorage]]:
    """Pick the index storage per bit width; raise the opset if one needs it and the plan allows.

    `linear_needs` is the opset that linear layers of the plan require (they cannot fall back).
    """
    before = default_opset(model)
    storages = {bits: preferred_storage(bits) for bits in bits_used}
    needed = max([linear_needs, *(min_opset(s) for s in storages.values())])
    if before < linear_needs and not plan.raise_opset:
        raise UnsupportedModelError(f"linear layers need opset {linear_needs}, and --keep-opset forbids raising it from {before}")

    def described(chosen: dict[int, IndexStorage]) -> str:
        return ", ".join(sorted({s.value for s in chosen.values()})) or "-"

    if before >= needed:
        return model, OpsetChange(before, before, described(storages)), storages
    wanted = ", ".join(sorted({s.value for s in storages.values() if min_opset(s) > before})) or "DequantizeLinear"
    if plan.raise_opset:
        try:
            converted = raise_opset(model, needed, keep_input=False)  # the caller drops the input
            note = f"opset raised from {before} to {needed} for {wanted} indices"
            return converted, OpsetChange(before, needed, described(storages), note), storages
        except QConvertError as e:
            reason = str(e)
    else:
        reason = "--keep-opset"
    after = max(before, linear_needs)  # the linear layers cannot do without it; the indices can
    fallback = {bits: s if min_opset(s) <= after else fallback_storage(bits, after) for bits, s in storages.items()}
    note = f"{wanted} indices need opset {needed} ({reason}); stored as {described(fallback)} instead"
    if after > before:
        model = raise_opset(model, after, keep_input=False)
        note += f"; opset raised from {before} to {after} for the linear layers"
    return model, OpsetChange(before, after, described(fallback), note), fallback


def _codebook_axes(weight: Weight, itemsize: int, plan: KMeansPlan, bits: int, granularity: Granularity) -> tuple[list[int | None], str | None]:
    """The codebook axes to try (None: one codebook per tensor), and why that differs from what was asked.

    Per-channel is tried where its codebooks add at most --max-codebook-overhead bits per weight; auto
    tries both and `_granularity` picks.
    """
    if granularity is Granularity.PER_TENSOR:
        return [None], None
    axis = weight.channel_axis
    if axis is None:
        return [None], "per-tensor: its consumers disagree on the channel axis"
    overhead = _overhead_bits(weight, itemsize, bits, axis)
    if overhead > plan.max_codebook_overhead:
        return [None], (f"per-tensor: per-channel codebooks would add {overhead:.2f} bits per weight "
                        f"(> --max-codebook-overhead {plan.max_codebook_overhead:g})")
    if granularity is Granularity.PER_CHANNEL:
        return [axis], None
    if weight.elements >= ESTIMATE_MIN_ELEMENTS:  # skip the full per-channel k-means where a sample shows it cannot pay
        gain = _sampled_gain(weight, bits, axis)
        if gain is not None and gain < 0.5 * DB_PER_BIT * overhead:
            return [None], (f"per-tensor: per-channel codebooks would gain about {gain:.1f} dB (on {ESTIMATE_CHANNELS} sampled channels) "
                            f"for {overhead:.2f} more bits per weight")
    return [None, axis], None


def _sampled_gain(weight: Weight, bits: int, axis: int) -> float | None:
    """Per-channel codebooks' SNR gain over one shared codebook, on a seeded sample of channels (None: exact)."""
    rows = to_rows(weight.array(), axis)
    sample = rows[np.sort(np.random.default_rng(0).choice(rows.shape[0], min(ESTIMATE_CHANNELS, rows.shape[0]), replace=False))]
    shared = reconstruct(palettize(sample.reshape(1, -1), bits=bits)).reshape(sample.shape)
    snrs = snr_db(sample, shared), snr_db(sample, reconstruct(palettize(sample, bits=bits)))
    return None if None in snrs else snrs[1] - snrs[0]  # type: ignore[operator]


def _overhead_bits(weight: Weight, itemsize: int, bits: int, axis: int) -> float:
    """Bits per weight that C codebooks of 2**bits entries add over one."""
    return (weight.shape[axis] - 1) * (1 << bits) * itemsize * 8 / weight.elements


def _granularity(weight: Weight, palettes: dict[tuple[str, int | None], Palette], axes: list[int | None],
                 bits: int) -> tuple[int | None, str | None]:
    """Of the palettes tried, per channel where it pays: it must gain more than the ~6 dB per bit that
    spending its codebook overhead on index bits would buy."""
    if len(axes) == 1:
        return axes[0], None
    axis = axes[1]
    assert axis is not None
    array, per_tensor, per_channel = weight.array(), palettes[weight.name, None], palettes[weight.name, axis]
    gains = [snr_db(to_rows(array, a), reconstruct(p)) for a, p in ((None, per_tensor), (axis, per_channel))]
    itemsize = array.dtype.itemsize
    overhead = _overhead_bits(weight, itemsize, bits, axis)
    if gains[1] is None or (gains[0] is not None and gains[1] - gains[0] > DB_PER_BIT * overhead):
        return axis, None
    return None, f"per-tensor: per-channel codebooks gained {_gain(gains)} for {overhead:.2f} more bits per weight"


def _gain(snrs: list[float | None]) -> str:
    return "nothing" if snrs[0] is None else f"{snrs[1] - snrs[0]:.1f} dB" if snrs[1] is not None else "exactness"


def _run(jobs: list[tuple[Weight, int | None, np.ndarray | None]], settings: dict[str, LayerSetting],
         workers: int, memo: PaletteMemo | None = None) -> Iterator[tuple[tuple[str, int | None], Palette]]:
    """Palettes of (weight, codebook axis, error weights) jobs, in order, keyed by weight name and axis."""
    arrays = ((w.array(), settings[w.name].bits, axis, importance) for w, axis, importance in jobs)  # one array at a time
    results = in_order(palettize_tensor if memo is None else _memoized(memo), arrays, workers, sum(w.elements for w, _, _ in jobs))
    return (((w.name, axis), palette) for (w, axis, _), palette in zip(jobs, results))


def _memoized(memo: PaletteMemo) -> Callable[..., Palette]:
    """palettize_tensor, looked up in `memo` by the values' digest first (palettes are deterministic)."""

    def compute(array: np.ndarray, bits: int, axis: int | None, importance: np.ndarray | None) -> Palette:
        digest = hashlib.sha256(np.ascontiguousarray(array).data)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        if importance is not None:
            digest.update(np.ascontiguousarray(importance, np.float64).data)
            digest.update(f"{np.shape(importance)}".encode())
        key = digest.digest(), bits, axis
        if key not in memo:
            memo[key] = palettize_tensor(array, bits, axis, importance)
        return memo[key]

    return compute


def _palette_report(weight: Weight, array: np.ndarray, item: EncodedWeight, note: str | None) -> WeightReport:
    palette, axis = item.palette, item.axis
    return WeightReport(
        name=weight.name,
        source=weight.source,
        graph=weight.graph_path,
        consumers=[c.op_type for c in weight.consumers],
        shape=list(weight.shape),
        elements=weight.elements,
        dtype=str(array.dtype),
        bits=item.bits,
        granularity=(Granularity.PER_TENSOR if axis is None else Granularity.PER_CHANNEL).value,
        channel_axis=axis,
        groups=palette.codebook.shape[0],
        float_bytes=array.nbytes,
        stored_bytes=stored_bytes(palette, item.storage, item.bits),
        snr_db=snr_db(to_rows(array, axis), reconstruct(palette)),
        note=join(note, readers_note(weight)),
    )
