"""The `qconvert` command line: parse options into plans, run the pipeline, render the report."""

from __future__ import annotations

import contextlib
import ctypes
import json
import sys
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
from rich.console import Console

from qconvert import api, batch, io, options
from qconvert.config import layer_overrides
from qconvert.describe import inspect_model
from qconvert.drift import JUMPS
from qconvert.drift import to_dict as debug_dict
from qconvert.errors import ExitCode, GateFailed, QConvertError, UsageError
from qconvert.gates import GateResult
from qconvert.mixed.search import plan_toml
from qconvert.pipeline import TOO_BIG_FOR_A_STREAM, compare_models, default_output
from qconvert.plan import (
    DEFAULT_MIN_ELEMENTS,
    FLOAT16_TARGET_SNR,
    SMALL_WEIGHTS,
    AnyPlan,
    AutoPlan,
    CalibrationMethod,
    Float16Plan,
    Granularity,
    KMeansPlan,
    LinearPlan,
)
from qconvert.render.debug import page as debug_page
from qconvert.render.debug import terminal as debug_view
from qconvert.render.terminal import batch_summary, inspection, summary
from qconvert.report import Report
from qconvert.version import __version__

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    internal error (a bug; rerun with --debug for the traceback)
  2    usage error: bad option or argument, or a --metric that fails
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

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
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
            raise CliError(
                f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", ExitCode.INTERNAL
            ) from e


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


@cli.command(epilog=EXIT_CODES_HELP)
@options.MODELS
@click.option(
    "--bits", "-b", type=click.IntRange(1, 8), required=True, help="Index bits: 2**bits centroids per codebook (1-8)."
)
@click.option(
    "--per-channel/--per-tensor",
    default=None,
    help="One codebook per output channel, or one per tensor [default: per channel where that beats spending "
    "the codebooks' bits on one more index bit, i.e. gains over 6 dB per added bit per weight].",
)
@options.CODEBOOK_OVERHEAD
@click.option(
    "--group-size",
    type=click.IntRange(min=1),
    default=None,
    help="One codebook per N output channels (sorted by range, so that each codebook serves channels alike) "
    "[default: per weight, the per-channel form that pays best per stored bit, groups of 16 among them].",
)
@options.selection(
    DEFAULT_MIN_ELEMENTS,
    "Weights with fewer elements are too small for a palette to pay (its codebook and decode nodes): they stay "
    "float, or take --small-weights int8.",
)
@click.option(
    "--small-weights",
    type=click.Choice(SMALL_WEIGHTS),
    default=SMALL_WEIGHTS[0],
    show_default=True,
    help="What weights under --min-elements become: left float, or int8 DequantizeLinear (a scale per channel where "
    "that pays; bias-corrected with calibration data) where that is smaller than their float values.",
)
@click.option(
    "--keep-opset", is_flag=True, help="Never raise the opset: store 4/2-bit indices bit-packed instead of uint4/uint2."
)
@options.techniques(
    "Inputs for the data-aware palettes and bias correction: an .npz (one array per input, axis 0 = "
    "samples) or a folder of images (see --image-size ... --std) [default: --data]."
)
@options.FLOAT16
@options.VALIDATION
@options.GATES
@options.OUTPUT
@options.CONFIG
def kmeans(models: tuple[Path, ...], **o: Any) -> None:
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
        bits=o["bits"],
        granularity=options.granularity(o["per_channel"], Granularity.AUTO),
        raise_opset=not o["keep_opset"],
        max_codebook_overhead=o["max_codebook_overhead"],
        group_size=o["group_size"],
        float16=o["float16"],
        small_weights=o["small_weights"],
        overrides=layer_overrides(),
        **options.plan_fields(o),
    )
    _dispatch(models, plan, o)


