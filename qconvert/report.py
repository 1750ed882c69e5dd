"""The conversion report: a dataclass, its versioned JSON form and a rich summary."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
from rich.console import Group
from rich.table import Table
from rich.text import Text

from qconvert import __version__
from qconvert.gates import GateResult
from qconvert.select import Skipped
from qconvert.validate import ValidationResult

SCHEMA_VERSION = 2
WORST_SHOWN = 5
SHORT_TECHNIQUE = {"batchnorm-folded": "fold", "data-aware": "data", "bias-corrected": "bias"}  # for narrow terminals


@dataclass(frozen=True)
class WeightReport:
    name: str
    source: str  # initializer | constant
    graph: str
    consumers: list[str]
    shape: list[int]
    elements: int
    dtype: str
    bits: int
    granularity: str
    channel_axis: int | None
    groups: int  # codebooks (kmeans) or scales (linear)
    float_bytes: int
    stored_bytes: int
    snr_db: float | None  # None: represented exactly
    note: str | None = None
    techniques: list[str] = field(default_factory=list)  # batchnorm-folded, data-aware, bias-corrected
    layer_snr_db: float | None = None  # the layer's output vs float on the calibration data (None: not measured or exact)


@dataclass(frozen=True)
class Histogram:
    """A weight's value distribution and the levels it was mapped to (for the HTML report only)."""

    name: str
    counts: list[int]
    edges: list[float]
    levels: list[float]  # centroids or grid values (of one channel when per channel)
    levels_of: str = ""  # "" for the whole tensor, else which channel's levels are drawn

    @staticmethod
    def of(name: str, array: Any, levels: Any, rows: int = 1, bins: int = 60) -> Histogram:
        """`levels` is [rows, L]; with several rows (channels) the widest one is drawn."""
        counts, edges = np.histogram(np.asarray(array, np.float64).ravel(), bins=bins)
        per_row = np.asarray(levels, np.float64).reshape(rows, -1)
        widest = int(np.argmax(per_row.max(axis=1) - per_row.min(axis=1)))
        shown = np.unique(per_row[widest])
        return Histogram(name, counts.tolist(), edges.tolist(), shown.tolist(), f"channel {widest}, the widest" if rows > 1 else "")


@dataclass(frozen=True)
class OpsetChange:
    before: int
    after: int
    storage: str  # how the integers are stored: uint4, packed, int8 ...
    note: str | None = None


