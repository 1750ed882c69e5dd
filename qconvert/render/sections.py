"""What a report says, section by section, as plain lines and tables that every rendering lays out its way."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconvert.report import Report, WeightReport

WORST_SHOWN = 5
SHORT_TECHNIQUE = {
    "batchnorm-folded": "fold",
    "data-aware": "data",
    "error-compensated": "gptq",
    "bias-corrected": "bias",
    "sequential": "seq",
}


@dataclass(frozen=True)
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    text: tuple[str, ...] = ()  # columns of text (left-aligned); the others hold numbers
    passed: list[bool] | None = None  # per row, for tables of checks: shown as pass / FAIL


def headline(report: Report) -> tuple[str, str, str]:
    """(input, output, sizes): what was converted into what, and how much smaller."""
    out = report.output_path or "(not written)"
    if report.output_data:
        out += f" + {Path(report.output_data).name}"
    return (
        report.input_path,
        out,
        f"{size(report.input_bytes)} -> {size(report.output_bytes)} ({100 * report.size_ratio:.1f} %)",
    )


def storage_line(report: Report) -> str:
    line = f"opset {report.opset.before} -> {report.opset.after}, stored as {report.opset.storage}"
    if report.method == "compare":
        return line
    if isinstance(half := report.details.get("float16"), dict) and report.method == "float16":
        return (
            f"{len(report.weights)} weights stored as float16, {len(report.skipped)} left float32; "
            f"{half['float16_ops']} ops in float16, {half['float32_ops']} kept float32, {half['casts']} Casts; "
            f"opset {report.opset.before}"
        )
    if isinstance(half, dict):
        line += f"; the rest in float16 ({half['float32_ops']} ops kept float32, {half['casts']} Casts)"
    kinds = Counter(w.granularity for w in report.weights)
    widths = "/".join(str(b) for b in sorted({w.bits for w in report.weights})) or str(report.options.get("bits"))
    verb = "palettized" if report.method == "kmeans" else "quantized"
    return (
        f"{len(report.weights)} weights {verb} at {widths} bits "
        f"({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}), "
        f"{len(report.skipped)} left as they were; {line}"
    )


def outputs(report: Report) -> Table | None:
    validation = report.validation
    if validation is None:
        return None
    rows = [
        [
            o.name,
            db(o.snr_db),
            f"{o.cosine_similarity:.5f}",
            f"{o.max_abs_error:.3g}",
            f"{o.mean_abs_error:.3g}",
            "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f} %",
        ]
        for o in validation.outputs
    ]
    return Table(
        f"Outputs vs float ({validation.samples} samples, {validation.source})",
        ["output", "SNR dB", "cosine", "max |err|", "mean |err|", "top-1 agree"],
        rows,
        ("output",),
    )


def notes(report: Report) -> list[str]:
    """Accuracy, latency, method facts and the data-aware techniques, a sentence each."""
    lines = []
    if report.validation and (a := report.validation.accuracy):
        lines.append(
            f"accuracy on labels: float {100 * a.float_top1:.2f} %, converted {100 * a.quantized_top1:.2f} % "
            f"(drop {a.drop_points:.2f} points)"
        )
    if report.validation and (m := report.validation.metric):
        lines.append(
            f"task metric {m.name}: float {m.float_value:.2f}, converted {m.converted_value:.2f} (drop {m.drop:.2f})"
        )
    if report.latency_ms:
        lat = report.latency_ms
        two = (
            f"; 2 threads: {lat['float_2t']:.2f} ms, {lat['converted_2t']:.2f} ms "
            f"({lat['converted_2t'] / lat['float_2t']:.2f}x)"
            if "float_2t" in lat
            else ""
        )
        lines.append(
            f"onnxruntime latency, 1 thread: float {lat['float']:.2f} ms, converted {lat['converted']:.2f} ms "
            f"({lat['converted'] / lat['float']:.2f}x){two} (median of {int(lat['runs'])} runs, alternating)"
        )
    if report.time_by_op:
        lines.append(_time_by_op(report.time_by_op))
    ranges = report.details.get("activation_ranges") or {}
    if rule := ranges.get("rule"):
        tried = ranges.get("held_out_snr_db") or {}
        held = "; output SNR dB on held-out samples: " + ", ".join(f"{r} {db(v)}" for r, v in tried.items())
        lines.append(f"activation ranges: {rule} (the model's outputs: min/max)" + (held if tried else ""))
    if speed := ranges.get("speed"):
        lines.append(_speed(speed))
    if loaded := report.details.get("decoded_at_load"):
        lines.append(
            f"decoded at load, as no integer kernel reads them: {len(loaded)} weights ({', '.join(loaded[:3])}"
            + (" ...)" if len(loaded) > 3 else ")")
        )
    lines += [f"{key.replace('_', ' ')}: {value}" for key, value in report.details.items() if isinstance(value, str)]
    return lines + fidelity(report)


def _speed(speed: dict[str, Any]) -> str:
    times = {c["float"]: c["ms"] for c in speed["candidates"]}
    chosen = speed["chosen"]
    return (
        f"optimize speed: layers kept float: {chosen} ({len(speed['floated'])}), {times[chosen]:.3g} ms a run "
        f"against {times['none']:.3g} ms with every layer integer (1 thread, while converting)"
    )


def fidelity(report: Report) -> list[str]:
    """BatchNorm folding and the calibration-data techniques, in a sentence each."""
    lines = []
    folded = report.details.get("folded_batchnorm")
    if isinstance(folded, list) and folded:
        lines.append(f"BatchNormalization folded into the layer before it: {len(folded)}")
    check = report.details.get("calibration")
    if isinstance(check, dict):
        applied = Counter(t for w in report.weights for t in w.techniques if t != "batchnorm-folded")
        line = (
            f"calibration ({check['samples']} samples, {check['source']}): {check['layers_refined']} of "
            f"{check['layers_checked']} layers refined "
            f"({', '.join(f'{n} {t}' for t, n in sorted(applied.items())) or 'none'})"
        )
        variants = ", ".join(
            f"{v['variant']} {db(v['model_snr_db'])}"
            + (f" ({db(v['in_sample_snr_db'])} in-sample)" if "in_sample_snr_db" in v else "")
            for v in check.get("variants", [])
        )
        where = (
            f"on {check['checked_on_samples']} samples held out from the statistics"
            if check.get("held_out")
            else "on that data"
        )
        lines.append(line + f"; output SNR dB {where}: {variants}; kept: {check.get('chosen')}")
        if isinstance(again := check.get("sequential"), dict):
            verdict = f"kept, then fitted on {again['samples']} samples" if again["kept"] else "not kept"
            lines.append(
                f"{again['layers']} GPTQ layers rounded again in graph order on the quantized model's inputs: "
                f"{db(again['model_snr_db'])} -> {db(again['sequential_model_snr_db'])} dB {where}; {verdict}"
            )
            if isinstance(last := again.get("last_layer"), dict) and again["kept"]:
                lines += _last_layer(last)
    return lines


def _last_layer(last: dict[str, Any]) -> list[str]:
    """What became of the last layer rounded again, where that is not simply its rounding again with a shift."""
    if not last["rounded_again"]:
        again = last.get("shifted_model_snr_db", last.get("rounded_again_model_snr_db"))
        shifted = last.get("plain_shifted_model_snr_db")
        return [
            f"{last['layer']}, the last of them, stays plainly rounded: {db(last['plain_model_snr_db'])} dB"
            + (f" ({db(shifted)} with its bias shift)" if shifted is not None else "")
            + f" against {db(again)} rounded again"
        ]
    if not last["shifted"] and "unshifted_model_snr_db" in last:
        return [
            f"{last['layer']}, the last of them, keeps its bias: {db(last['shifted_model_snr_db'])} dB with "
            f"the mean output error taken out, {db(last['unshifted_model_snr_db'])} without"
        ]
    return []


def auto_plan(report: Report) -> Table | None:
    """qconvert auto: the plan per weight, and how the search went."""
    details = report.details.get("auto")
    if not isinstance(details, dict):
        return None
    weights = {w.name: w for w in report.weights}
    rows = []
    for row in details["plan"]:
        weight = weights.get(row["weight"])
        gain = "-" if not row["gain"] else f"{10 * math.log10(row['gain']):.1f}"
        noise = "-" if not row["predicted_noise"] else f"{-10 * math.log10(row['predicted_noise']):.1f}"
        rows.append(
            [row["weight"], row["choice"], gain, noise, db(weight.snr_db) if weight else "-", str(row["bytes"])]
        )
    return Table(
        f"auto plan ({auto_steps(details)})",
        ["weight", "choice", "gain dB", "predicted noise dB", "weight SNR dB", "bytes"],
        rows,
        ("weight", "choice"),
    )


def auto_steps(details: dict[str, object]) -> str:
    iterations = details["iterations"]
    assert isinstance(iterations, list)
    return "; ".join(
        f"aimed {i['aimed_snr_db']:.1f} dB, predicted {i['predicted_snr_db']:.1f}, measured "
        f"{db(i['measured_snr_db'])}: {'met' if i['passed'] else 'missed'}"
        for i in iterations
    )


def worst_weights(report: Report, count: int = WORST_SHOWN) -> Table | None:
    """The weights that hurt most: by measured layer-output SNR where there is one, else by weight SNR."""

    def key(w: WeightReport) -> float:
        value = w.layer_snr_db if w.layer_snr_db is not None else w.snr_db
        return math.inf if value is None else value

    worst = sorted(report.weights, key=key)[:count]
    if not worst:
        return None
    measured = any(w.layer_snr_db is not None for w in report.weights)
    columns = [
        "weight",
        "op",
        "shape",
        "bits",
        "granularity",
        "weight SNR dB",
        *(["layer SNR dB", "techniques"] if measured else []),
        "bytes",
    ]
    rows = [
        [
            w.name,
            ",".join(w.consumers),
            "x".join(map(str, w.shape)),
            str(w.bits),
            w.granularity,
            db(w.snr_db),
            *(
                [db(w.layer_snr_db), "+".join(SHORT_TECHNIQUE.get(t, t) for t in w.techniques) or "-"]
                if measured
                else []
            ),
            f"{w.float_bytes} -> {w.stored_bytes}",
        ]
        for w in worst
    ]
    return Table(
        f"Weights with the lowest {'layer output ' if measured else ''}SNR",
        columns,
        rows,
        ("weight", "op", "shape", "granularity", "techniques"),
    )


def gates(report: Report) -> Table | None:
    if not report.gates:
        return None
    rows = [[g.gate, g.subject, "-" if g.value is None else f"{g.value:.4g}", f"{g.limit:g}"] for g in report.gates]
    return Table(
        f"Quality gates: {'passed' if report.passed else 'FAILED'}",
        ["gate", "measured on", "value", "limit"],
        rows,
        ("gate", "measured on"),
        passed=[g.passed for g in report.gates],
    )


def db(value: float | None, digits: int = 2) -> str:
    return "exact" if value is None else f"{value:.{digits}f}"


def size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _time_by_op(profile: dict[str, Any]) -> str:
    """Where the time goes: each model's four costliest op types, and the converted model's Q/DQ kernels."""

    def top(times: list[dict[str, Any]]) -> str:
        return ", ".join(f"{t['op']} {t['ms']:.2f}" for t in times[:4])

    return (
        f"time by op, ms per run at 1 thread: float {top(profile['float'])}; converted {top(profile['converted'])}"
        f" ({profile['transitions_per_run']} Quantize/DequantizeLinear kernels per run)"
    )
