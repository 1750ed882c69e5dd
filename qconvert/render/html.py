"""The HTML report: one self-contained page (inline SVG, no scripts) with the pictures people look at."""

from __future__ import annotations

import html
import math

from qconvert.render import sections
from qconvert.report import Histogram, Report, WeightReport

SHOWN = 3  # largest and worst layers drawn
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1040px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px;border-bottom:1px solid #ddd}
.muted{color:#666} .pass{color:#16794a;font-weight:600} .fail{color:#b3261e;font-weight:600}
table{border-collapse:collapse;margin:6px 0} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:first-child,th:first-child,.l{text-align:left} .grid{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;border:1px solid #e4e4e4;border-radius:6px;padding:8px;width:300px}
figcaption{font-size:12px;color:#444}
"""


def render(report: Report) -> str:
    title = f"qconvert {report.method}: {html.escape(report.input_path)}"
    verdict = '<span class="pass">gates passed</span>' if report.passed else '<span class="fail">a gate FAILED</span>'
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<div class='muted'>{html.escape(str(report.output_path or '(not written)'))} &middot; "
        f"{100 * report.size_ratio:.1f} % of the input size &middot; "
        f"opset {report.opset.before} &rarr; {report.opset.after}, "
        f"stored as {html.escape(report.opset.storage)}{' &middot; ' + verdict if report.gates else ''}</div>",
        "<h2>Size</h2>",
        _size_bars(report),
    ]
    if report.validation:
        parts += ["<h2>Outputs against the float model</h2>", _outputs_table(report)]
    if report.weights:
        parts += ["<h2>Quantization error per layer (SNR, higher is better)</h2>", _snr_bars(report.weights)]
    figures = _chosen(report)
    if figures:
        parts += ["<h2>Weight distributions, with the levels they were mapped to</h2><div class='grid'>"]
        parts += [_histogram(h, why) for h, why in figures]
        parts.append("</div>")
    for warning in report.warnings:
        parts.append(f"<p class='muted'>warning: {html.escape(warning)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _chosen(report: Report) -> list[tuple[Histogram, str]]:
    """The largest and the worst layers (each drawn once)."""
    by_name = {h.name: h for h in report.histograms}
    largest = sorted(report.weights, key=lambda w: -w.float_bytes)[:SHOWN]
    worst = sorted(report.weights, key=lambda w: math.inf if w.snr_db is None else w.snr_db)[:SHOWN]
    chosen: list[tuple[Histogram, str]] = []
    for w, why in [*((w, "largest") for w in largest), *((w, "worst SNR") for w in worst)]:
        if w.name in by_name and all(h.name != w.name for h, _ in chosen):
            chosen.append(
                (by_name[w.name], f"{why}: {w.name} ({'x'.join(map(str, w.shape))}, {sections.db(w.snr_db, 1)} dB)")
            )
    return chosen


def _histogram(h: Histogram, caption: str, width: int = 300, height: int = 150) -> str:
    # the axis spans the values and every level (a refitted codebook may put one beyond the values)
    lo, hi = min(h.edges[0], *h.levels), max(h.edges[-1], *h.levels)
    span = (hi - lo) or 1.0
    top = max(h.counts) or 1
    bar = (h.edges[-1] - h.edges[0]) / span * width / len(h.counts)
    start = (h.edges[0] - lo) / span * width
    rects = "".join(
        f"<rect x='{start + i * bar:.1f}' y='{height - height * c / top:.1f}' width='{max(bar - 0.5, 0.5):.1f}' "
        f"height='{height * c / top:.1f}' fill='#7aa6d6'/>"
        for i, c in enumerate(h.counts)
    )
    dense = len(h.levels) > 40
    lines = "".join(
        f"<line x1='{(v - lo) / span * width:.1f}' x2='{(v - lo) / span * width:.1f}' y1='0' y2='{height}' "
        f"stroke='{'#999' if dense else '#d1495b'}' stroke-width='{0.6 if dense else 1.4}'/>"
        for v in h.levels
    )
    axis = (
        f"<text x='0' y='{height + 14}' font-size='10'>{lo:.3g}</text>"
        f"<text x='{width}' y='{height + 14}' font-size='10' text-anchor='end'>{hi:.3g}</text>"
    )
    levels = f"{len(h.levels)} levels" + (f" of {h.levels_of}" if h.levels_of else "")
    return (
        f"<figure><svg width='{width}' height='{height + 18}' role='img' aria-label='{html.escape(h.name)}'>"
        f"{rects}{lines}{axis}</svg><figcaption>{html.escape(caption)} &middot; {levels}</figcaption></figure>"
    )


def _snr_bars(weights: list[WeightReport], width: int = 620, row: int = 14, limit: int = 40) -> str:
    shown = sorted(weights, key=lambda w: math.inf if w.snr_db is None else w.snr_db)[:limit]
    finite = [w.snr_db for w in shown if w.snr_db is not None]
    top = max([*finite, 1.0])
    label = 260
    rows = []
    for i, w in enumerate(shown):
        value = top if w.snr_db is None else max(w.snr_db, 0.0)
        length = (width - label - 60) * value / top
        rows.append(
            f"<text x='{label - 6}' y='{i * row + 11}' font-size='11' text-anchor='end'>"
            f"{html.escape(w.name[-40:])}</text>"
            f"<rect x='{label}' y='{i * row + 2}' width='{length:.1f}' height='{row - 4}' fill='#e08e45'/>"
            f"<text x='{label + length + 4:.1f}' y='{i * row + 11}' font-size='11'>{sections.db(w.snr_db, 1)}</text>"
        )
    more = (
        f"<div class='muted'>{len(weights) - limit} more layers in the JSON report</div>"
        if len(weights) > limit
        else ""
    )
    return f"<svg width='{width}' height='{len(shown) * row + 4}'>{''.join(rows)}</svg>{more}"


def _size_bars(report: Report, width: int = 620) -> str:
    float_bytes = sum(w.float_bytes for w in report.weights)
    stored = sum(w.stored_bytes for w in report.weights)
    pairs = [("model file", report.input_bytes, report.output_bytes)]
    if report.weights:
        pairs.append(("converted weights", float_bytes, stored))
    top = max(max(a, b) for _, a, b in pairs) or 1
    rows = []
    for i, (name, before, after) in enumerate(pairs):
        y = i * 46
        rows.append(
            f"<text x='0' y='{y + 12}' font-size='12'>{name}</text>"
            f"<rect x='130' y='{y}' width='{(width - 260) * before / top:.1f}' height='16' fill='#bbb'/>"
            f"<text x='{136 + (width - 260) * before / top:.1f}' y='{y + 12}' font-size='11'>{_bytes(before)}</text>"
            f"<rect x='130' y='{y + 20}' width='{(width - 260) * after / top:.1f}' height='16' fill='#4c956c'/>"
            f"<text x='{136 + (width - 260) * after / top:.1f}' y='{y + 32}' font-size='11'>{_bytes(after)} "
            f"({100 * after / before if before else 0:.1f} %)</text>"
        )
    return f"<svg width='{width}' height='{len(pairs) * 46}'>{''.join(rows)}</svg>"


def _outputs_table(report: Report) -> str:
    assert report.validation is not None
    outputs = sections.outputs(report)
    assert outputs is not None
    parts = [f"<div class='muted'>{html.escape(outputs.title)}</div>", table(outputs)]
    parts += [f"<p>{html.escape(line)}</p>" for line in sections.notes(report)[:1] if line.startswith("accuracy")]
    gates = sections.gates(report)
    return "".join(parts) + (table(gates) if gates else "")


def table(data: sections.Table) -> str:
    """A section's table: text columns left, numbers right; rows of checks end in pass / FAIL."""
    left = [column in data.text for column in data.columns]
    head = "".join(
        f"<th{' class=l' if is_text else ''}>{html.escape(c)}</th>" for c, is_text in zip(data.columns, left)
    )
    head += "<th></th>" if data.passed is not None else ""
    rows = []
    for i, row in enumerate(data.rows):
        cells = "".join(
            f"<td{' class=l' if is_text else ''}>{html.escape(cell)}</td>" for cell, is_text in zip(row, left)
        )
        if data.passed is not None:
            cells += f"<td class='{'pass' if data.passed[i] else 'fail'}'>{'pass' if data.passed[i] else 'FAIL'}</td>"
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _bytes(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"