@cli.command(epilog=EXIT_CODES_HELP)
@options.MODELS
@click.option(
    "--bits", "-b", type=click.Choice(["8", "4"]), default="8", show_default=True, help="Integer width of the weights."
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="One scale per output channel, or one per tensor (depthwise kernels always get per-channel).",
)
@click.option(
    "--symmetric/--asymmetric",
    default=True,
    show_default=True,
    help="Weights: signed with zero point 0, or unsigned with a zero point.",
)
@click.option(
    "--weights-only",
    "weights_only",
    is_flag=True,
    help="Quantize weights only, also with --calibration (whose data then serves the data-aware techniques only).",
)
@options.techniques(
    "Quantize activations too, with ranges measured on this data: an .npz of inputs (one array per "
    "input, axis 0 = samples) or a folder of images (see --image-size ... --std)."
)
@click.option(
    "--calibration-method",
    type=click.Choice([m.value for m in CalibrationMethod]),
    default="auto",
    show_default=True,
    help="Activation range: the observed min/max, percentiles (--percentile), the clipping that keeps the most "
    "information (entropy, KL divergence), the least squared error (mse), or auto: the rule (min/max, percentiles, "
    "mse, or each tensor's best) whose model measures best on held-out calibration samples, in two folds.",
)
@click.option(
    "--percentile",
    default=99.999,
    show_default=True,
    help="With --calibration-method percentile: the kept share of values, in %.",
)
@click.option(
    "--activation-type",
    type=click.Choice(["uint8", "int8"]),
    default="uint8",
    show_default=True,
    help="Full QDQ activations: uint8 with a zero point (fastest on CPU), or symmetric int8 (GPU and NPU runtimes).",
)
@click.option(
    "--float-activations",
    default="0",
    show_default=True,
    metavar="N|auto",
    help="Full QDQ: leave float the N activations whose quantization loses most; auto: as many as measurably "
    "help on held-out calibration samples.",
)
@click.option(
    "--optimize",
    type=click.Choice(["size", "speed"]),
    default="size",
    show_default=True,
    help="Full QDQ: size quantizes every layer; speed keeps float the families of layers (small, depthwise ...) "
    "that run faster so, measured here on held-out calibration samples at no loss of output SNR (the report "
    "lists the timings; --exclude with its floated weights keeps the same layers float without timing).",
)
@click.option(
    "--block-size",
    type=click.IntRange(min=0),
    default=None,
    metavar="B",
    help="A scale per B weights along each weight's input axis (DequantizeLinear block_size, opset 21; below it, "
    "per channel); 0: none [default: for int4, blocks of 32 where they gain more than ~6 dB per bit their "
    "scales cost].",
)
@options.selection(1)
@options.FLOAT16
@options.VALIDATION
@options.GATES
@options.OUTPUT
@options.CONFIG
def linear(models: tuple[Path, ...], **o: Any) -> None:
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
        bits=int(o["bits"]),
        granularity=options.granularity(o["per_channel"], Granularity.PER_CHANNEL),
        symmetric=o["symmetric"],
        weights_only=o["weights_only"],
        calibration_method=CalibrationMethod(o["calibration_method"]),
        percentile=o["percentile"],
        activation_type=o["activation_type"],
        float_activations=_count_or_auto(o["float_activations"], "--float-activations"),
        float16=o["float16"],
        block_size=o["block_size"],
        optimize=o["optimize"],
        overrides=layer_overrides(),
        **options.plan_fields(o),
    )
    _dispatch(models, plan, o)


