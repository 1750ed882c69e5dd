"""The `qconvert` command line: parse options into plans, run the pipeline, render the report."""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from qconvert import __version__, api, batch, io
from qconvert.config import layer_overrides, load_config
from qconvert.describe import inspect_model
from qconvert.errors import ExitCode, GateFailed, QConvertError, UsageError
from qconvert.gates import GateResult, Gates
from qconvert.images import Preprocessing
from qconvert.mixed.search import plan_toml
from qconvert.pipeline import TOO_BIG_FOR_A_STREAM, compare_models, default_output
from qconvert.plan import (
    DEFAULT_MIN_ELEMENTS,
    AutoPlan,
    CalibrationMethod,
    Granularity,
    KMeansPlan,
    LinearPlan,
    Plan,
    ValidationPlan,
    parse_input_shape,
)
from qconvert.render.terminal import batch_summary, inspection, summary
from qconvert.report import Report

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    internal error (a bug; rerun with --debug for the traceback)
  2    usage error: bad option or argument
  3    input error: model or data file missing, unreadable, not ONNX / npz
  4    unsupported model: nothing to quantize, or onnxruntime cannot run it
  5    a quality gate failed (--min-snr ...): the model is not written
  6    output error: the model or report (or calibration's temp files) could not be written
  130  interrupted (Ctrl-C)"""


class CliError(click.ClickException):
    """A one-line error with a chosen exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code  # type: ignore[misc]  # click declares it on the class


class QConvertGroup(click.Group):
    """Maps library errors to exit codes in one place; every error is one line, no traceback unless --debug."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx else ""
            self._fail(e.format_message() + where, ExitCode.USAGE)
        except click.ClickException as e:
            self._fail(e.format_message(), e.exit_code)
        except click.Abort:
            self._fail("interrupted", ExitCode.INTERRUPTED)
        if standalone_mode:
            sys.exit(result if isinstance(result, int) else 0)
        return result

    @staticmethod
    def _fail(message: str, code: int) -> NoReturn:
        click.echo(f"qconvert: error: {message}", err=True)
        sys.exit(code)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except QConvertError as e:
            raise CliError(str(e), e.exit_code) from e
        except KeyboardInterrupt:
            raise CliError("interrupted", ExitCode.INTERRUPTED) from None
        except Exception as e:
            if ctx.params.get("debug"):
                traceback.print_exc()
            raise CliError(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", ExitCode.INTERNAL) from e


@click.group(cls=QConvertGroup, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="qconvert")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an internal error.")
def cli(debug: bool) -> None:
    """Shrink an ONNX CNN by quantizing its weights, validate it under onnxruntime, write it with a report.

    \b
    Examples:
      qconvert kmeans model.onnx --bits 4
      qconvert kmeans model.onnx --bits 2 --per-channel -o small.onnx --json > report.json
      qconvert linear model.onnx --per-channel
      qconvert linear model.onnx --per-channel --calibration calib.npz
      qconvert inspect model.onnx
      qconvert compare model.onnx model.kmeans4.onnx --data val.npz --min-snr 20
    """
    _give_back_big_buffers()


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter: buffers from this size on get a mapping of their own
BIG_BUFFER = 4 << 20  # bytes


def _give_back_big_buffers() -> None:
    """Have glibc's malloc map each buffer over 4 MB on its own, so that freeing it returns the memory.

    By default that threshold grows to 32 MB as big buffers are freed, and each thread keeps its own
    heap: the k-means threads' float64 copies of big weights then stay reserved in two heaps, unused.
    Measured on ResNet-50-shaped, k-means 4-bit: peak 275 -> 205 MB, about 1 s slower (fresh pages).
    Elsewhere (no glibc) nothing changes.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, BIG_BUFFER)


