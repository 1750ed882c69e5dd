"""The command line's options, each declared once, in bundles the commands share, and what they become:
plans, validation settings and gates."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from qconvert.config import load_config
from qconvert.gates import Gates
from qconvert.images import Preprocessing
from qconvert.plan import Granularity, ValidationPlan, parse_input_shape

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]
FILE = click.Path(path_type=Path, dir_okay=False)


def bundle(*options: Decorator) -> Decorator:
    """One decorator for several options, in the order given (as `--help` lists them)."""

    def apply(command: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


MODELS = click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, allow_dash=True))

VALIDATION = bundle(
    click.option(
        "--validate/--no-validate",
        default=True,
        show_default=True,
        help="Compare the new model with the float one under onnxruntime.",
    ),
    click.option(
        "--data",
        type=FILE,
        help="Validation inputs: .npz with one array per model input (axis 0 = samples) and optionally `labels`.",
    ),
    click.option(
        "--labels",
        type=FILE,
        help="Labels, one per sample of --data: .npy, or .json of any structure (strings for OCR).",
    ),
    click.option(
        "--metric",
        metavar="NAME",
        help="Task metric on the labels: top1, top5, ctc-exact, ctc-char, iou@T, or module:function / "
        "file.py:function (outputs, labels) -> float, higher is better.",
    ),
    click.option(
        "--input-shape",
        "input_shapes",
        multiple=True,
        metavar="NAME=DIMS",
        help="Shape for an input's symbolic dimensions, e.g. input=1x3x224x224 (repeatable; default 1).",
    ),
    click.option("--samples", default=8, show_default=True, help="Random validation samples when no --data is given."),
    click.option("--seed", default=0, show_default=True, help="Seed of the random validation inputs."),
    click.option(
        "--allow-unvalidated",
        is_flag=True,
        help="If onnxruntime cannot run the input model (custom ops), write the result unvalidated with a "
        "warning instead of failing.",
    ),
)

GATES = bundle(
    click.option("--min-snr", type=float, metavar="DB", help="Gate: every output's SNR vs float at least this (dB)."),
    click.option(
        "--max-abs-error", type=float, metavar="X", help="Gate: every output's largest absolute error at most this."
    ),
    click.option(
        "--min-top1",
        type=click.FloatRange(0, 1),
        metavar="FRACTION",
        help="Gate: top-1 agreement with float at least this, per class-score output.",
    ),
    click.option(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="Gate: top-1 accuracy on labels may drop at most this many percentage points.",
    ),
    click.option(
        "--max-metric-drop",
        type=float,
        metavar="POINTS",
        help="Gate: the --metric may drop at most this much from float's (built-ins are percentages).",
    ),
)

REPORTS = bundle(
    click.option(
        "--report",
        "report_path",
        type=FILE,
        help="JSON report path [default for a conversion: the output path with .report.json].",
    ),
    click.option("--report-md", type=FILE, help="Also write a Markdown summary (fits a CI job summary)."),
    click.option(
        "--report-html",
        type=FILE,
        help="Also write a self-contained HTML report with pictures (weight histograms and levels, "
        "per-layer error, sizes).",
    ),
    click.option(
        "--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of the summary on stderr."
    ),
    click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
)

OUTPUT = bundle(
    click.option(
        "-o",
        "--output",
        type=click.Path(path_type=Path, allow_dash=True),
        help="Output model path, a folder to write it in, or - for stdout "
        "[default: MODEL.<method><bits>.onnx beside the input].",
    ),
    REPORTS,
    click.option(
        "--keep-failed", is_flag=True, help="Write the model even when a gate fails (the exit code is still 5)."
    ),
)

IMAGES = bundle(
    click.option("--image-size", metavar="HxW", help="Images: resize to this [default: the model's input size]."),
    click.option(
        "--layout",
        type=click.Choice(["nchw", "nhwc"]),
        help="Images: input layout [default: guessed from the input shape].",
    ),
    click.option(
        "--channel-order",
        type=click.Choice(["rgb", "bgr"]),
        default="rgb",
        show_default=True,
        help="Images: channel order.",
    ),
    click.option(
        "--pixel-scale", default=1 / 255, show_default=True, help="Images: pixels (0-255) are multiplied by this first."
    ),
    click.option(
        "--mean",
        default="0",
        show_default=True,
        metavar="M[,M,M]",
        help="Images: subtracted per channel after scaling.",
    ),
    click.option(
        "--std", default="1", show_default=True, metavar="S[,S,S]", help="Images: divided per channel after the mean."
    ),
)


def techniques(calibration_help: str) -> Decorator:
    """Calibration data (with how to read a folder of images) and the techniques that learn from it."""
    return bundle(
        click.option("--calibration", type=click.Path(path_type=Path), help=calibration_help),
        IMAGES,
        click.option(
            "--no-fold-batchnorm",
            "no_fold",
            is_flag=True,
            help="Keep BatchNormalization after Conv/ConvTranspose/Gemm (by default it is folded in where that "
            "costs no accuracy).",
        ),
        click.option(
            "--equalize/--no-equalize",
            default=None,
            help="Rescale the channels between a Conv and the depthwise Conv it feeds through Relu so that both "
            "weights' ranges match: the same model in float, less error for per-tensor palettes and grids "
            "[default: on where only weights are quantized; with activations it moves their ranges too].",
        ),
        click.option(
            "--no-data-aware",
            "no_data_aware",
            is_flag=True,
            help="With calibration data: minimise each weight's own error, not the layer's output error.",
        ),
        click.option(
            "--no-bias-correction",
            "no_bias_correction",
            is_flag=True,
            help="With calibration data: leave biases as they are (by default they absorb the mean output error; "
            "full QDQ: also what the quantized activations add, measured layer by layer, where that gains on held-out "
            "samples).",
        ),
        click.option(
            "--no-sequential",
            "no_sequential",
            is_flag=True,
            help="With calibration data, at 4 bits and fewer: do not round the GPTQ layers again in graph order on "
            "the quantized model's own inputs (by default done where the output gains on held-out samples; it runs "
            "the float and the quantized model over the calibration data about three times more).",
        ),
    )


def selection(min_elements: int, small: str = "Leave weights with fewer elements as they are.") -> Decorator:
    """Which weights are quantized (`small`: what the smaller ones get)."""
    return bundle(
        click.option("--min-elements", default=min_elements, show_default=True, help=small),
        click.option(
            "--exclude",
            multiple=True,
            metavar="PATTERN",
            help="Leave weights whose name matches (exact or glob; repeatable).",
        ),
    )


CODEBOOK_OVERHEAD = click.option(
    "--max-codebook-overhead",
    default=1.0,
    show_default=True,
    metavar="BITS",
    help="Per-channel codebooks that would add more bits per weight than this are not used "
    "(the weight stays per-tensor).",
)

FLOAT16 = click.option(
    "--float16",
    is_flag=True,
    help="Then the rest in float16 as `qconvert float16` does: codebooks, scales, weights left float, activations.",
)

CONFIG = click.option(
    "--config",
    type=FILE,
    is_eager=True,
    expose_value=False,
    callback=load_config,
    help="TOML file of options (any long option, without dashes) and [[layer]] overrides (match, bits, granularity, "
    "skip, method); the command line wins.",
)


def plan_fields(o: dict[str, Any]) -> dict[str, Any]:
    """The plan fields that the selection and technique options give."""
    return {
        "min_elements": o["min_elements"],
        "exclude": o["exclude"],
        "calibration": o["calibration"],
        "preprocessing": preprocessing(o),
        "fold_batchnorm": not o["no_fold"],
        "equalize": o["equalize"],
        "data_aware": not o["no_data_aware"],
        "bias_correction": not o["no_bias_correction"],
        "sequential": not o["no_sequential"],
    }


def preprocessing(o: dict[str, Any]) -> Preprocessing:
    return Preprocessing(
        size=dims(o["image_size"], "--image-size") if o["image_size"] else None,
        layout=o["layout"],
        channel_order=o["channel_order"],
        scale=o["pixel_scale"],
        mean=floats(o["mean"], "--mean"),
        std=floats(o["std"], "--std"),
    )


def validation(o: dict[str, Any]) -> ValidationPlan | None:
    if not o["validate"]:
        return None
    return ValidationPlan(
        data=o["data"],
        input_shapes=dict(map(parse_input_shape, o["input_shapes"])),
        samples=o["samples"],
        seed=o["seed"],
        allow_unrunnable=o["allow_unvalidated"],
        labels=o["labels"],
        metric=o["metric"],
    )


def gates(o: dict[str, Any]) -> Gates:
    return Gates(
        o.get("min_snr"),
        o.get("max_abs_error"),
        o.get("min_top1"),
        o.get("max_accuracy_drop"),
        o.get("max_metric_drop"),
    )


def granularity(per_channel: bool | None, default: Granularity) -> Granularity:
    if per_channel is None:
        return default
    return Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR


def ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.UsageError(f"{option} expects integers separated by commas, got {text!r}") from None


def floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.UsageError(f"{option} expects numbers separated by commas, got {text!r}") from None


def dims(text: str, option: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.UsageError(f"{option} expects HxW, e.g. 224x224; got {text!r}")
    return int(parts[0]), int(parts[1])
