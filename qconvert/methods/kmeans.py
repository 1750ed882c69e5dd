"""k-means palettes: 2**bits centroids per tensor or per output channel, indices decoded in the graph."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import ClassVar

import numpy as np
import onnx

from qconvert.encode import (
    EncodedWeight,
    IndexStorage,
    encode_palettes,
    fallback_storage,
    index_bytes,
    min_opset,
    preferred_storage,
)
from qconvert.methods.base import Context, Need, weight_report
from qconvert.plan import Granularity, LayerSetting
from qconvert.quant.kmeans import Palette, nearest, palettize, palettize_scaled, palettize_tensor, reconstruct
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight

DB_PER_BIT = 6.02  # SNR that one more index bit buys: what per-channel codebooks must beat per bit they cost
# Larger weights judge per channel on a sample of channels: granularity auto stays per tensor where neither
# per-channel form pays there; per channel computes only the form that pays more (on ResNet-50 computing
# every form of every weight took 65 % more time and 120 MB more memory)
FORM_SAMPLE_ELEMENTS = 1 << 18
# Scaled palettes at 5 bits and more: 32+ levels per tensor leave per-channel ranges little to buy, and on the
# PP-OCRv4 recognizer's kmeans 8 they lowered the output SNR from 33 to 26 dB while raising the weights' own.
SCALED_MAX_BITS = 4
ESTIMATE_POINTS = 4  # the estimates cluster at most this many runs of values per centroid (exact k-means: thousands)
ESTIMATE_CHANNELS = 32
SCALED = "per-channel-scaled"  # the report's granularity of one codebook scaled per channel


class KMeans:
    """Palettes from exact 1-D k-means (`quant.kmeans`), stored as uint8/uint4/uint2 or bit-packed indices."""

    name: ClassVar[str] = "kmeans"
    runtime_note: ClassVar[str | None] = None

    def unsupported(self, weight: Weight) -> str | None:
        return None

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        """Per-channel is tried where its codebooks add at most --max-codebook-overhead bits per weight; auto
        tries both (unless a sample of channels shows it cannot pay) and `choose` picks."""
        if setting.granularity is Granularity.PER_TENSOR:
            return [None], None
        axis = weight.channel_axis
        if axis is None:
            return [None], "per-tensor: its consumers disagree on the channel axis"
        overhead = min(overhead_bits(weight, setting.bits, axis), scale_bits(weight, axis, setting.bits))
        if overhead > context.max_codebook_overhead:
            return [None], (
                f"per-tensor: per-channel {'codebooks or scales' if setting.bits <= SCALED_MAX_BITS else 'codebooks'} "
                f"would add {overhead:.2f} bits per weight "
                f"(> --max-codebook-overhead {context.max_codebook_overhead:g})"
            )
        if setting.granularity is Granularity.PER_CHANNEL:
            return [axis], None
        if weight.elements >= FORM_SAMPLE_ELEMENTS:  # skip the full per-channel k-means where it cannot pay
            gains = _sampled_gains(weight, setting.bits, axis)
            costs = overhead_bits(weight, setting.bits, axis), scale_bits(weight, axis, setting.bits)
            if all(g is not None and g < DB_PER_BIT * c for g, c in zip(gains, costs)):
                return [None], (
                    f"per-tensor: on {ESTIMATE_CHANNELS} sampled channels, per-channel codebooks would gain about "
                    f"{gains[0]:.1f} dB for {costs[0]:.2f} more bits per weight, scales {gains[1]:.1f} dB for "
                    f"{costs[1]:.2f}"
                )
        return [None, axis], None

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        return Need(wanted=min_opset(preferred_storage(setting.bits)), required=1)

    def opset_reason(self, settings: list[LayerSetting], before: int) -> str | None:
        storages = {preferred_storage(s.bits).value for s in settings if min_opset(preferred_storage(s.bits)) > before}
        return f"{', '.join(sorted(storages))} indices" if storages else None

    def quantize(
        self,
        weight: Weight,
        array: np.ndarray,
        setting: LayerSetting,
        axis: int | None,
        importance: np.ndarray | None,
        context: Context,
    ) -> EncodedWeight:
        """Along an axis, the better per stored bit of one codebook per channel and one scaled per channel
        (measured on all channels, or past FORM_SAMPLE_ELEMENTS on a sample of them, computing only the
        winner)."""
        storage = storage_for(setting.bits, context.opset)
        if axis is None or setting.bits > SCALED_MAX_BITS:
            return EncodedWeight(
                weight, _palette(array, setting.bits, axis, importance, context.memo), axis, setting.bits, storage
            )
        if overhead_bits(weight, setting.bits, axis) > context.max_codebook_overhead:
            scaled = True  # only scales fit the budget
        elif weight.elements >= FORM_SAMPLE_ELEMENTS:
            sample = _sample(weight, axis)
            points = ESTIMATE_POINTS << setting.bits
            tried = [palettize(sample, bits=setting.bits, max_points=points), _scaled_estimate(sample, setting.bits)]
            scaled = _score(sample, tried[1], weight, setting.bits, axis) > _score(
                sample, tried[0], weight, setting.bits, axis
            )
        else:
            forms = [_palette(array, setting.bits, axis, importance, context.memo, scaled=s) for s in (False, True)]
            rows = to_rows(array, axis)
            scores = [_score(rows, p, weight, setting.bits, axis) for p in forms]
            return EncodedWeight(weight, forms[int(scores[1] > scores[0])], axis, setting.bits, storage)
        palette = _palette(array, setting.bits, axis, importance, context.memo, scaled=scaled)
        return EncodedWeight(weight, palette, axis, setting.bits, storage)

    def choose(
        self,
        weight: Weight,
        tried: dict[int | None, EncodedWeight],  # type: ignore[override]
        setting: LayerSetting,
    ) -> tuple[int | None, str | None]:
        """Per channel where it pays: it must gain more than the ~6 dB per bit that spending its codebook
        overhead on index bits would buy."""
        axes = list(tried)
        if len(axes) == 1:
            return axes[0], None
        axis = axes[1]
        assert axis is not None
        array = weight.array()
        gains = [snr_db(to_rows(array, a), reconstruct(tried[a].palette)) for a in (None, axis)]
        overhead = _overhead(tried[axis].palette, weight, setting.bits, axis)
        if gains[1] is None or (gains[0] is not None and gains[1] - gains[0] > DB_PER_BIT * overhead):
            return axis, None
        form = "scaled codebooks" if tried[axis].palette.scale is not None else "codebooks"
        return None, f"per-tensor: per-channel {form} gained {_gain(gains)} for {overhead:.2f} more bits per weight"

    def storage(self, item: EncodedWeight) -> str:  # type: ignore[override]
        return item.storage.value

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        return index_bytes(elements, IndexStorage(storage), bits) + channels * (1 << bits) * itemsize

    def encode(self, model: onnx.ModelProto, items: list[EncodedWeight]) -> None:  # type: ignore[override]
        encode_palettes(model, items)

    def report(
        self,
        weight: Weight,
        array: np.ndarray,
        item: EncodedWeight,  # type: ignore[override]
        note: str | None,
    ) -> WeightReport:
        palette = item.palette
        stored = self.data_bytes(
            palette.indices.size, palette.codebook.shape[0], palette.codebook.dtype.itemsize, item.bits, item.storage
        )
        report = weight_report(
            weight,
            array,
            item,
            groups=palette.indices.shape[0],
            stored_bytes=stored + (4 * palette.scale.size if palette.scale is not None else 0),
            snr_db=snr_db(to_rows(array, item.axis), reconstruct(palette)),
            note=note,
        )
        return dataclasses.replace(report, granularity=SCALED) if palette.scale is not None else report

    def histogram(self, name: str, array: np.ndarray, item: EncodedWeight) -> Histogram:  # type: ignore[override]
        levels = item.palette.levels()
        return Histogram.of(name, array, levels, rows=levels.shape[0])

    def levels(self, item: EncodedWeight) -> np.ndarray:
        """Per channel (one row per tensor): the values it can take, ascending."""
        return item.palette.levels(np.float64)

    def refittable(self, item: EncodedWeight) -> bool:
        """Free codebooks can move (`with_levels`); scaled ones are tied to their scales."""
        return item.palette.scale is None

    def with_levels(self, item: EncodedWeight, levels: np.ndarray) -> EncodedWeight:
        """The item with other codebooks (sorted rows, as `levels` gives them); its indices follow in `on_values`."""
        codebook = levels.astype(item.palette.codebook.dtype)
        return dataclasses.replace(item, palette=Palette(codebook, item.palette.indices))

    def on_values(self, item: EncodedWeight, array: np.ndarray) -> EncodedWeight:
        """The item holding `array`, whose values lie on its levels."""
        palette = item.palette
        rows = to_rows(array, item.axis).astype(np.float64)
        if palette.scale is not None:
            rows = rows / np.where(palette.scale > 0, palette.scale, 1)[:, None]
            codebook = np.broadcast_to(palette.codebook, (rows.shape[0], palette.codebook.shape[1]))
        else:
            codebook = palette.codebook
        indices = nearest(rows.astype(palette.codebook.dtype), codebook)
        return dataclasses.replace(item, palette=Palette(palette.codebook, indices, palette.scale))

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> EncodedWeight:
        channels = weight.shape[axis] if axis is not None else 1
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type)
        palette = Palette(np.zeros((channels, 1 << bits), dtype), np.zeros((channels, 1), np.uint8))
        return EncodedWeight(weight, palette, axis, bits, storage_for(bits, opset))


def storage_for(bits: int, opset: int) -> IndexStorage:
    """The tightest index storage at this opset: uint4/uint2 where it allows them, else packed or uint8."""
    preferred = preferred_storage(bits)
    return preferred if min_opset(preferred) <= opset else fallback_storage(bits, opset)


def overhead_bits(weight: Weight, bits: int, axis: int) -> float:
    """Bits per weight that C codebooks of 2**bits entries add over one."""
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize
    return (weight.shape[axis] - 1) * (1 << bits) * itemsize * 8 / weight.elements


def _score(rows: np.ndarray, palette: Palette, weight: Weight, bits: int, axis: int) -> float:
    """SNR less what its side data (codebooks, scales) costs, at DB_PER_BIT per bit per weight."""
    snr = snr_db(rows, reconstruct(palette))
    return np.inf if snr is None else snr - DB_PER_BIT * _overhead(palette, weight, bits, axis)


def _overhead(palette: Palette, weight: Weight, bits: int, axis: int) -> float:
    """Bits per weight that a per-channel palette adds over one codebook: C − 1 codebooks, or C scales."""
    return scale_bits(weight, axis) if palette.scale is not None else overhead_bits(weight, bits, axis)


def scale_bits(weight: Weight, axis: int, bits: int = 1) -> float:
    """Bits per weight that a scale per channel (float32) adds (inf past SCALED_MAX_BITS: not offered)."""
    return 32 * weight.shape[axis] / weight.elements if bits <= SCALED_MAX_BITS else np.inf


def _palette(
    array: np.ndarray,
    bits: int,
    axis: int | None,
    importance: np.ndarray | None,
    memo: dict[tuple[object, ...], object] | None,
    scaled: bool = False,
) -> Palette:
    """palettize_tensor (or `scaled`: palettize_scaled), looked up in `memo` by the values' digest first
    (palettes are deterministic)."""

    def make() -> Palette:
        if scaled:
            assert axis is not None
            return palettize_scaled(array, bits, axis, importance)
        return palettize_tensor(array, bits, axis, importance)

    if memo is None:
        return make()
    digest = hashlib.sha256(np.ascontiguousarray(array).data)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if importance is not None:
        digest.update(np.ascontiguousarray(importance, np.float64).data)
        digest.update(f"{np.shape(importance)}".encode())
    key = "kmeans", digest.digest(), bits, axis, scaled
    if key not in memo:
        memo[key] = make()
    palette = memo[key]
    assert isinstance(palette, Palette)
    return palette


def _scaled_estimate(sample: np.ndarray, bits: int) -> Palette:
    return palettize_scaled(sample, bits, 0, max_points=ESTIMATE_POINTS << bits)


def _sample(weight: Weight, axis: int) -> np.ndarray:
    """A seeded sample of ESTIMATE_CHANNELS channels (rows), in order."""
    rows = to_rows(weight.array(), axis)
    picked = np.random.default_rng(0).choice(rows.shape[0], min(ESTIMATE_CHANNELS, rows.shape[0]), replace=False)
    return rows[np.sort(picked)]


def _sampled_gains(weight: Weight, bits: int, axis: int) -> tuple[float | None, float | None]:
    """SNR gains over one shared codebook of per-channel codebooks and of scaled ones, on a seeded sample
    of channels (None: exact)."""
    sample = _sample(weight, axis)
    one = reconstruct(palettize(sample.reshape(1, -1), bits=bits, max_points=ESTIMATE_POINTS << bits))
    shared = snr_db(sample, one.reshape(sample.shape))
    forms = palettize(sample, bits=bits, max_points=ESTIMATE_POINTS << bits), _scaled_estimate(sample, bits)
    snrs = [snr_db(sample, reconstruct(form)) for form in forms]
    return tuple(None if shared is None or snr is None else snr - shared for snr in snrs)  # type: ignore[return-value]


def _gain(snrs: list[float | None]) -> str:
    return "nothing" if snrs[0] is None else f"{snrs[1] - snrs[0]:.1f} dB" if snrs[1] is not None else "exactness"
