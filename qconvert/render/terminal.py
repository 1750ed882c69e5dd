"""The summary on stderr (rich): the report's sections as text and tables; also `inspect` and batch views."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from qconvert.render import sections
from qconvert.render.sections import size
from qconvert.report import Report


def summary(report: Report) -> Group:
    """A short human summary: sizes, output drift, the worst layers, gates and warnings."""
    source, target, sizes = sections.headline(report)
    parts: list[Any] = [
        Text.assemble((source, "bold"), " -> ", (target, "bold"), ": ", (sizes, "green")),
        Text(sections.storage_line(report)),
    ]
    if report.opset.note:
        parts.append(Text(report.opset.note, style="yellow"))
    parts += [table(t) for t in (sections.outputs(report),) if t]
    parts += [Text(line) for line in sections.notes(report)]
    parts += [
        table(t) for t in (sections.auto_plan(report), sections.worst_weights(report), sections.gates(report)) if t
    ]
    parts += [Text(f"warning: {warning}", style="yellow") for warning in report.warnings]
    return Group(*parts)


def table(data: sections.Table) -> Table:
    """A section's table; columns fold rather than cut names (logs keep them whole)."""
    view = Table(title=data.title, title_justify="left")
    for column in data.columns:
        view.add_column(column, justify="left" if column in data.text else "right", overflow="fold")
    if data.passed is not None:
        view.add_column("result", overflow="fold")
    for i, row in enumerate(data.rows):
        verdict = [] if data.passed is None else ["pass" if data.passed[i] else Text("FAIL", style="bold red")]
        view.add_row(*row, *verdict)
    return view


def inspection(info: dict[str, Any]) -> Group:
    """The view of `qconvert inspect`."""
    parts: list[Any] = [
        Text(
            f"{info['path']}: {size(info['bytes'])}, IR {info['ir_version']}, opset {info['opset']}"
            f"{', ' + info['producer'] if info['producer'] else ''}"
        )
    ]
    for kind in ("inputs", "outputs"):
        shown = ", ".join(
            f"{v['name']} {v['dtype']}[{'x'.join(str(d) if d else '?' for d in v['shape'])}]" for v in info[kind]
        )
        parts.append(Text(f"{kind}: {shown}"))
    rows = [
        [w["name"], ",".join(w["consumers"]), "x".join(map(str, w["shape"])), w["dtype"], w["location"]]
        for w in info["weights"]
    ]
    parts.append(
        table(
            sections.Table(
                f"{len(info['weights'])} weights ({size(info['weight_bytes'])})",
                ["weight", "op", "shape", "dtype", "where"],
                rows,
                ("weight", "op", "shape", "dtype", "where"),
            )
        )
    )
    if info["skipped"]:
        parts.append(
            Text(
                f"left as they are: {', '.join(s['name'] + ' (' + s['reason'] + ')' for s in info['skipped'][:8])}"
                + (" ..." if len(info["skipped"]) > 8 else "")
            )
        )
    rows = [
        [e["method"], str(e["bits"]), e["granularity"], size(e["bytes"]), f"{100 * e['ratio']:.1f}"]
        for e in info["estimates"]
    ]
    parts.append(
        table(
            sections.Table(
                "Estimated file size",
                ["method", "bits", "granularity", "size", "% of now"],
                rows,
                ("method", "granularity"),
            )
        )
    )
    return Group(*parts)


def batch_summary(outcomes: list[Any]) -> Table:
    """One row per model of a batch run (outcomes from qconvert.batch)."""
    view = Table(title=f"{len(outcomes)} models", title_justify="left")
    for column in ("model", "result", "size", "worst output SNR dB"):
        view.add_column(column, justify="left" if column in ("model", "result") else "right", overflow="fold")
    for o in outcomes:
        result = (
            Text("ok", style="green") if o.exit_code == 0 else Text(f"exit {o.exit_code}: {o.message}", style="red")
        )
        sizes = f"{size(o.input_bytes)} -> {size(o.output_bytes)}" if o.report_json else "-"
        view.add_row(str(o.model), result, sizes, "-" if o.snr_db is None else f"{o.snr_db:.2f}")
    return view
