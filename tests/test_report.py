"""The JSON report's shape is a contract: a golden list of key paths guards it (bump schema_version)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from qconvert.cli import cli
from qconvert.report import SCHEMA_VERSION

GOLDEN = Path(__file__).parent / "golden" / "report_keys.json"


def key_paths(value: object, prefix: str = "") -> set[str]:
    """{'a': {'b': 1}, 'c': [{'d': 2}]} -> {'a', 'a.b', 'c', 'c[].d'}."""
    paths = set()
    if isinstance(value, dict):
        for key, child in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths |= {path} | key_paths(child, path)
    elif isinstance(value, list):
        for child in value:
            paths |= key_paths(child, f"{prefix}[]")
    return paths


def report_args(samples: Path, folder: Path) -> list[str]:
    """A run whose report has every section: validation with labels, gates, calibration, folding."""
    return [
        "kmeans",
        str(samples / "digits_cnn.onnx"),
        "--bits",
        "4",
        "--per-channel",
        "--data",
        str(samples / "digits_test.npz"),
        "--min-snr",
        "10",
        "--metric",
        "top5",
        "--max-metric-drop",
        "5",
        "-o",
        str(folder / "q.onnx"),
        "--json",
    ]


def test_report_keys_match_the_golden_schema(tmp_path: Path, digits: Path) -> None:
    """After a deliberate change: bump SCHEMA_VERSION, then `python tests/golden/regenerate.py`."""
    result = CliRunner().invoke(cli, report_args(digits.parent, tmp_path))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["schema_version"] == SCHEMA_VERSION
    golden = json.loads(GOLDEN.read_text())
    assert golden["schema_version"] == SCHEMA_VERSION
    assert sorted(key_paths(report)) == golden["keys"]


def test_latency_at_one_and_two_threads_from_alternating_runs(tmp_path: Path, digits: Path) -> None:
    """Both models timed side by side at 1 and 2 threads: four medians, the summary line says each ratio."""
    args = ["kmeans", str(digits), "--bits", "4", "-o", str(tmp_path / "q.onnx")]
    report = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    latency = report["latency_ms"]
    assert set(latency) == {"float", "converted", "float_2t", "converted_2t", "runs"} and latency["runs"] == 10
    assert all(value > 0 for value in latency.values())
    summary = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "r.onnx")]).output
    assert "onnxruntime latency, 1 thread: float" in summary and "2 threads:" in summary


def test_time_by_op_shows_the_integer_kernels_and_the_transitions(tmp_path: Path, digits: Path) -> None:
    """Full QDQ of the digits CNN: onnxruntime's profiler finds float Conv in the input and QLinearConv in the
    output, and the Quantize/DequantizeLinear kernels between integer and float parts; the summary says so."""
    data = str(digits.parent / "digits_test.npz")
    args = ["linear", str(digits), "--calibration", data, "--data", data, "-o", str(tmp_path / "q.onnx")]
    report = json.loads(CliRunner().invoke(cli, [*args, "--json"]).stdout)
    profile = report["time_by_op"]
    assert "Conv" in {t["op"] for t in profile["float"]} and "QLinearConv" in {t["op"] for t in profile["converted"]}
    assert profile["transitions_per_run"] >= 2 and all(t["ms"] >= 0 for t in profile["converted"])
    summary = CliRunner().invoke(cli, [*args[:-1], str(tmp_path / "r.onnx")]).output
    assert "time by op, ms per run at 1 thread: float" in summary and "QLinearConv" in summary