@cli.command(epilog=EXIT_CODES_HELP)
@options.MODELS
@click.option(
    "--keep-io-types/--no-keep-io-types",
    default=True,
    show_default=True,
    help="Inputs and outputs stay float32 (Casts inside the graph), or become float16.",
)
@click.option(
    "--keep",
    multiple=True,
    metavar="OP|NODE",
    help="Op types or node names (exact or glob) that stay float32 (repeatable).",
)
@click.option(
    "--target-snr",
    type=float,
    default=FLOAT16_TARGET_SNR,
    show_default=True,
    metavar="DB",
    help="Ops stay float32, those that drift most first, until every output's SNR vs float32 on the search "
    "data reaches this.",
)
@click.option(
    "--calibration",
    type=click.Path(path_type=Path),
    help="Inputs the search runs on: an .npz (one array per input) or a folder of images [default: --data].",
)
@options.IMAGES
@options.VALIDATION
@options.GATES
@options.OUTPUT
@options.CONFIG
def float16(models: tuple[Path, ...], **o: Any) -> None:
    """Compute in float16: half the file, for GPU and NPU runtimes.

    Every float tensor, constant and op becomes float16 where the op has a float16 form at the model's
    opset. Ops stay float32, with Casts around them, where float16 would break them: values past its
    range on the data (a BatchNorm's variance, large activations), shape arithmetic, index and box
    arithmetic (TopK, NonMaxSuppression, RoiAlign ...); then, while an output's SNR vs float32 on the data
    (--calibration, else --data, else random inputs) is under --target-snr, the ops whose own float16
    rounding costs most. onnxruntime's CPU runs most float16 ops through float32 kernels, so the
    validation measures float16's storage of every tensor, not a GPU's arithmetic.

    \b
    Examples:
      qconvert float16 model.onnx --data val.npz
      qconvert float16 model.onnx --no-keep-io-types --keep Softmax --keep 'head/*'
      qconvert kmeans model.onnx --bits 4 --float16     # palettized, the rest in float16
    """
    plan = Float16Plan(
        keep_io_types=o["keep_io_types"],
        keep=tuple(o["keep"]),
        target_snr=o["target_snr"],
        calibration=o["calibration"],
        preprocessing=options.preprocessing(o),
    )
    _dispatch(models, plan, o)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path, allow_dash=True))