@dataclass
class Report:
    method: str
    options: dict[str, Any]
    input_path: str
    input_bytes: int
    output_path: str | None
    output_bytes: int  # the model file plus its external data file, if any
    opset: OpsetChange
    weights: list[WeightReport]
    skipped: list[Skipped]
    validation: ValidationResult | None
    latency_ms: dict[str, float] | None = None  # median onnxruntime run time, float vs converted
    gates: list[GateResult] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)  # HTML only, not in the JSON
    details: dict[str, Any] = field(default_factory=dict)  # method-specific facts
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    output_data: str | None = None  # the external data file written beside the output (models over 2 GB ...)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        float_bytes = sum(w.float_bytes for w in self.weights)
        stored = sum(w.stored_bytes for w in self.weights)
        return _jsonable(
            {
                "schema_version": SCHEMA_VERSION,
                "tool": versions(),
                "method": self.method,
                "options": self.options,
                "input": {"path": self.input_path, "bytes": self.input_bytes},
                "output": {"path": self.output_path, "bytes": self.output_bytes, "data": self.output_data},
                "size_ratio": self.size_ratio,
                "opset": dataclasses.asdict(self.opset),
                "weights": {
                    "quantized": len(self.weights),
                    "skipped": len(self.skipped),
                    "float_bytes": float_bytes,
                    "stored_bytes": stored,
                    "ratio": stored / float_bytes if float_bytes else 0.0,
                },
                "per_weight": [dataclasses.asdict(w) for w in self.weights],
                "skipped": [dataclasses.asdict(s) for s in self.skipped],
                "validation": dataclasses.asdict(self.validation) if self.validation else None,
                "latency_ms": self.latency_ms,
                "gates": {"passed": self.passed, "checks": [dataclasses.asdict(g) for g in self.gates]},
                "details": self.details,
                "warnings": self.warnings,
                "timings_s": self.timings,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        """A Markdown summary that fits a CI job summary."""
        return markdown(self)

    def to_html(self) -> str:
        """One self-contained HTML page with pictures (inline SVG, no scripts)."""
        from qconvert.report_html import render  # the page imports this module

        return render(self)


def versions() -> dict[str, str]:
    return {
        "name": "qconvert",
        "version": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    """Tuples to lists, non-finite floats to None (JSON has no Infinity)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def summary(report: Report) -> Group:
    """A short human summary: sizes, output drift, the worst layers."""
    parts: list[Any] = []
    out = report.output_path or "(not written)"
    if report.output_data:
        out += f" + {Path(report.output_data).name}"
    parts.append(
        Text.assemble(
            (f"{report.input_path}", "bold"),
            " -> ",
            (out, "bold"),
            f": {_size(report.input_bytes)} -> {_size(report.output_bytes)} ",
            (f"({100 * report.size_ratio:.1f} %)", "green"),
        )
    )
    kinds = Counter(w.granularity for w in report.weights)
    widths = "/".join(str(b) for b in sorted({w.bits for w in report.weights})) or str(report.options.get("bits"))
    if report.method != "compare":
        parts.append(
            Text(
                f"{len(report.weights)} weights {'palettized' if report.method == 'kmeans' else 'quantized'} at {widths} bits "
                f"({', '.join(f'{n} {kind}' for kind, n in sorted(kinds.items()))}), {len(report.skipped)} left as they were; "
                f"opset {report.opset.before} -> {report.opset.after}, stored as {report.opset.storage}"
            )
        )
    if report.opset.note:
        parts.append(Text(report.opset.note, style="yellow"))
    validation = report.validation
    if validation:
        table = Table(title=f"Outputs vs float ({validation.samples} samples, {validation.source})", title_justify="left")
        for column in ("output", "SNR dB", "cosine", "max |err|", "mean |err|", "top-1 agree"):
            table.add_column(column, justify="left" if column == "output" else "right", overflow="fold")
        for o in validation.outputs:
            table.add_row(
                o.name,
                _db(o.snr_db),
                f"{o.cosine_similarity:.5f}",
                f"{o.max_abs_error:.3g}",
                f"{o.mean_abs_error:.3g}",
                "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f} %",
            )
        parts.append(table)
        if validation.accuracy:
            a = validation.accuracy
            parts.append(
                Text(f"accuracy on labels: float {100 * a.float_top1:.2f} %, converted {100 * a.quantized_top1:.2f} % "
                     f"(drop {a.drop_points:.2f} points)")
            )
    if report.latency_ms:
        lat = report.latency_ms
        parts.append(Text(f"onnxruntime latency: float {lat['float']:.2f} ms, converted {lat['converted']:.2f} ms "
                          f"({lat['converted'] / lat['float']:.2f}x; median of {int(lat['runs'])} runs)"))
    for key, value in report.details.items():
        if isinstance(value, str):
            parts.append(Text(f"{key.replace('_', ' ')}: {value}"))
    parts += [Text(line) for line in _fidelity_lines(report)]
    plan = report.details.get("auto")
    if isinstance(plan, dict):
        parts.append(_auto_table(plan, {w.name: w for w in report.weights}))
    measured = any(w.layer_snr_db is not None for w in report.weights)
    worst = _worst(report.weights, WORST_SHOWN)
    if worst:
        table = Table(title=f"Weights with the lowest {'layer output' if measured else ''} SNR".replace("  ", " "), title_justify="left")
        columns = ("weight", "op", "shape", "weight SNR dB", *(("layer SNR dB", "techniques") if measured else ()), "bytes")
        for column in columns:
            table.add_column(column, justify="left" if column in ("weight", "op", "techniques") else "right", overflow="fold")
        for w in worst:
            extra = (_db(w.layer_snr_db), "+".join(SHORT_TECHNIQUE.get(t, t) for t in w.techniques) or "-") if measured else ()
            table.add_row(w.name, ",".join(w.consumers), "x".join(map(str, w.shape)), _db(w.snr_db), *extra, f"{w.float_bytes} -> {w.stored_bytes}")
        parts.append(table)
    if report.gates:
        table = Table(title=f"Quality gates: {'passed' if report.passed else 'FAILED'}", title_justify="left")
        for column in ("gate", "measured on", "value", "limit", "result"):
            table.add_column(column, overflow="fold")
        for g in report.gates:
            value = "-" if g.value is None else f"{g.value:.4g}"
            table.add_row(g.gate, g.subject, value, f"{g.limit:g}", "pass" if g.passed else Text("FAIL", style="bold red"))
        parts.append(table)
    for warning in report.warnings:
        parts.append(Text(f"warning: {warning}", style="yellow"))
    return Group(*parts)


def _auto_table(details: dict[str, Any], weights: dict[str, WeightReport]) -> Table:
    """qconvert auto: the plan per weight, and how the search went."""
    table = Table(title=f"auto plan ({_auto_steps(details)})", title_justify="left")
    for column in ("weight", "choice", "gain dB", "predicted noise dB", "weight SNR dB", "bytes"):
        table.add_column(column, justify="left" if column in ("weight", "choice") else "right", overflow="fold")
    for row in details["plan"]:
        weight = weights.get(row["weight"])
        gain = "-" if not row["gain"] else f"{10 * math.log10(row['gain']):.1f}"
        noise = "-" if not row["predicted_noise"] else f"{-10 * math.log10(row['predicted_noise']):.1f}"
        table.add_row(row["weight"], row["choice"], gain, noise, _db(weight.snr_db) if weight else "-", str(row["bytes"]))
    return table


def _auto_steps(details: dict[str, Any]) -> str:
    return "; ".join(f"aimed {i['aimed_snr_db']:.1f} dB, predicted {i['predicted_snr_db']:.1f}, measured "
                     f"{_db(i['measured_snr_db'])}: {'met' if i['passed'] else 'missed'}" for i in details["iterations"])


def _worst(weights: list[WeightReport], count: int) -> list[WeightReport]:
    """The weights that hurt most: by measured layer-output SNR where there is one, else by weight SNR."""
    def key(w: WeightReport) -> float:
        value = w.layer_snr_db if w.layer_snr_db is not None else w.snr_db
        return math.inf if value is None else value
    return sorted(weights, key=key)[:count]


def _fidelity_lines(report: Report) -> list[str]:
    """BatchNorm folding and the calibration-data techniques, in a sentence each."""
    lines = []
    folded = report.details.get("folded_batchnorm")
    if isinstance(folded, list) and folded:
        lines.append(f"BatchNormalization folded into the layer before it: {len(folded)}")
    check = report.details.get("calibration")
    if isinstance(check, dict):
        applied = Counter(t for w in report.weights for t in w.techniques if t != "batchnorm-folded")
        line = (f"calibration ({check['samples']} samples, {check['source']}): {check['layers_refined']} of "
                f"{check['layers_checked']} layers refined ({', '.join(f'{n} {t}' for t, n in sorted(applied.items())) or 'none'})")
        variants = ", ".join(f"{v['variant']} {_db(v['model_snr_db'])}" for v in check.get("variants", []))
        line += f"; output SNR dB on that data: {variants}; kept: {check.get('chosen')}"
        lines.append(line)
    return lines


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f}"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError


def inspection(info: dict[str, Any]) -> Group:
    """The rich view of `qconvert inspect`."""
    parts: list[Any] = [
        Text(f"{info['path']}: {_size(info['bytes'])}, IR {info['ir_version']}, opset {info['opset']}"
             f"{', ' + info['producer'] if info['producer'] else ''}")
    ]
    for kind in ("inputs", "outputs"):
        shown = ", ".join(f"{v['name']} {v['dtype']}[{'x'.join(str(d) if d else '?' for d in v['shape'])}]" for v in info[kind])
        parts.append(Text(f"{kind}: {shown}"))
    table = Table(title=f"{len(info['weights'])} weights ({_size(info['weight_bytes'])})", title_justify="left")
    for column in ("weight", "op", "shape", "dtype", "where"):
        table.add_column(column, overflow="fold")
    for w in info["weights"]:
        table.add_row(w["name"], ",".join(w["consumers"]), "x".join(map(str, w["shape"])), w["dtype"], w["location"])
    parts.append(table)
    if info["skipped"]:
        parts.append(Text(f"left as they are: {', '.join(s['name'] + ' (' + s['reason'] + ')' for s in info['skipped'][:8])}"
                          + (" ..." if len(info["skipped"]) > 8 else "")))
    sizes = Table(title="Estimated file size", title_justify="left")
    for column in ("method", "bits", "granularity", "size", "% of now"):
        sizes.add_column(column, justify="left" if column in ("method", "granularity") else "right", overflow="fold")
    for e in info["estimates"]:
        sizes.add_row(e["method"], str(e["bits"]), e["granularity"], _size(e["bytes"]), f"{100 * e['ratio']:.1f}")
    parts.append(sizes)
    return Group(*parts)


def markdown(report: Report) -> str:
    """A Markdown summary that fits a CI job summary."""
    lines = [
        f"### qconvert {report.method}: {'passed' if report.passed else 'FAILED'}",
        "",
        f"`{report.input_path}` -> `{report.output_path or '(not written)'}`: "
        f"{_size(report.input_bytes)} -> {_size(report.output_bytes)} (**{100 * report.size_ratio:.1f} %**), "
        f"opset {report.opset.before} -> {report.opset.after}, stored as {report.opset.storage}",
        "",
    ]
    if report.validation:
        v = report.validation
        lines += [f"Outputs vs float ({v.samples} samples, {v.source}):", "",
                  "| output | SNR dB | cosine | max abs err | top-1 agreement |", "|---|---:|---:|---:|---:|"]
        for o in v.outputs:
            agree = "-" if o.top1_agreement is None else f"{100 * o.top1_agreement:.1f} %"
            lines.append(f"| {o.name} | {_db(o.snr_db)} | {o.cosine_similarity:.5f} | {o.max_abs_error:.3g} | {agree} |")
        if v.accuracy:
            a = v.accuracy
            lines += ["", f"Accuracy on labels: float {100 * a.float_top1:.2f} %, converted {100 * a.quantized_top1:.2f} % (drop {a.drop_points:.2f} points)"]
        lines.append("")
    if report.gates:
        lines += ["| gate | on | value | limit | result |", "|---|---|---:|---:|---|"]
        for g in report.gates:
            lines.append(f"| `{g.gate}` | {g.subject} | {'-' if g.value is None else f'{g.value:.4g}'} | {g.limit:g} | {'pass' if g.passed else '**FAIL**'} |")
        lines.append("")
    lines += [f"{line}  " for line in _fidelity_lines(report)] + ([""] if _fidelity_lines(report) else [])
    plan = report.details.get("auto")
    if isinstance(plan, dict):
        lines += [f"auto: {_auto_steps(plan)}", ""]
    worst = _worst(report.weights, 10)
    if worst:
        lines += ["| weight | op | shape | bits | granularity | weight SNR dB | layer SNR dB | techniques | bytes |",
                  "|---|---|---|---:|---|---:|---:|---|---:|"]
        for w in worst:
            lines.append(f"| {w.name} | {','.join(w.consumers)} | {'x'.join(map(str, w.shape))} | {w.bits} | {w.granularity} | {_db(w.snr_db)} | "
                         f"{'-' if w.layer_snr_db is None else _db(w.layer_snr_db)} | {', '.join(w.techniques) or '-'} | {w.float_bytes} -> {w.stored_bytes} |")
        lines.append("")
    lines += [f"- warning: {w}" for w in report.warnings]
    return "\n".join(lines).rstrip() + "\n"


def batch_summary(outcomes: list[Any]) -> Table:
    """One row per model of a batch run (outcomes from qconvert.batch)."""
    table = Table(title=f"{len(outcomes)} models", title_justify="left")
    for column in ("model", "result", "size", "worst output SNR dB"):
        table.add_column(column, justify="left" if column in ("model", "result") else "right", overflow="fold")
    for o in outcomes:
        result = Text("ok", style="green") if o.exit_code == 0 else Text(f"exit {o.exit_code}: {o.message}", style="red")
        size = f"{_size(o.input_bytes)} -> {_size(o.output_bytes)}" if o.report_json else "-"
        table.add_row(str(o.model), result, size, "-" if o.snr_db is None else f"{o.snr_db:.2f}")
    return table
