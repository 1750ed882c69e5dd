"""The Markdown summary: the report's sections as a CI job summary."""

from __future__ import annotations

from qconvert.render import sections
from qconvert.report import Report

WORST_LISTED = 10


def markdown(report: Report) -> str:
    source, target, sizes = sections.headline(report)
    lines = [
        f"### qconvert {report.method}: {'passed' if report.passed else 'FAILED'}",
        "",
        f"`{source}` -> `{target}`: **{sizes}**, {sections.storage_line(report)}",
        "",
    ]
    if report.opset.note:
        lines += [report.opset.note, ""]
    for data in (sections.outputs(report), sections.gates(report)):
        lines += table(data)
    lines += [f"{line}  " for line in sections.notes(report)] + ([""] if sections.notes(report) else [])
    if isinstance(plan := report.details.get("auto"), dict):
        lines += [f"auto: {sections.auto_steps(plan)}", ""]
    lines += table(sections.worst_weights(report, WORST_LISTED))
    lines += [f"- warning: {w}" for w in report.warnings]
    return "\n".join(lines).rstrip() + "\n"


def table(data: sections.Table | None) -> list[str]:
    if data is None:
        return []
    columns = [*data.columns, *(["result"] if data.passed is not None else [])]
    rows = [
        [*row, *([] if data.passed is None else ["pass" if data.passed[i] else "**FAIL**"])]
        for i, row in enumerate(data.rows)
    ]
    align = ["---:" if c in data.columns and c not in data.text else "---" for c in columns]
    return [f"**{data.title}**", "", _row(columns), "|" + "|".join(align) + "|", *map(_row, rows), ""]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"