def validation_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by every command that validates a converted model."""
    for option in reversed(
        [
            click.option("--validate/--no-validate", default=True, show_default=True, help="Compare the new model with the float one under onnxruntime."),
            click.option("--data", type=click.Path(path_type=Path, dir_okay=False), help="Validation inputs: .npz with one array per model input (axis 0 = samples) and optionally `labels`."),
            click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DIMS", help="Shape for an input's symbolic dimensions, e.g. input=1x3x224x224 (repeatable; default 1)."),
            click.option("--samples", default=8, show_default=True, help="Random validation samples when no --data is given."),
            click.option("--seed", default=0, show_default=True, help="Seed of the random validation inputs."),
            click.option("--allow-unvalidated", is_flag=True,
                         help="If onnxruntime cannot run the input model (custom ops), write the result unvalidated with a warning instead of failing."),
        ]
    ):
        command = option(command)
    return command


def calibration_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Calibration data (and how to read a folder of images), and the techniques that learn from it."""
    for option in reversed(
        [
            click.option("--image-size", metavar="HxW", help="Images: resize to this [default: the model's input size]."),
            click.option("--layout", type=click.Choice(["nchw", "nhwc"]), help="Images: input layout [default: guessed from the input shape]."),
            click.option("--channel-order", type=click.Choice(["rgb", "bgr"]), default="rgb", show_default=True, help="Images: channel order."),
            click.option("--pixel-scale", default=1 / 255, show_default=True, help="Images: pixels (0-255) are multiplied by this first."),
            click.option("--mean", default="0", show_default=True, metavar="M[,M,M]", help="Images: subtracted per channel after scaling."),
            click.option("--std", default="1", show_default=True, metavar="S[,S,S]", help="Images: divided per channel after the mean."),
            click.option("--no-fold-batchnorm", "no_fold", is_flag=True,
                         help="Keep BatchNormalization after Conv/ConvTranspose/Gemm (by default it is folded in where that costs no accuracy)."),
            click.option("--no-data-aware", "no_data_aware", is_flag=True,
                         help="With calibration data: minimise each weight's own error, not the layer's output error."),
            click.option("--no-bias-correction", "no_bias_correction", is_flag=True,
                         help="With calibration data: leave biases as they are (by default they absorb the mean output error)."),
        ]
    ):
        command = option(command)
    return command


def _preprocessing(image_size: str | None, layout: str | None, channel_order: str, pixel_scale: float, mean: str, std: str) -> Preprocessing:
    return Preprocessing(
        size=_dims(image_size, "--image-size") if image_size else None,
        layout=layout,
        channel_order=channel_order,
        scale=pixel_scale,
        mean=_floats(mean, "--mean"),
        std=_floats(std, "--std"),
    )


def config_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--config", type=click.Path(path_type=Path, dir_okay=False), is_eager=True, expose_value=False, callback=load_config,
        help="TOML file of options (any long option, without dashes) and [[layer]] overrides (match, bits, granularity, skip); "
             "the command line wins.",
    )(command)


def gate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Quality gates: a converted model that fails one exits 5 and is not written (unless --keep-failed)."""
    for option in reversed(
        [
            click.option("--min-snr", type=float, metavar="DB", help="Gate: every output's SNR vs float at least this (dB)."),
            click.option("--max-abs-error", type=float, metavar="X", help="Gate: every output's largest absolute error at most this."),
            click.option("--min-top1", type=click.FloatRange(0, 1), metavar="FRACTION", help="Gate: top-1 agreement with float at least this, per class-score output."),
            click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Gate: top-1 accuracy on labels may drop at most this many percentage points."),
            click.option("--labels", type=click.Path(path_type=Path, dir_okay=False), help="Labels (.npy, one per sample of --data) for accuracy."),
        ]
    ):
        command = option(command)
    return command


def output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Where the model and the report go, and how much is printed."""
    for option in reversed(
        [
            click.option("-o", "--output", type=click.Path(path_type=Path, allow_dash=True),
                         help="Output model path, a folder to write it in, or - for stdout "
                              "[default: MODEL.<method><bits>.onnx beside the input]."),
            click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), help="JSON report path [default: the output path with .report.json]."),
            click.option("--report-md", type=click.Path(path_type=Path, dir_okay=False), help="Also write a Markdown summary (fits a CI job summary)."),
            click.option("--report-html", type=click.Path(path_type=Path, dir_okay=False),
                         help="Also write a self-contained HTML report with pictures (weight histograms and levels, per-layer error, sizes)."),
            click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of the summary on stderr."),
            click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors."),
            click.option("--keep-failed", is_flag=True, help="Write the model even when a gate fails (the exit code is still 5)."),
        ]
    ):
        command = option(command)
    return command


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, allow_dash=True))
@click.option("--bits", "-b", type=click.IntRange(1, 8), required=True, help="Index bits: 2**bits centroids per codebook (1-8).")
@click.option("--per-channel/--per-tensor", default=None,
              help="One codebook per output channel, or one per tensor [default: per channel where that beats spending "
                   "the codebooks' bits on one more index bit, i.e. gains over 6 dB per added bit per weight].")