@click.option("--target-snr", type=float, metavar="DB", help="Target: every output's SNR vs float at least this (dB).")
@click.option(
    "--min-top1",
    type=click.FloatRange(0, 1),
    metavar="FRACTION",
    help="Target: top-1 agreement with float at least this.",
)
@click.option(
    "--max-accuracy-drop",
    type=float,
    metavar="POINTS",
    help="Target: top-1 accuracy on labels drops at most this many points.",
)
@click.option(
    "--max-metric-drop",
    type=float,
    metavar="POINTS",
    help="Target: the --metric (on --data and its labels) drops at most this much from float's.",
)
@click.option(
    "--methods", default="kmeans,linear", show_default=True, help="Methods a weight may get (comma-separated)."
)
@click.option(
    "--bits",
    "bits_list",
    default="2,3,4,5,6,8",
    show_default=True,
    help="K-means widths to consider (linear: 4 and 8).",
)
@options.CODEBOOK_OVERHEAD
@options.selection(DEFAULT_MIN_ELEMENTS)
@options.techniques(
    "Inputs (.npz or a folder of images) for data-aware k-means and bias correction in the final model."
)
@click.option(
    "--plan-out",
    type=options.FILE,
    help="Save the chosen plan as TOML: `qconvert kmeans MODEL --config PLAN` redoes it without searching.",
)
@options.VALIDATION
@options.OUTPUT
def auto(model: Path, **o: Any) -> None:
    """Mixed precision: per weight the method and bit width that meet a target at the smallest size.

    Measures how much each layer's output noise reaches the model's outputs (one batched onnxruntime
    probe), estimates every option's size and noise (k-means 2-8 bits per tensor or channel, linear
    int4/int8, float), picks per weight by a knapsack-style allocation, then converts and validates
    the plan, tightening it while the target is missed. Only a model that meets the target is written.

    \b
    Examples:
      qconvert auto model.onnx --target-snr 30 --data val.npz
      qconvert auto model.onnx --max-accuracy-drop 0.5 --data val.npz --plan-out plan.toml
      qconvert auto rec.onnx --metric ctc-exact --max-metric-drop 2 --data val.npz --labels strings.json
      qconvert kmeans model.onnx --config plan.toml      # the same plan again, without the search
    """
    plan = AutoPlan(
        target_snr=o["target_snr"],
        min_top1=o["min_top1"],
        max_accuracy_drop=o["max_accuracy_drop"],
        max_metric_drop=o["max_metric_drop"],
        methods=tuple(m.strip() for m in o["methods"].split(",") if m.strip()),
        bits=options.ints(o["bits_list"], "--bits"),
        max_codebook_overhead=o["max_codebook_overhead"],
        **options.plan_fields(o),
    )
    targets = {"min_top1": None, "max_accuracy_drop": None, "max_metric_drop": None}  # the search's own gates
    _run(model, plan, {**o, **targets})


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--min-elements",
    default=DEFAULT_MIN_ELEMENTS,
    show_default=True,
    help="Weights with fewer elements are listed as left alone.",
)
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
@options.VALIDATION
@options.GATES
@options.REPORTS
def compare(float_model: Path, converted_model: Path, **o: Any) -> None:
    """Validation only: compare a converted model with its float original (same metrics and gates).

    \b
    Examples:
      qconvert compare model.onnx model.kmeans4.onnx --data val.npz --max-accuracy-drop 1
      qconvert compare model.onnx vendor_int8.onnx --min-snr 25 --json
    """
    validation = options.validation(o)
    if validation is None:
        raise click.UsageError("compare is validation; --no-validate leaves nothing to do")
    report = compare_models(float_model, converted_model, validation, options.gates(o))
    _emit_reports(report, o["report_path"], o["report_md"], o["report_html"])
    _finish(report, _console(o["quiet"]), o["as_json"])


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("float_model", type=click.Path(path_type=Path))
@click.argument("converted_model", type=click.Path(path_type=Path))
@options.VALIDATION
@click.option("--jumps", default=JUMPS, show_default=True, help="How many of the largest error jumps to explain.")
@click.option("--report", "report_path", type=options.FILE, help="Also write the JSON here.")
@click.option("--report-html", type=options.FILE, help="Also write an HTML page: the SNR along the depth, the jumps.")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON on stdout instead of the view on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
def debug(float_model: Path, converted_model: Path, jumps: int, **o: Any) -> None:
    """Which tensors of a converted model drift from the float one, and why.

    Matches the intermediate tensors of the two models by name (through qconvert's rewrites: folded
    BatchNorm, QDQ pairs, decoded weights, bias Adds; and onnxruntime's QDQ outputs), runs both on the data
    with them exposed, and gives each its SNR against float in graph order. The nodes that add the most
    noise run alone twice, on float's input with the converted weight and on the converted input with
    float's weight: the lower SNR names the cause (weight or activation quantization).

    \b
    Examples:
      qconvert debug rec.onnx rec.int8-qdq.onnx --data lines.npz
      qconvert debug model.onnx vendor_int8.onnx --data val.npz --json --report-html drift.html
    """
    validation = options.validation(o)
    if validation is None:
        raise click.UsageError("debug runs both models; --no-validate leaves nothing to do")
    found = api.debug(float_model, converted_model, validation=validation, jumps=jumps)
    data = json.dumps(debug_dict(found), indent=2) + "\n"
    if o["report_path"]:
        io.write_atomically(o["report_path"], data.encode())
    if o["report_html"]:
        io.write_atomically(o["report_html"], debug_page(found).encode())
    if o["as_json"]:
        click.echo(data, nl=False)
    else:
        _console(o["quiet"]).print(debug_view(found))


LOG_WIDTH = 200  # columns at least, when stderr is not a terminal (a CI log): tables keep their names whole


def _console(quiet: bool) -> Console:
    """Progress and summaries go to stderr; into a log (not a terminal) at least LOG_WIDTH columns wide, as
    rich would otherwise assume 80 and cut weight names."""
    console = Console(stderr=True, quiet=quiet)
    if not console.is_terminal:
        console.width = max(console.width, LOG_WIDTH)
    return console


