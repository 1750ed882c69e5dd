"""What the user asked for, as frozen dataclasses validated on construction."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from qconvert.errors import UsageError
from qconvert.images import Preprocessing

DEFAULT_MIN_ELEMENTS = 1024
SMALL_WEIGHTS = ("float", "int8")  # what k-means does with weights under --min-elements


class Granularity(StrEnum):
    PER_TENSOR = "per-tensor"
    PER_CHANNEL = "per-channel"
    AUTO = "auto"  # k-means: per channel where that beats spending the codebooks' bits on index bits


@dataclass(frozen=True)
class LayerOverride:
    """Per-layer settings for weights whose name matches (exactly or as a glob); later entries win."""

    match: str
    bits: int | None = None
    granularity: Granularity | None = None
    skip: bool = False
    method: str | None = (
        None  # another method for these weights ("linear" in a kmeans plan: int8/int4 DequantizeLinear)
    )

    def applies_to(self, name: str) -> bool:
        return name == self.match or fnmatch.fnmatchcase(name, self.match)


@dataclass(frozen=True)
class LayerSetting:
    method: str
    bits: int
    granularity: Granularity
    skip: bool
    symmetric: bool = True  # linear: signed with Z = 0 (else unsigned with a zero point)


def layer_setting(plan: KMeansPlan | LinearPlan, name: str) -> LayerSetting:
    """How one weight is quantized: the plan's settings, refined by every override that matches.

    An override that switches a kmeans plan's layer to linear without giving bits means int8.
    """
    symmetric = plan.symmetric if isinstance(plan, LinearPlan) else True
    setting = LayerSetting(plan.method, plan.bits, plan.granularity, False, symmetric)
    for o in plan.overrides:
        if o.applies_to(name):
            method = o.method or setting.method
            bits = (
                o.bits
                if o.bits is not None
                else (8 if method != setting.method and method == "linear" else setting.bits)
            )
            setting = LayerSetting(
                method, bits, o.granularity or setting.granularity, setting.skip or o.skip, symmetric
            )
    return setting


@dataclass(frozen=True)
class KMeansPlan:
    """Palettize weights: 2**bits centroids per tensor or per output channel."""

    bits: int
    granularity: Granularity = Granularity.AUTO
    min_elements: int = DEFAULT_MIN_ELEMENTS
    exclude: tuple[str, ...] = ()
    raise_opset: bool = True  # allow raising the opset for uint4/uint2 index storage
    # per-channel codebooks may add at most this many bits per weight; past it a weight stays per-tensor
    max_codebook_overhead: float = 1.0
    group_size: int | None = None  # one codebook per this many channels (of like range), wherever a weight has them
    overrides: tuple[LayerOverride, ...] = ()
    calibration: Path | None = None  # inputs (.npz or images) for the data-aware techniques [default: --data]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # for a folder of images
    fold_batchnorm: bool = True
    equalize: bool | None = None  # cross-layer equalization (`qconvert.equalize`); None: for weights-only plans
    data_aware: bool = True  # with calibration data: minimise each layer's output error, not its weight error
    bias_correction: bool = True  # with calibration data: keep each layer's mean output
    sequential: bool = True  # with calibration data: GPTQ layers rounded again in graph order (`fidelity.sequential`)
    float16: bool = False  # then the rest in float16: codebooks, scales, weights left float, activations
    # weights under min_elements, too small for a palette to pay: "float", or "int8" (linear, where smaller than float)
    small_weights: str = "float"

    def __post_init__(self) -> None:
        if self.small_weights not in SMALL_WEIGHTS:
            raise UsageError(f"--small-weights must be one of {', '.join(SMALL_WEIGHTS)}, got {self.small_weights!r}")
        for o in self.overrides:  # the driver checks that a method of that name is registered
            if o.method == "linear" and o.bits not in (None, 4, 8):
                raise UsageError(f"[[layer]] {o.match!r}: linear layers take bits 8 or 4, got {o.bits}")
        for bits in (self.bits, *(o.bits for o in self.overrides if o.bits is not None and o.method != "linear")):
            if not 1 <= bits <= 8:
                raise UsageError(f"--bits must be between 1 and 8, got {bits}")
        if self.max_codebook_overhead < 0:
            raise UsageError(f"--max-codebook-overhead must be >= 0, got {self.max_codebook_overhead}")
        if self.min_elements < 1:
            raise UsageError(f"--min-elements must be at least 1, got {self.min_elements}")
        if self.group_size is not None and self.group_size < 1:
            raise UsageError(f"--group-size must be at least 1, got {self.group_size}")
        if self.group_size is not None and self.granularity is Granularity.PER_TENSOR:
            raise UsageError("--group-size and --per-tensor contradict each other: groups are of channels")

    @property
    def method(self) -> str:
        return "kmeans"


class CalibrationMethod(StrEnum):
    MINMAX = "minmax"
    PERCENTILE = "percentile"
    MSE = "mse"  # per tensor, the range whose grid quantizes its values with the least squared error
    ENTROPY = "entropy"  # per tensor, the clipping that keeps the most information (`calibrate.entropy_range`)
    AUTO = "auto"  # per tensor, the rule that quantizes held-out samples best (`calibrate.choose`)


@dataclass(frozen=True)
class LinearPlan:
    """Linear quantization r = S(q − Z) of weights (DequantizeLinear), and of activations with calibration."""

    bits: int = 8
    granularity: Granularity = Granularity.PER_CHANNEL  # a scale per channel costs 4 bytes: it always pays
    symmetric: bool = True
    calibration: Path | None = None  # .npz of inputs or a folder of images: quantize activations too
    weights_only: bool = False  # with calibration: quantize weights only (the data serves the data-aware techniques)
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # for a folder of images
    calibration_method: CalibrationMethod = CalibrationMethod.AUTO
    percentile: float = 99.999
    activation_type: str = "uint8"  # full QDQ: uint8 asymmetric, or int8 symmetric (zero point 0)
    float_activations: int | str = 0  # full QDQ: activations left float (those that lose most), or "auto"
    fold_batchnorm: bool = True
    equalize: bool | None = None  # cross-layer equalization (`qconvert.equalize`); None: for weights-only plans
    min_elements: int = 1
    exclude: tuple[str, ...] = ()
    overrides: tuple[LayerOverride, ...] = ()
    data_aware: bool = True  # with calibration data (or --data): clipping ranges that minimise the output error
    bias_correction: bool = True
    sequential: bool = True
    float16: bool = False  # then the rest in float16: scales, weights left float, activations (as `Float16Plan`)
    block_size: int | None = None  # a scale per this many weights along the input axis (None: int4 weighs 32; 0: none)
    optimize: str = "size"  # full QDQ: "speed" keeps float the layers that run faster so (`qconvert.speed`)

    def __post_init__(self) -> None:
        if any(o.method == "kmeans" for o in self.overrides):
            raise UsageError(
                "[[layer]] method = 'kmeans' works in qconvert kmeans (with linear layers), not in qconvert linear"
            )
        try:  # the Python API may name it as a string
            object.__setattr__(self, "calibration_method", CalibrationMethod(self.calibration_method))
        except ValueError:
            choices = ", ".join(m.value for m in CalibrationMethod)
            raise UsageError(f"calibration method must be one of {choices}, got {self.calibration_method!r}") from None
        if self.float_activations != "auto" and (
            not isinstance(self.float_activations, int)
            or isinstance(self.float_activations, bool)
            or self.float_activations < 0
        ):
            raise UsageError(f"float activations must be a count >= 0 or 'auto', got {self.float_activations!r}")
        if self.activation_type not in ("uint8", "int8"):
            raise UsageError(f"activation type must be uint8 or int8, got {self.activation_type!r}")
        for bits in (self.bits, *(o.bits for o in self.overrides if o.bits is not None)):
            if bits not in (4, 8):
                raise UsageError(f"--bits must be 8 or 4 for linear quantization, got {bits}")
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (50, 100], got {self.percentile}")
        if self.min_elements < 1:
            raise UsageError(f"--min-elements must be at least 1, got {self.min_elements}")
        if self.block_size is not None and (self.block_size < 0 or self.block_size == 1):
            raise UsageError(f"--block-size must be 0 (no blocks) or at least 2, got {self.block_size}")
        if self.block_size and self.granularity is Granularity.PER_TENSOR:
            raise UsageError("--block-size and --per-tensor contradict each other: blocks are within channels")
        if self.block_size and self.activations:
            raise UsageError(
                "--block-size goes with weights-only plans: onnxruntime's integer kernels take a scale per channel "
                "(add --weights-only, or drop --block-size)"
            )
        if self.optimize not in ("size", "speed"):
            raise UsageError(f"--optimize must be size or speed, got {self.optimize!r}")
        if self.optimize == "speed" and not self.activations:
            raise UsageError(
                "--optimize speed chooses which layers run integer kernels: it needs full QDQ (--calibration "
                "without --weights-only)"
            )
        if self.float16 and self.activations:
            raise UsageError(
                "--float16 goes with weights-only plans: with activations quantized, QuantizeLinear and "
                "DequantizeLinear take float32 (add --weights-only, or drop --float16)"
            )

    @property
    def method(self) -> str:
        return "linear"

    @property
    def activations(self) -> bool:
        """Full QDQ: activations quantized too, with ranges from the calibration data."""
        return self.calibration is not None and not self.weights_only


FLOAT16_TARGET_SNR = 30.0  # dB: float16 measured 40-81 dB on the bench models with their task metrics unchanged


@dataclass(frozen=True)
class Float16Plan:
    """Compute in float16 wherever the model's ops allow it and the data says it holds (`qconvert.fp16`)."""

    keep_io_types: bool = True  # inputs and outputs stay float32 (Casts inside the graph)
    keep: tuple[str, ...] = ()  # op types or node names (globs) that stay float32 whatever the search finds
    target_snr: float = FLOAT16_TARGET_SNR  # dB vs the float32 model: ops stay float32 until every output meets it
    calibration: Path | None = None  # inputs the search measures on [default: --data]
    preprocessing: Preprocessing = field(default_factory=Preprocessing)  # for a folder of images

    @property
    def method(self) -> str:
        return "float16"

    def keeps(self, op_type: str, name: str) -> bool:
        return any(op_type == k or name == k or fnmatch.fnmatchcase(name, k) for k in self.keep)