@click.option("--max-codebook-overhead", default=1.0, show_default=True, metavar="BITS",
              help="With --per-channel: a weight whose codebooks would add more bits per weight than this stays per-tensor.")
@click.option("--min-elements", default=DEFAULT_MIN_ELEMENTS, show_default=True, help="Leave weights with fewer elements as they are.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave weights whose name matches (exact or glob; repeatable).")
@click.option("--keep-opset", is_flag=True, help="Never raise the opset: store 4/2-bit indices bit-packed instead of uint4/uint2.")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Inputs for the data-aware palettes and bias correction: an .npz (one array per input, axis 0 = "
                   "samples) or a folder of images (see --image-size ... --std) [default: --data].")
@calibration_options
@validation_options
@gate_options
@output_options
@config_option
def kmeans(models: tuple[Path, ...], bits: int, per_channel: bool | None, max_codebook_overhead: float, min_elements: int,
           exclude: tuple[str, ...], keep_opset: bool, calibration: Path | None, image_size: str | None, layout: str | None,
           channel_order: str, pixel_scale: float, mean: str, std: str, no_fold: bool, no_data_aware: bool,
           no_bias_correction: bool, **common: Any) -> None:
    """Palettize weights: a codebook of 2**bits centroids (k-means) plus low-bit indices.

    Every float weight read by Conv, ConvTranspose, Gemm or MatMul is replaced by a codebook and
    indices decoded in the graph (Cast -> Gather), wherever it lives: initializers, Constant nodes,
    If/Loop subgraphs. Indices are stored as uint4 (opset >= 21) or uint2 (opset >= 25), raising the
    opset when needed, or bit-packed and unpacked in the graph.

    With calibration data (--calibration, else --data), each codebook minimises the error of its
    layer's output rather than of the weights, and biases absorb the mean error; each layer keeps
    whichever result, plain or refined, measures better on that data. BatchNormalization is folded
    into the layer before it wherever that costs no accuracy.

    \b
    Examples:
      qconvert kmeans model.onnx --bits 4
      qconvert kmeans model.onnx --bits 4 --per-channel --exclude 'classifier*'
      qconvert kmeans model.onnx --bits 3 --data val.npz -o model.q3.onnx
      qconvert kmeans model.onnx --bits 8 --input-shape images=1x3x224x224 --json
    """
    plan = KMeansPlan(
        bits=bits,
        granularity=_granularity(per_channel, Granularity.AUTO),
        min_elements=min_elements,
        exclude=exclude,
        raise_opset=not keep_opset,
        max_codebook_overhead=max_codebook_overhead,
        overrides=layer_overrides(),
        calibration=calibration,
        preprocessing=_preprocessing(image_size, layout, channel_order, pixel_scale, mean, std),
        fold_batchnorm=not no_fold,
        data_aware=not no_data_aware,
        bias_correction=not no_bias_correction,
    )
    _dispatch(models, plan, common)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path, allow_dash=True))
@click.option("--bits", "-b", type=click.Choice(["8", "4"]), default="8", show_default=True, help="Integer width of the weights.")
@click.option("--per-channel/--per-tensor", default=True, show_default=True,
              help="One scale per output channel, or one per tensor (depthwise kernels always get per-channel).")
@click.option("--symmetric/--asymmetric", default=True, show_default=True,
              help="Weights: signed with zero point 0, or unsigned with a zero point.")
