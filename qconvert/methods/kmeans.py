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
from qconvert.quant.kmeans import Palette, nearest, palettize, palettize_tensor, reconstruct
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight

DB_PER_BIT = 6.02  # SNR that one more index bit buys: what per-channel codebooks must beat per bit they cost
ESTIMATE_MIN_ELEMENTS = 1 << 20  # granularity auto: larger weights first estimate per-channel's gain on a sample
ESTIMATE_CHANNELS = 32


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
        overhead = overhead_bits(weight, setting.bits, axis)
        if overhead > context.max_codebook_overhead:
            return [None], (
                f"per-tensor: per-channel codebooks would add {overhead:.2f} bits per weight "
                f"(> --max-codebook-overhead {context.max_codebook_overhead:g})"
            )
        if setting.granularity is Granularity.PER_CHANNEL:
            return [axis], None
        if weight.elements >= ESTIMATE_MIN_ELEMENTS:  # skip the full per-channel k-means where it cannot pay
            gain = _sampled_gain(weight, setting.bits, axis)
            if gain is not None and gain < 0.5 * DB_PER_BIT * overhead:
                return [None], (
                    f"per-tensor: per-channel codebooks would gain about {gain:.1f} dB (on "
                    f"{ESTIMATE_CHANNELS} sampled channels) for {overhead:.2f} more bits per weight"
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
        palette = _palette(array, setting.bits, axis, importance, context.memo)
        return EncodedWeight(weight, palette, axis, setting.bits, storage_for(setting.bits, context.opset))

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
        overhead = overhead_bits(weight, setting.bits, axis)
        if gains[1] is None or (gains[0] is not None and gains[1] - gains[0] > DB_PER_BIT * overhead):
            return axis, None
        return None, f"per-tensor: per-channel codebooks gained {_gain(gains)} for {overhead:.2f} more bits per weight"

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
        return weight_report(
            weight,
            array,
            item,
            groups=palette.codebook.shape[0],
            stored_bytes=self.data_bytes(
                palette.indices.size,
                palette.codebook.shape[0],
                palette.codebook.dtype.itemsize,
                item.bits,
                item.storage,
            ),
            snr_db=snr_db(to_rows(array, item.axis), reconstruct(palette)),
            note=note,
        )

    def histogram(self, name: str, array: np.ndarray, item: EncodedWeight) -> Histogram:  # type: ignore[override]
        return Histogram.of(name, array, item.palette.codebook, rows=item.palette.codebook.shape[0])

    def levels(self, item: EncodedWeight) -> np.ndarray:
        """Per channel (one row per tensor): its codebook, ascending."""
        return item.palette.codebook.astype(np.float64)

    def with_levels(self, item: EncodedWeight, levels: np.ndarray) -> EncodedWeight:
        """The item with other codebooks (sorted rows, as `levels` gives them); its indices follow in `on_values`."""
        codebook = levels.astype(item.palette.codebook.dtype)
        return dataclasses.replace(item, palette=Palette(codebook, item.palette.indices))

    def on_values(self, item: EncodedWeight, array: np.ndarray) -> EncodedWeight:
        """The item holding `array`, whose values are entries of its codebooks."""
        codebook = item.palette.codebook
        indices = nearest(to_rows(array.astype(codebook.dtype), item.axis), codebook)
        return dataclasses.replace(item, palette=Palette(codebook, indices))

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


def _palette(
    array: np.ndarray,
    bits: int,
    axis: int | None,
    importance: np.ndarray | None,
    memo: dict[tuple[object, ...], object] | None,
) -> Palette:
    """palettize_tensor, looked up in `memo` by the values' digest first (palettes are deterministic)."""
    if memo is None:
        return palettize_tensor(array, bits, axis, importance)
    digest = hashlib.sha256(np.ascontiguousarray(array).data)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if importance is not None:
        digest.update(np.ascontiguousarray(importance, np.float64).data)
        digest.update(f"{np.shape(importance)}".encode())
    key = "kmeans", digest.digest(), bits, axis
    if key not in memo:
        memo[key] = palettize_tensor(array, bits, axis, importance)
    palette = memo[key]
    assert isinstance(palette, Palette)
    return palette


def _sampled_gain(weight: Weight, bits: int, axis: int) -> float | None:
    """Per-channel codebooks' SNR gain over one shared codebook, on a seeded sample of channels (None: exact)."""
    rows = to_rows(weight.array(), axis)
    picked = np.random.default_rng(0).choice(rows.shape[0], min(ESTIMATE_CHANNELS, rows.shape[0]), replace=False)
    sample = rows[np.sort(picked)]
    shared = reconstruct(palettize(sample.reshape(1, -1), bits=bits)).reshape(sample.shape)
    snrs = snr_db(sample, shared), snr_db(sample, reconstruct(palettize(sample, bits=bits)))
    return None if None in snrs else snrs[1] - snrs[0]  # type: ignore[operator]


def _gain(snrs: list[float | None]) -> str:
    return "nothing" if snrs[0] is None else f"{snrs[1] - snrs[0]:.1f} dB" if snrs[1] is not None else "exactness"