def _count_or_auto(value: str, option: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{option} takes a count or 'auto', got {value!r}") from None


def _dispatch(models: tuple[Path, ...], plan: AnyPlan, o: dict[str, Any]) -> None:
    """One model: the full single-model behaviour. Several, or a directory: batch into -o DIR."""
    if len(models) == 1 and not models[0].is_dir():
        _run(models[0], plan, o)
    else:
        _run_batch(models, plan, o)


def _run_batch(models: tuple[Path, ...], plan: AnyPlan, o: dict[str, Any]) -> None:
    output = o["output"]
    if (
        output is None
        or str(output) == "-"
        or o["report_path"]
        or o["report_md"]
        or o["report_html"]
        or any(str(m) == "-" for m in models)
    ):
        raise click.UsageError(
            "several models (or a directory) need -o DIR; reports go beside each model, no -, --report or --report-md"
        )
    paths = batch.expand(models)
    if output.exists() and not output.is_dir():
        raise click.UsageError(f"{output}: several models need -o to be a folder, and this is a file")
    output.mkdir(parents=True, exist_ok=True)
    validation, gates = options.validation(o), options.gates(o)
    jobs = [batch.Job(p, batch.output_for(p, output, plan), plan, validation, gates, o["keep_failed"]) for p in paths]
    console = _console(o["quiet"])
    with (
        console.status(f"converting {len(jobs)} models", spinner="dots")
        if console.is_terminal
        else contextlib.nullcontext()
    ):
        outcomes = batch.run_all(jobs)
    if o["as_json"]:
        click.echo(
            json.dumps(
                [
                    json.loads(done.report_json)
                    if done.report_json
                    else {"input": {"path": str(done.model)}, "error": done.message, "exit_code": done.exit_code}
                    for done in outcomes
                ],
                indent=2,
            )
        )
    else:
        console.print(batch_summary(outcomes))
    code = batch.worst(outcomes)
    if code:
        failed = [done for done in outcomes if done.exit_code]
        raise CliError(f"{len(failed)} of {len(outcomes)} models failed; first: {failed[0].message}", code)


def _run(model: Path, plan: AnyPlan | AutoPlan, o: dict[str, Any]) -> None:
    """One model: convert, write the model and the reports, print the summary (or the JSON)."""
    from_stdin, to_stdout = str(model) == "-", o["output"] is not None and str(o["output"]) == "-"
    if to_stdout and o["as_json"]:
        raise click.UsageError("-o - writes the model to stdout, so --json cannot; use --report PATH")
    target = None if to_stdout else _target(model, plan, o["output"])
    report_path = o["report_path"]
    if report_path is None and target is not None and not io.is_special(target):
        report_path = target.with_suffix(".report.json")
    console = _console(o["quiet"])
    status = console.status("converting", spinner="dots") if console.is_terminal else contextlib.nullcontext()
    with _model_file(model) as path, status as spinner:

        def progress(message: str) -> None:
            if spinner is not None:
                spinner.update(message)

        conversion = api.run(
            plan,
            path,
            options.validation(o),
            options.gates(o),
            output=target,
            keep_failed=o["keep_failed"],
            progress=progress,
        )
    if to_stdout and conversion.staged:
        conversion.discard()
        raise UsageError(TOO_BIG_FOR_A_STREAM)
    report = conversion.report
    if from_stdin:
        report.input_path = "-"
    if to_stdout:
        report.output_path = "-" if report.passed or o["keep_failed"] else None
    _emit_reports(report, report_path, o["report_md"], o["report_html"])
    if o.get("plan_out") is not None and isinstance(report.details.get("auto"), dict):
        io.write_atomically(o["plan_out"], plan_toml(report.details["auto"], str(model)).encode())
    if to_stdout and report.output_path:
        assert conversion.model_bytes is not None  # stdout never gets an external-data model
        sys.stdout.buffer.write(conversion.model_bytes)
        sys.stdout.buffer.flush()
    _finish(report, console, o["as_json"])


def _target(model: Path, plan: AnyPlan | AutoPlan, output: Path | None) -> Path:
    """Where the model goes: -o, a file of the default name in -o's folder, or beside the input."""
    if str(model) == "-" and output is None:
        raise click.UsageError("reading the model from stdin (-) needs -o PATH or -o -")
    if output is not None and output.is_dir():
        if str(model) == "-":
            raise click.UsageError("a model from stdin (-) has no name to write into a folder: give -o PATH")
        return output / default_output(model, plan).name
    return output or default_output(model, plan)


def _emit_reports(
    report: Report, report_path: Path | None, report_md: Path | None, report_html: Path | None = None
) -> None:
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