@click.option("--weights-only", "weights_only", is_flag=True, help="Quantize weights only, also with --calibration (whose data then serves the data-aware techniques only).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Quantize activations too, with ranges measured on this data: an .npz of inputs (one array per "
                   "input, axis 0 = samples) or a folder of images (see --image-size ... --std).")
@click.option("--calibration-method", type=click.Choice([m.value for m in CalibrationMethod]), default="minmax", show_default=True,
              help="Activation range: the observed min/max, or percentiles (--percentile).")
@click.option("--percentile", default=99.999, show_default=True, help="With --calibration-method percentile: the kept share of values, in %.")
@click.option("--min-elements", default=1, show_default=True, help="Leave weights with fewer elements as they are.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave weights whose name matches (exact or glob; repeatable).")
@calibration_options
@validation_options
@gate_options
@output_options
@config_option
def linear(models: tuple[Path, ...], bits: str, per_channel: bool, symmetric: bool, weights_only: bool, calibration: Path | None,
           image_size: str | None, layout: str | None, channel_order: str, pixel_scale: float, mean: str, std: str,
           calibration_method: str, percentile: float, no_fold: bool, no_data_aware: bool, no_bias_correction: bool,
           min_elements: int, exclude: tuple[str, ...], **common: Any) -> None:
    """Linear quantization r = S(q - Z): QuantizeLinear/DequantizeLinear (QDQ) form.

    Without --calibration, weights become int8/int4 initializers followed by DequantizeLinear: a smaller
    file and less memory, dequantized at every run. With --calibration, activations get uint8
    Quantize/DequantizeLinear pairs and biases int32 (scale S_x*S_w), the form onnxruntime fuses into
    integer kernels (QLinearConv, QGemm ...) that run faster than float. BatchNormalization after a Conv
    is folded into it first, so ranges are measured where the integer kernels see them (weights-only:
    where folding costs no accuracy). With calibration data (--calibration, else --data), clipping
    ranges minimise each layer's output error and biases absorb the mean error, layer by layer where
    that measures better.

    \b
    Examples:
      qconvert linear model.onnx --per-channel
      qconvert linear model.onnx --bits 4 --per-channel --asymmetric
      qconvert linear model.onnx --per-channel --calibration calib.npz --data val.npz
      qconvert linear model.onnx --per-channel --calibration photos/ --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225
    """
    plan = LinearPlan(
        bits=int(bits),
        granularity=_granularity(per_channel, Granularity.PER_CHANNEL),
        symmetric=symmetric,
        calibration=calibration,
        weights_only=weights_only,
        preprocessing=_preprocessing(image_size, layout, channel_order, pixel_scale, mean, std),
        calibration_method=CalibrationMethod(calibration_method),
        percentile=percentile,
        fold_batchnorm=not no_fold,
        min_elements=min_elements,
        exclude=exclude,
        overrides=layer_overrides(),
        data_aware=not no_data_aware,
        bias_correction=not no_bias_correction,
    )
    _dispatch(models, plan, common)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path, allow_dash=True))
@click.option("--target-snr", type=float, metavar="DB", help="Target: every output's SNR vs float at least this (dB).")
@click.option("--min-top1", type=click.FloatRange(0, 1), metavar="FRACTION", help="Target: top-1 agreement with float at least this.")
@click.option("--max-accuracy-drop", type=float, metavar="POINTS", help="Target: top-1 accuracy on labels drops at most this many points.")
@click.option("--labels", type=click.Path(path_type=Path, dir_okay=False), help="Labels (.npy, one per sample of --data) for accuracy.")
@click.option("--methods", default="kmeans,linear", show_default=True, help="Methods a weight may get (comma-separated).")
@click.option("--bits", "bits_list", default="2,3,4,5,6,8", show_default=True, help="K-means widths to consider (linear: 4 and 8).")
@click.option("--max-codebook-overhead", default=1.0, show_default=True, metavar="BITS", help="Per-channel codebooks adding more bits per weight are not considered.")
@click.option("--min-elements", default=DEFAULT_MIN_ELEMENTS, show_default=True, help="Leave weights with fewer elements as they are.")
@click.option("--exclude", multiple=True, metavar="PATTERN", help="Leave weights whose name matches (exact or glob; repeatable).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Inputs (.npz or a folder of images) for data-aware k-means and bias correction in the final model.")
@click.option("--plan-out", type=click.Path(path_type=Path, dir_okay=False),
              help="Save the chosen plan as TOML: `qconvert kmeans MODEL --config PLAN` redoes it without searching.")
