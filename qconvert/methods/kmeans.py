"""k-means palettes: 2**bits centroids per tensor or per output channel, indices decoded in the graph."""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from dataclasses import dataclass
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
    offset_bytes,
    preferred_storage,
)
from qconvert.methods.base import DB_PER_BIT, Context, Need, gain_text, weight_report
from qconvert.plan import Granularity, LayerSetting
from qconvert.quant.kmeans import (
    Palette,
    nearest,
    palettize,
    palettize_grouped,
    palettize_scaled,
    palettize_tensor,
    reconstruct,
)
from qconvert.quant.layout import snr_db, to_rows
from qconvert.report import Histogram, WeightReport
from qconvert.select import Weight

# Larger weights judge per channel on a sample of channels: granularity auto stays per tensor where no
# per-channel form pays there; per channel computes only the form that pays more (on ResNet-50 computing
# every form of every weight took 65 % more time and 120 MB more memory)
FORM_SAMPLE_ELEMENTS = 1 << 18
# Scaled palettes at 5 bits and more: 32+ levels per tensor leave per-channel ranges little to buy, and on the
# PP-OCRv4 recognizer's kmeans 8 they lowered the output SNR from 33 to 26 dB while raising the weights' own.
SCALED_MAX_BITS = 4
ESTIMATE_POINTS = 4  # the estimates cluster at most this many runs of values per centroid (exact k-means: thousands)
ESTIMATE_CHANNELS = 32
# Grouped palettes: channels per codebook tried by default. On the PP-OCR and orientation models' weights past
# 4K elements, the best score per stored bit came from groups of 8 to 64 channels about as often each; one size
# keeps ResNet-50-shaped kmeans 4 at 1.1x onnxruntime's quantize_static time (two sizes: 1.4x).
GROUP_SIZES = (16,)
# the report's granularity of one codebook scaled per channel, and of one codebook per group of channels
GRANULARITY = {"scaled": "per-channel-scaled", "grouped": "grouped"}