Plan = KMeansPlan | LinearPlan  # the quantizing plans
AnyPlan = Plan | Float16Plan  # what one conversion (`pipeline.convert`) runs


@dataclass(frozen=True)
class AutoPlan:
    """Search per weight for the method and width that meet a target at the smallest size."""

    target_snr: float | None = None  # dB, every output
    min_top1: float | None = None  # top-1 agreement with float, every class-score output
    max_accuracy_drop: float | None = None  # percentage points on labels
    max_metric_drop: float | None = None  # the task metric (--metric) from float's, in its units
    methods: tuple[str, ...] = ("kmeans", "linear")
    bits: tuple[int, ...] = (2, 3, 4, 5, 6, 8)
    calibration: Path | None = None  # inputs for data-aware k-means and bias correction in the final model
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    min_elements: int = DEFAULT_MIN_ELEMENTS
    exclude: tuple[str, ...] = ()
    max_codebook_overhead: float = 1.0
    fold_batchnorm: bool = True
    equalize: bool | None = None  # cross-layer equalization (`qconvert.equalize`); None: for weights-only plans
    data_aware: bool = True  # in the final conversion, with --calibration only (the search assumes plain k-means)
    bias_correction: bool = True
    sequential: bool = True

    def __post_init__(self) -> None:
        targets = [
            t for t in (self.target_snr, self.min_top1, self.max_accuracy_drop, self.max_metric_drop) if t is not None
        ]
        if len(targets) != 1:
            raise UsageError(
                "qconvert auto needs exactly one target: --target-snr, --min-top1, --max-accuracy-drop or "
                "--max-metric-drop"
            )
        if not self.methods or set(self.methods) - {"kmeans", "linear"}:
            raise UsageError(f"--methods takes kmeans and/or linear, got {','.join(self.methods) or 'nothing'}")
        if not self.bits or any(not 1 <= b <= 8 for b in self.bits):
            raise UsageError(f"--bits takes widths between 1 and 8, got {','.join(map(str, self.bits)) or 'nothing'}")
        if self.min_elements < 1:
            raise UsageError(f"--min-elements must be at least 1, got {self.min_elements}")


@dataclass(frozen=True)
class ValidationPlan:
    """How to compare the new model with the float one under onnxruntime."""

    data: Path | None = None  # .npz with one array per model input (+ optional `labels`)
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    samples: int = 8  # random samples when no data is given
    seed: int = 0
    latency_runs: int = 10  # timed runs of each model (0: don't time)
    allow_unrunnable: bool = False  # onnxruntime cannot run the input (custom ops): warn, don't fail
    labels: Path | None = None  # labels for --data (.npy, or .json of any structure), else its `labels` array
    metric: str | Callable[..., float] | None = None  # a task metric (qconvert.metrics) measured on the labels

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UsageError(f"--samples must be at least 1, got {self.samples}")


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'images=1x3x224x224' -> ('images', (1, 3, 224, 224))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        shape = ()
    if not sep or not name or not shape or min(shape) < 1:
        raise UsageError(f"--input-shape expects NAME=D1xD2x..., e.g. input=1x3x224x224; got {text!r}")
    return name, shape