@calibration_options
@validation_options
@output_options
def auto(model: Path, target_snr: float | None, min_top1: float | None, max_accuracy_drop: float | None, labels: Path | None,
         methods: str, bits_list: str, max_codebook_overhead: float, min_elements: int, exclude: tuple[str, ...],
         calibration: Path | None, plan_out: Path | None, keep_failed: bool, image_size: str | None, layout: str | None,
         channel_order: str, pixel_scale: float, mean: str, std: str, no_fold: bool, no_data_aware: bool,
         no_bias_correction: bool, **common: Any) -> None:
    """Mixed precision: per weight the method and bit width that meet a target at the smallest size.

    Measures how much each layer's output noise reaches the model's outputs (one batched onnxruntime
    probe), estimates every option's size and noise (k-means 2-8 bits per tensor or channel, linear
    int4/int8, float), picks per weight by a knapsack-style allocation, then converts and validates
    the plan, tightening it while the target is missed. Only a model that meets the target is written.

    \b
    Examples:
      qconvert auto model.onnx --target-snr 30 --data val.npz
      qconvert auto model.onnx --max-accuracy-drop 0.5 --data val.npz --plan-out plan.toml
      qconvert kmeans model.onnx --config plan.toml      # the same plan again, without the search
    """
    plan = AutoPlan(
        target_snr=target_snr,
        min_top1=min_top1,
        max_accuracy_drop=max_accuracy_drop,
        methods=tuple(m.strip() for m in methods.split(",") if m.strip()),
        bits=_ints(bits_list, "--bits"),
        calibration=calibration,
        preprocessing=_preprocessing(image_size, layout, channel_order, pixel_scale, mean, std),
        min_elements=min_elements,
        exclude=exclude,
        max_codebook_overhead=max_codebook_overhead,
        fold_batchnorm=not no_fold,
        data_aware=not no_data_aware,
        bias_correction=not no_bias_correction,
    )
    _run(model, plan, min_snr=None, max_abs_error=None, min_top1=None, max_accuracy_drop=None, labels=labels,
         keep_failed=keep_failed, plan_out=plan_out, **common)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--min-elements", default=DEFAULT_MIN_ELEMENTS, show_default=True, help="Weights with fewer elements are listed as left alone.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON on stdout.")
def inspect(model: Path, min_elements: int, as_json: bool) -> None:
    """Describe a model: opset, inputs/outputs, its weights and where they live, and the file size each
    method and bit width would give. Writes nothing.

    \b
    Examples:
      qconvert inspect model.onnx
      qconvert inspect model.onnx --json | jq '.estimates[] | select(.bits == 4)'
    """
    info = inspect_model(model, min_elements=min_elements)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        _console(False).print(inspection(info))


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("converted_model", type=click.Path(path_type=Path))
@validation_options
@gate_options
@click.option("--report", "report_path", type=click.Path(path_type=Path, dir_okay=False), help="Also write the JSON report here.")
@click.option("--report-md", type=click.Path(path_type=Path, dir_okay=False), help="Also write a Markdown summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON report on stdout instead of the summary on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def compare(float_model: Path, converted_model: Path, *, validate: bool, data: Path | None, input_shapes: tuple[str, ...],
            samples: int, seed: int, allow_unvalidated: bool, min_snr: float | None, max_abs_error: float | None,
            min_top1: float | None, max_accuracy_drop: float | None, labels: Path | None,
            report_path: Path | None, report_md: Path | None, as_json: bool, quiet: bool) -> None:
    """Validation only: compare a converted model with its float original (same metrics and gates).

    \b
    Examples:
      qconvert compare model.onnx model.kmeans4.onnx --data val.npz --max-accuracy-drop 1
      qconvert compare model.onnx vendor_int8.onnx --min-snr 25 --json
    """
    if not validate:
        raise click.UsageError("compare is validation; --no-validate leaves nothing to do")
    validation = _validation_plan(data=data, input_shapes=input_shapes, samples=samples, seed=seed,
                                  allow_unvalidated=allow_unvalidated, labels=labels)
    report = compare_models(float_model, converted_model, validation, Gates(min_snr, max_abs_error, min_top1, max_accuracy_drop))
    _emit_reports(report, report_path, report_md)
    _finish(report, _console(quiet), as_json)