class KMeans:
    """Palettes from exact 1-D k-means (`quant.kmeans`), stored as uint8/uint4/uint2 or bit-packed indices."""

    name: ClassVar[str] = "kmeans"
    runtime_note: ClassVar[str | None] = None

    def unsupported(self, weight: Weight) -> str | None:
        return None

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        """Along the channel axis where some form of it (`_forms`) fits --max-codebook-overhead; auto tries
        per tensor too (unless a sample of channels shows no form can pay) and `choose` picks."""
        if setting.granularity is Granularity.PER_TENSOR:
            return [None], None
        axis = weight.channel_axis
        if axis is None:
            return [None], "per-tensor: its consumers disagree on the channel axis"
        forms = _forms(weight, setting.bits, axis, context)
        if not forms:
            cheapest = min(f.overhead(weight, setting.bits, axis) for f in _forms(weight, setting.bits, axis))
            return [None], (
                f"per-tensor: per-channel palettes would add at least {cheapest:.2f} bits per weight "
                f"(> --max-codebook-overhead {context.max_codebook_overhead:g})"
            )
        if setting.granularity is Granularity.PER_CHANNEL or context.group_size is not None:
            return [axis], None
        # Where only grouped palettes fit the budget, they are checked so at any size: offered and then not
        # chosen, they would still count as per channel when BatchNorm folding decides (folded so, the PP-OCR
        # direction classifier's 5x5 depthwise kernels at 2 bits fell 8.5 -> 6.3 dB, the model 23.8 -> 11.8)
        only_grouped = all(f.kind == "grouped" for f in forms)
        if weight.elements >= FORM_SAMPLE_ELEMENTS or only_grouped:  # skip the full k-means where it cannot pay
            shared, scores = _estimated(weight, setting.bits, axis, tuple(forms))
            if shared is not None and all(score < shared for score in scores.values()):
                best = max(scores, key=scores.__getitem__)
                return [None], (
                    f"per-tensor: on {ESTIMATE_CHANNELS} sampled channels, the best per-channel form ({best.label}) "
                    f"would gain {scores[best] - shared + DB_PER_BIT * best.overhead(weight, setting.bits, axis):.1f}"
                    f" dB for {best.overhead(weight, setting.bits, axis):.2f} more bits per weight"
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
        """Along an axis, the best per stored bit of the forms that fit (`_forms`): all computed and measured,
        or past FORM_SAMPLE_ELEMENTS estimated on a sample of channels and only the winner computed."""
        forms = [] if axis is None else _forms(weight, setting.bits, axis, context)
        storage = storage_for(setting.bits, context.opset)
        if len(forms) > 1 and weight.elements < FORM_SAMPLE_ELEMENTS:  # every form computed, the best kept
            assert axis is not None
            rows = to_rows(array, axis)
            tried = [_palette(array, setting.bits, axis, importance, context.memo, f) for f in forms]
            scores = [_score(rows, p, weight, setting.bits, axis) for p in tried]
            return EncodedWeight(weight, tried[int(np.argmax(scores))], axis, setting.bits, storage)
        if len(forms) > 1:  # estimated on a sample of channels, only the winner computed
            assert axis is not None
            estimates = _estimated(weight, setting.bits, axis, tuple(forms))[1]
            forms = [max(forms, key=lambda f: estimates[f])]
        palette = _palette(array, setting.bits, axis, importance, context.memo, forms[0] if forms else None)
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
        overhead = _Form.of(tried[axis].palette).overhead(weight, setting.bits, axis)
        if gains[1] is None or (gains[0] is not None and gains[1] - gains[0] > DB_PER_BIT * overhead):
            return axis, None
        form = _Form.of(tried[axis].palette).label
        return None, f"per-tensor: per-channel {form} gained {gain_text(gains)} for {overhead:.2f} more bits per weight"

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
            groups=palette.codebook.shape[0] if palette.owner is not None else palette.indices.shape[0],
            stored_bytes=stored + (4 * palette.scale.size if palette.scale is not None else 0) + offset_bytes(palette),
            snr_db=snr_db(to_rows(array, item.axis), reconstruct(palette)),
            note=note,
        )
        form = _Form.of(palette).kind
        return dataclasses.replace(report, granularity=GRANULARITY[form]) if form in GRANULARITY else report

    def histogram(self, name: str, array: np.ndarray, item: EncodedWeight) -> Histogram:  # type: ignore[override]
        levels = item.palette.levels()
        return Histogram.of(name, array, levels, rows=levels.shape[0])

    def levels(self, item: EncodedWeight) -> np.ndarray:
        """Per channel (one row per tensor): the values it can take, ascending."""
        return item.palette.levels(np.float64)

    def refittable(self, item: EncodedWeight) -> bool:
        """Free codebooks can move (`with_levels`); scaled ones are tied to their scales."""
        return item.palette.scale is None

    def owners(self, item: EncodedWeight) -> np.ndarray | None:
        """Each channel's codebook, where codebooks serve groups of channels (None: each its own, or one)."""
        return item.palette.owner

    def with_levels(self, item: EncodedWeight, levels: np.ndarray) -> EncodedWeight:
        """The item with other codebooks (per row, sorted, as `levels` gives them); its indices follow in
        `on_values`."""
        palette = item.palette
        if palette.owner is not None:  # rows of one group share their levels: keep one row per codebook
            levels = levels[np.unique(palette.owner, return_index=True)[1]]
        return dataclasses.replace(
            item, palette=Palette(levels.astype(palette.codebook.dtype), palette.indices, owner=palette.owner)
        )

    def on_values(self, item: EncodedWeight, array: np.ndarray) -> EncodedWeight:
        """The item holding `array`, whose values lie on its levels."""
        palette = item.palette
        rows = to_rows(array, item.axis).astype(np.float64)
        if palette.scale is not None:
            rows = rows / np.where(palette.scale > 0, palette.scale, 1)[:, None]
            codebook = np.broadcast_to(palette.codebook, (rows.shape[0], palette.codebook.shape[1]))
        else:
            codebook = palette.levels()
        indices = nearest(rows.astype(palette.codebook.dtype), codebook)
        return dataclasses.replace(item, palette=dataclasses.replace(palette, indices=indices))

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


