"""The view of `qconvert debug`: the tensors whose error jumps, in the terminal and as an HTML page with the
SNR along the depth of the model."""

from __future__ import annotations

import html
from typing import Any

from rich.console import Group
from rich.text import Text

from qconvert.drift import DebugReport
from qconvert.render import sections
from qconvert.render.terminal import table

COLUMNS = ["tensor", "op", "input SNR dB", "SNR dB", "weight error alone dB", "input error alone dB", "cause"]


def jumps(report: DebugReport) -> sections.Table:
    rows = [
        [
            j.tensor,
            j.op_type,
            *(sections.db(v, 1) for v in (j.input_snr_db, j.snr_db, j.weight_error_snr_db, j.input_error_snr_db)),
            j.cause,
        ]
        for j in report.jumps
    ]
    return sections.Table(
        "Where the error jumps (the nodes that add the most noise)", COLUMNS, rows, ("tensor", "op", "cause")
    )


def terminal(report: DebugReport) -> Group:
    last = report.tensors[-1] if report.tensors else None
    parts: list[Any] = [
        Text(
            f"{report.converted_path} vs {report.float_path}: {len(report.tensors)} tensors matched "
            f"({report.unmatched} not), {report.samples} samples ({report.source})"
        ),
    ]
    if last is not None:
        parts.append(Text(f"last tensor {last.name}: {sections.db(last.snr_db, 1)} dB"))
    parts.append(table(jumps(report)))
    return Group(*parts)


def page(report: DebugReport, width: int = 900, height: int = 260) -> str:
    """SNR along the graph (an SVG line, jumps marked) and the table of jumps."""
    # x: the tensor's rank in graph order (node positions would leave room for Constant nodes)
    points = [(i, t.snr_db) for i, t in enumerate(report.tensors) if t.snr_db is not None and t.snr_db > -1e9]
    top = max((s for _, s in points), default=1.0)
    bottom = min((s for _, s in points), default=0.0)
    span, last = (top - bottom) or 1.0, max((p for p, _ in points), default=1) or 1

    def xy(position: int, snr: float) -> str:
        return f"{position / last * width:.1f},{height - (snr - bottom) / span * height:.1f}"

    line = " ".join(xy(p, s) for p, s in points)
    positions = {t.name: (i, t.snr_db) for i, t in enumerate(report.tensors) if t.snr_db is not None}
    marks = "".join(
        f"<circle cx='{xy(*positions[j.tensor]).split(',')[0]}' cy='{xy(*positions[j.tensor]).split(',')[1]}' "
        "r='4' fill='#d1495b'/>"
        for j in report.jumps
        if j.tensor in positions
    )
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in jumps(report).rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>qconvert debug</title><style>"
        "body{font:14px system-ui,sans-serif;margin:24px} td,th{padding:3px 10px;border-bottom:1px solid #eee}"
        f"</style></head><body><h1>{html.escape(report.converted_path)} vs {html.escape(report.float_path)}</h1>"
        f"<p>SNR (dB) of each tensor against float, along the graph ({bottom:.1f} to {top:.1f} dB); red: the jumps</p>"
        f"<svg width='{width}' height='{height}'><polyline fill='none' stroke='#4c956c' points='{line}'/>{marks}</svg>"
        f"<table><tr>{head}</tr>{rows}</table></body></html>"
    )