LOG_WIDTH = 200  # columns at least, when stderr is not a terminal (a CI log): tables keep their names whole


def _console(quiet: bool) -> Console:
    """Progress and summaries go to stderr; into a log (not a terminal) at least LOG_WIDTH columns wide, as
    rich would otherwise assume 80 and cut weight names."""
    console = Console(stderr=True, quiet=quiet)
    if not console.is_terminal:
        console.width = max(console.width, LOG_WIDTH)
    return console


def _granularity(per_channel: bool | None, default: Granularity) -> Granularity:
    if per_channel is None:
        return default
    return Granularity.PER_CHANNEL if per_channel else Granularity.PER_TENSOR


def _ints(text: str, option: str) -> tuple[int, ...]:
    try:
        return tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise click.UsageError(f"{option} expects integers separated by commas, got {text!r}") from None


def _floats(text: str, option: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise click.UsageError(f"{option} expects numbers separated by commas, got {text!r}") from None


def _dims(text: str, option: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise click.UsageError(f"{option} expects HxW, e.g. 224x224; got {text!r}")
    return int(parts[0]), int(parts[1])


def _dispatch(models: tuple[Path, ...], plan: Plan, common: dict[str, Any]) -> None:
    """One model: the full single-model behaviour. Several, or a directory: batch into -o DIR."""
    if len(models) == 1 and not models[0].is_dir():
        _run(models[0], plan, **common)
    else:
        _run_batch(models, plan, **common)


def _run_batch(models: tuple[Path, ...], plan: Plan, *, output: Path | None, as_json: bool, quiet: bool,
               report_path: Path | None, report_md: Path | None, report_html: Path | None, **common: Any) -> None:
    if output is None or str(output) == "-" or report_path or report_md or report_html or any(str(m) == "-" for m in models):
        raise click.UsageError("several models (or a directory) need -o DIR; reports go beside each model, no -, --report or --report-md")
    paths = batch.expand(models)
    if output.exists() and not output.is_dir():
        raise click.UsageError(f"{output}: several models need -o to be a folder, and this is a file")
    output.mkdir(parents=True, exist_ok=True)
    validation = _validation_plan(**common) if common["validate"] else None
    gates = Gates(common["min_snr"], common["max_abs_error"], common["min_top1"], common["max_accuracy_drop"])
    jobs = [batch.Job(p, batch.output_for(p, output, plan), plan, validation, gates, common["keep_failed"]) for p in paths]
    console = _console(quiet)
    with console.status(f"converting {len(jobs)} models", spinner="dots") if console.is_terminal else contextlib.nullcontext():
        outcomes = batch.run_all(jobs)
    if as_json:
        reports = [json.loads(o.report_json) if o.report_json else {"input": {"path": str(o.model)}, "error": o.message, "exit_code": o.exit_code}
                   for o in outcomes]
        click.echo(json.dumps(reports, indent=2))
    else:
        console.print(batch_summary(outcomes))
    code = batch.worst(outcomes)
    if code:
        failed = [o for o in outcomes if o.exit_code]
        raise CliError(f"{len(failed)} of {len(outcomes)} models failed; first: {failed[0].message}", code)


def _validation_plan(*, data: Path | None, input_shapes: tuple[str, ...], samples: int, seed: int, allow_unvalidated: bool,
                     labels: Path | None, **_: Any) -> ValidationPlan:
    return ValidationPlan(data=data, input_shapes=dict(map(parse_input_shape, input_shapes)), samples=samples, seed=seed,
                          allow_unrunnable=allow_unvalidated, labels=labels)


def _run(
    model: Path,
    plan: Plan | AutoPlan,
    *,
    validate: bool,
    data: Path | None,
    input_shapes: tuple[str, ...],
    samples: int,
    seed: int,
    allow_unvalidated: bool,
    min_snr: float | None,
    max_abs_error: float | None,
    min_top1: float | None,
    max_accuracy_drop: float | None,
    labels: Path | None,
    keep_failed: bool,
    output: Path | None,
    report_path: Path | None,
    report_md: Path | None,
    report_html: Path | None,
    as_json: bool,
    quiet: bool,
    plan_out: Path | None = None,
) -> None:
    from_stdin, to_stdout = str(model) == "-", output is not None and str(output) == "-"
    if to_stdout and as_json:
        raise click.UsageError("-o - writes the model to stdout, so --json cannot; use --report PATH")
    if from_stdin and output is None:
        raise click.UsageError("reading the model from stdin (-) needs -o PATH or -o -")
    validation = None
    if validate:
        validation = _validation_plan(data=data, input_shapes=input_shapes, samples=samples, seed=seed,
                                      allow_unvalidated=allow_unvalidated, labels=labels)
    gates = Gates(min_snr, max_abs_error, min_top1, max_accuracy_drop)
    if output is not None and output.is_dir():
        if from_stdin:
            raise click.UsageError("a model from stdin (-) has no name to write into a folder: give -o PATH")
        output = output / default_output(model, plan).name
    target = None if to_stdout else (output or default_output(model, plan))
    if report_path is None and target is not None and not io.is_special(target):
        report_path = target.with_suffix(".report.json")
    console = _console(quiet)
    with _model_file(model) as path, (console.status("converting", spinner="dots") if console.is_terminal else contextlib.nullcontext()) as status:
        def progress(message: str) -> None:
            if status is not None:
                status.update(message)

        conversion = api.run(plan, path, validation, gates, output=target, keep_failed=keep_failed, progress=progress)
    if to_stdout and conversion.staged:
        conversion.discard()
        raise UsageError(TOO_BIG_FOR_A_STREAM)
    report = conversion.report
    if from_stdin:
        report.input_path = "-"
    if to_stdout:
        report.output_path = "-" if report.passed or keep_failed else None
    _emit_reports(report, report_path, report_md, report_html)
    if plan_out is not None and isinstance(report.details.get("auto"), dict):
        io.write_atomically(plan_out, plan_toml(report.details["auto"], str(model)).encode())
    if to_stdout and report.output_path:
        assert conversion.model_bytes is not None  # stdout never gets an external-data model
        sys.stdout.buffer.write(conversion.model_bytes)
        sys.stdout.buffer.flush()
    _finish(report, console, as_json)


def _emit_reports(report: Report, report_path: Path | None, report_md: Path | None, report_html: Path | None = None) -> None:
    if report_path is not None:
        io.write_atomically(report_path, report.to_json().encode())
    if report_md is not None:
        io.write_atomically(report_md, report.to_markdown().encode())
    if report_html is not None:
        io.write_atomically(report_html, report.to_html().encode())


def _finish(report: Report, console: Console, as_json: bool) -> None:
    """Print the report (JSON on stdout, or the summary on stderr); a failed gate exits 5."""
    if as_json:
        click.echo(report.to_json(), nl=False)
    else:
        console.print(summary(report))
    if not report.passed:
        raise GateFailed("quality gate failed: " + "; ".join(map(_describe, report.failed_gates)))


def _describe(gate: GateResult) -> str:
    value = "not finite" if gate.value is None else f"{gate.value:.4g}"
    return f"{gate.gate} on {gate.subject}: {value}, limit {gate.limit:g}"


@contextlib.contextmanager
def _model_file(model: Path) -> Iterator[Path]:
    """The model's path; for - (stdin), a temporary copy of the bytes read."""
    if str(model) != "-":
        yield model
        return
    with tempfile.TemporaryDirectory(prefix="qconvert-") as tmp:
        path = Path(tmp) / "stdin.onnx"
        path.write_bytes(sys.stdin.buffer.read())
        yield path


def main() -> None:
    cli.main(prog_name="qconvert")