@dataclass(frozen=True)
class _Form:
    """A palette along the channel axis: a free codebook per channel, one codebook scaled per channel, or a
    codebook per `size` channels of like range (grouped)."""

    kind: str  # "codebooks", "scaled" or "grouped"
    size: int = 1  # grouped: channels per codebook

    @staticmethod
    def of(palette: Palette) -> _Form:
        if palette.owner is not None:
            return _Form("grouped", -(-palette.owner.size // palette.codebook.shape[0]))
        return _Form("scaled" if palette.scale is not None else "codebooks")

    @property
    def label(self) -> str:
        return f"codebooks per {self.size} channels" if self.kind == "grouped" else f"{self.kind}"

    def overhead(self, weight: Weight, bits: int, axis: int) -> float:
        """Bits per weight that it adds over one codebook: C − 1 codebooks, C scales, or B − 1 codebooks and
        a 16-bit offset per channel."""
        channels = weight.shape[axis]
        if self.kind == "scaled":
            return 32 * channels / weight.elements
        if self.kind == "codebooks":
            return overhead_bits(weight, bits, axis)
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(weight.tensor.data_type).itemsize
        codebooks = -(-channels // self.size)
        return ((codebooks - 1) * (1 << bits) * itemsize * 8 + 16 * channels) / weight.elements

    def fit(
        self, array: np.ndarray, bits: int, axis: int, importance: np.ndarray | None, max_points: int | None = None
    ) -> Palette:
        if self.kind == "scaled":
            return palettize_scaled(array, bits, axis, importance, max_points)
        if self.kind == "grouped":
            return palettize_grouped(array, bits, axis, self.size, importance, max_points)
        weights = None if importance is None else to_rows(np.broadcast_to(importance, array.shape), axis)
        return palettize(to_rows(array, axis), bits=bits, weights=weights, max_points=max_points)


def _forms(weight: Weight, bits: int, axis: int, context: Context | None = None) -> list[_Form]:
    """The forms along `axis` to weigh: --group-size's alone if given; else free codebooks, scales (at most
    SCALED_MAX_BITS) and GROUP_SIZES; with a `context`, those within its --max-codebook-overhead."""
    if context is not None and context.group_size is not None:
        return [_Form("grouped", context.group_size)] if weight.shape[axis] > context.group_size else []
    forms = [_Form("codebooks"), *([_Form("scaled")] if bits <= SCALED_MAX_BITS else [])]
    forms += [_Form("grouped", size) for size in GROUP_SIZES if weight.shape[axis] > size]
    if context is None:
        return forms
    return [f for f in forms if f.overhead(weight, bits, axis) <= context.max_codebook_overhead]


def _score(rows: np.ndarray, palette: Palette, weight: Weight, bits: int, axis: int) -> float:
    """SNR less what its side data (codebooks, scales, offsets) costs, at DB_PER_BIT per bit per weight."""
    snr = snr_db(rows, reconstruct(palette))
    return np.inf if snr is None else snr - DB_PER_BIT * _Form.of(palette).overhead(weight, bits, axis)


def _palette(
    array: np.ndarray,
    bits: int,
    axis: int | None,
    importance: np.ndarray | None,
    memo: dict[tuple[object, ...], object] | None,
    form: _Form | None,
) -> Palette:
    """One codebook (`axis` None) or `form`'s palette, looked up in `memo` by the values' digest first
    (palettes are deterministic)."""

    def make() -> Palette:
        if axis is None or form is None:
            return palettize_tensor(array, bits, axis, importance)
        return form.fit(array, bits, axis, importance)

    if memo is None:
        return make()
    digest = hashlib.sha256(np.ascontiguousarray(array).data)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if importance is not None:
        digest.update(np.ascontiguousarray(importance, np.float64).data)
        digest.update(f"{np.shape(importance)}".encode())
    key = "kmeans", digest.digest(), bits, axis, form
    if key not in memo:
        memo[key] = make()
    palette = memo[key]
    assert isinstance(palette, Palette)
    return palette


def _estimated(
    weight: Weight, bits: int, axis: int, forms: tuple[_Form, ...]
) -> tuple[float | None, dict[_Form, float]]:
    """On a seeded sample of channels: the SNR of one codebook, and each form's score. Kept for the weight's
    `quantize` after its `axes` (the same sample and forms: the same figures), in a small cache by the
    sample's digest."""
    sample = _sample(weight, axis)
    key = (hashlib.sha256(np.ascontiguousarray(sample).data).digest(), sample.shape, bits, weight.shape, forms)
    with _ESTIMATES_LOCK:  # quantize runs in threads
        found = _ESTIMATES.get(key)
    if found is None:
        shared = snr_db(sample, reconstruct(_estimate(sample, bits, None)).reshape(sample.shape))
        scores = {f: _score(sample, _estimate(sample, bits, f, weight.shape[axis]), weight, bits, axis) for f in forms}
        found = shared, scores
        with _ESTIMATES_LOCK:
            while len(_ESTIMATES) >= ESTIMATES_KEPT:
                del _ESTIMATES[next(iter(_ESTIMATES))]
            _ESTIMATES[key] = found
    return found


_ESTIMATES: dict[tuple[object, ...], tuple[float | None, dict[_Form, float]]] = {}
_ESTIMATES_LOCK = threading.Lock()
ESTIMATES_KEPT = 64


def _estimate(sample: np.ndarray, bits: int, form: _Form | None, channels: int | None = None) -> Palette:
    """A quick palette of a sample of channels ([S, n] rows of a weight with `channels`): one codebook (form
    None) or the form, grouped ones with as many codebooks as on all channels."""
    points = ESTIMATE_POINTS << bits
    if form is None:
        one = palettize(sample.reshape(1, -1), bits=bits, max_points=points)
        return Palette(one.codebook, one.indices.reshape(sample.shape))
    if form.kind == "grouped" and channels is not None:
        form = _Form("grouped", max(1, round(form.size * sample.shape[0] / channels)))
    return form.fit(sample, bits, 0, None, max_points=points)


def _sample(weight: Weight, axis: int) -> np.ndarray:
    """A seeded sample of ESTIMATE_CHANNELS channels (rows), in order."""
    rows = to_rows(weight.array(), axis)
    picked = np.random.default_rng(0).choice(rows.shape[0], min(ESTIMATE_CHANNELS, rows.shape[0]), replace=False)
    return rows[np.sort(picked)]
