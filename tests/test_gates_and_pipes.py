"""Quality gates and Unix pipes: what a deployment build relies on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner

from qconvert.cli import cli
from qconvert.errors import ExitCode

from conftest import ROOT, conv_model, save


def invoke(*args: object) -> click.testing.Result:  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_failed_gate_exits_5_and_writes_no_model(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    out = tmp_path / "q.onnx"
    result = invoke(
        "kmeans", digits, "--bits", "4", "--data", digits_data, "--min-snr", "60", "--min-top1", "0.9", "-o", out, "-q"
    )
    assert result.exit_code == ExitCode.GATE
    assert re.match(r"qconvert: error: quality gate failed: --min-snr on logits: \d+\.\d+, limit 60$", result.stderr)
    assert result.stderr.strip().count("\n") == 0
    assert not out.exists()
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["output"]["path"] is None and report["gates"]["passed"] is False
    checks = {c["gate"]: c for c in report["gates"]["checks"]}
    assert checks["--min-snr"]["passed"] is False and checks["--min-snr"]["limit"] == 60
    assert checks["--min-top1"]["passed"] is True


def test_keep_failed_writes_the_model_but_still_fails(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    out = tmp_path / "q.onnx"
    result = invoke(
        "kmeans", digits, "--bits", "2", "--data", digits_data, "--max-abs-error", "0.01", "--keep-failed", "-o", out
    )
    assert result.exit_code == ExitCode.GATE
    assert out.exists()


def test_accuracy_gate_with_labels(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    out = tmp_path / "q.onnx"
    assert (
        invoke("kmeans", digits, "--bits", "4", "--data", digits_data, "--max-accuracy-drop", "1", "-o", out).exit_code
        == 0
    )
    with np.load(digits_data) as data:
        np.savez(tmp_path / "inputs.npz", input=data["input"])
        np.save(tmp_path / "labels.npy", data["labels"])
        np.save(tmp_path / "short.npy", data["labels"][:10])
    result = invoke(
        "kmeans",
        digits,
        "--bits",
        "4",
        "--data",
        tmp_path / "inputs.npz",
        "--labels",
        tmp_path / "labels.npy",
        "--max-accuracy-drop",
        "1",
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["accuracy"]["float_top1"] > 0.97
    result = invoke(
        "kmeans",
        digits,
        "--bits",
        "4",
        "--data",
        tmp_path / "inputs.npz",
        "--labels",
        tmp_path / "short.npy",
        "-o",
        out,
    )
    assert result.exit_code == ExitCode.INPUT and "10 labels for 360 samples" in result.stderr


def test_gates_that_cannot_be_measured_are_usage_errors(tmp_path: Path, digits: Path) -> None:
    model = save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    cases = [
        (["kmeans", model, "--bits", "4", "--min-top1", "0.9"], "no output holds class scores"),
        (["kmeans", digits, "--bits", "4", "--max-accuracy-drop", "1", "-o", tmp_path / "q.onnx"], "needs labels"),
        (["kmeans", model, "--bits", "4", "--min-snr", "20", "--no-validate"], "need validation"),
        (["kmeans", model, "--bits", "4", "-o", "-", "--json"], "--json cannot"),
        (["kmeans", "-", "--bits", "4"], "needs -o"),
    ]
    for args, words in cases:
        result = invoke(*args)
        assert result.exit_code == ExitCode.USAGE, (args, result.output)
        assert words in result.stderr


CHECK_STDIN = (
    "import sys, numpy as np, onnx, onnxruntime as ort; data = sys.stdin.buffer.read(); "
    "onnx.checker.check_model(onnx.load_from_string(data), full_check=True); "
    "s = ort.InferenceSession(data, providers=['CPUExecutionProvider']); "
    "print(s.run(None, {'x': np.ones((1, 16, 8, 8), np.float32)})[0].shape)"
)


def test_shell_pipeline_through_stdin_and_stdout(tmp_path: Path) -> None:
    model = save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    command = (
        f"cat {model} | {sys.executable} -m qconvert kmeans - --bits 4 -o - -q --report {tmp_path}/r.json "
        f'| {sys.executable} -c "{CHECK_STDIN}"'
    )
    done = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 32, 8, 8)"  # the piped bytes are a valid, runnable model
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input"]["path"] == "-" and report["output"]["path"] == "-"
    assert report["validation"]["outputs"][0]["snr_db"] > 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]  # nothing else written


def test_inspect_lists_weights_and_estimates(tmp_path: Path, digits: Path) -> None:
    result = invoke("inspect", digits, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["opset"] == 13 and info["inputs"][0] == {
        "name": "input",
        "dtype": "float32",
        "shape": ["batch", 1, 8, 8],
    }
    assert [w["name"] for w in info["weights"]] == ["conv2.weight", "conv3.weight", "fc1.weight"]
    # The conversions' own size model: within 2 % of what they write, linear per channel included.
    for method, bits, granularity, flags in (
        ("kmeans", 4, "per-tensor", ["--per-tensor", "--no-fold-batchnorm"]),
        ("kmeans", 2, "per-tensor", ["--per-tensor", "--no-fold-batchnorm"]),
        ("linear", 8, "per-channel", ["--min-elements", "1024", "--no-fold-batchnorm"]),
        ("linear", 4, "per-tensor", ["--per-tensor", "--min-elements", "1024", "--no-fold-batchnorm"]),
    ):
        estimate = next(
            e for e in info["estimates"] if (e["method"], e["bits"], e["granularity"]) == (method, bits, granularity)
        )
        actual = invoke(method, digits, "--bits", bits, *flags, "--no-validate", "--json", "-o", tmp_path / "q.onnx")
        assert abs(estimate["bytes"] - json.loads(actual.stdout)["output"]["bytes"]) < 0.02 * estimate["bytes"], method


def test_compare_applies_the_same_metrics_and_gates(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    converted = tmp_path / "q.onnx"
    assert invoke("kmeans", digits, "--bits", "2", "-o", converted, "--no-validate").exit_code == 0
    result = invoke(
        "compare", digits, converted, "--data", digits_data, "--json", "--report-md", tmp_path / "summary.md"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "compare" and report["validation"]["accuracy"]["float_top1"] > 0.97
    assert "| logits |" in (tmp_path / "summary.md").read_text()
    failed = invoke("compare", digits, converted, "--data", digits_data, "--min-snr", "40", "-q")
    assert failed.exit_code == ExitCode.GATE and "--min-snr on logits" in failed.stderr


def test_special_output_files_are_written_in_place(tmp_path: Path, digits: Path) -> None:
    """-o to a FIFO (or /dev/null) writes through it; a rename would have replaced the device."""
    import os
    import stat
    import threading

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(fifo.read_bytes()))
    reader.start()
    result = invoke("kmeans", digits, "--bits", "4", "--no-validate", "-o", fifo, "-q")
    reader.join(timeout=30)
    assert result.exit_code == 0, result.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    onnx.checker.check_model(onnx.load_from_string(bytes(received)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]  # no report beside a special file


def test_batch_converts_a_directory_with_the_worst_exit_code(tmp_path: Path, digits: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.onnx").write_bytes(digits.read_bytes())
    save(conv_model(cin=16, cout=32), models / "b.onnx")
    (models / "c.onnx").write_bytes(b"junk")
    out = tmp_path / "out"
    result = invoke("kmeans", models, "--bits", "4", "-o", out, "--json")
    assert result.exit_code == ExitCode.INPUT
    assert "1 of 3 models failed" in result.stderr
    reports = json.loads(result.stdout)
    assert [r["input"]["path"] for r in reports] == [str(models / n) for n in ("a.onnx", "b.onnx", "c.onnx")]
    assert reports[2]["exit_code"] == ExitCode.INPUT
    assert sorted(p.name for p in out.iterdir()) == [
        "a.kmeans4.onnx",
        "a.kmeans4.report.json",
        "b.kmeans4.onnx",
        "b.kmeans4.report.json",
    ]
    # the same bytes as converting one model alone, in this process
    assert invoke("kmeans", models / "a.onnx", "--bits", "4", "-o", tmp_path / "alone.onnx", "-q").exit_code == 0
    assert (tmp_path / "alone.onnx").read_bytes() == (out / "a.kmeans4.onnx").read_bytes()
    # A build that runs twice: the output folder exists now, and the same outputs come again.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".onnx"}
    assert invoke("kmeans", models / "a.onnx", models / "b.onnx", "--bits", "4", "-o", out, "-q").exit_code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.suffix == ".onnx"} == before


def test_one_model_into_an_existing_folder(tmp_path: Path, digits: Path) -> None:
    result = invoke("kmeans", digits, "--bits", "4", "-o", tmp_path, "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits_cnn.kmeans4.onnx", "digits_cnn.kmeans4.report.json"]
    result = invoke("kmeans", digits, digits, "--bits", "4", "-o", tmp_path / "digits_cnn.kmeans4.onnx")
    assert result.exit_code == ExitCode.USAGE and "is a file" in result.stderr


def test_compare_takes_no_keep_failed(tmp_path: Path, digits: Path) -> None:
    """compare writes no model, so --keep-failed would be accepted and ignored: it is not an option there."""
    result = invoke("compare", digits, digits, "--keep-failed")
    assert result.exit_code == ExitCode.USAGE and "--keep-failed" in result.stderr


def test_logs_get_whole_weight_names(tmp_path: Path) -> None:
    """stderr that is not a terminal (a CI log): tables are not cut at 80 columns, names are never shortened."""
    name = "backbone.stage4.block17.depthwise_separable.pointwise_convolution.weight_with_a_long_exported_name"
    model = conv_model(cin=64, cout=64)
    model.graph.initializer[1].name = model.graph.node[0].input[1] = name
    save(model, tmp_path / "m.onnx")
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "2", "-o", tmp_path / "q.onnx")
    assert result.exit_code == 0, result.output
    assert name in result.stderr


def test_batch_needs_an_output_directory(tmp_path: Path, digits: Path) -> None:
    result = invoke("kmeans", digits, digits, "--bits", "4")
    assert result.exit_code == ExitCode.USAGE and "-o DIR" in result.stderr


def test_html_report_is_self_contained_with_pictures(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    page = tmp_path / "r.html"
    result = invoke(
        "kmeans",
        digits,
        "--bits",
        "3",
        "--per-channel",
        "--max-codebook-overhead",
        "inf",
        "--data",
        digits_data,
        "--min-snr",
        "10",
        "-o",
        tmp_path / "q.onnx",
        "--report-html",
        page,
        "-q",
    )
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "<script" not in text and "http" not in text  # nothing fetched: it opens offline
    assert text.count("<figure>") == 3  # the three layers (largest = worst here), each once
    assert text.count("stroke='#d1495b'") == 3 * 8  # 8 centroids drawn over each histogram
    assert "levels of channel" in text and "gates passed" in text and "conv3.weight" in text


CONFIG = """
bits = 2
per-channel = true
min-snr = 5
exclude = ["fc1.*"]

[[layer]]
match = "conv3.*"
bits = 6
granularity = "per-tensor"

[[layer]]
match = "conv2.weight"
skip = true
"""


def test_config_file_options_and_layer_overrides(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    (tmp_path / "qconvert.toml").write_text(CONFIG)
    result = invoke(
        "kmeans",
        digits,
        "--config",
        tmp_path / "qconvert.toml",
        "--data",
        digits_data,
        "-o",
        tmp_path / "q.onnx",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["bits"] == 2 and report["options"]["granularity"] == "per-channel"
    assert [(w["name"], w["bits"], w["granularity"]) for w in report["per_weight"]] == [
        ("conv3.weight", 6, "per-tensor")
    ]
    reasons = {s["name"]: s["reason"] for s in report["skipped"]}
    assert reasons["conv2.weight"] == "skipped by a layer override" and "exclude" in reasons["fc1.weight"]
    assert report["gates"]["checks"][0]["limit"] == 5
    # the command line wins over the file
    result = invoke(
        "kmeans",
        digits,
        "--config",
        tmp_path / "qconvert.toml",
        "--bits",
        "3",
        "--per-tensor",
        "-o",
        tmp_path / "q.onnx",
        "--json",
    )
    assert (
        json.loads(result.stdout)["options"]["bits"] == 3
        and json.loads(result.stdout)["options"]["granularity"] == "per-tensor"
    )


def test_mixed_bit_widths_store_each_at_its_width(tmp_path: Path, digits: Path) -> None:
    (tmp_path / "mixed.toml").write_text(
        'bits = 4\n[[layer]]\nmatch = "fc1.weight"\nbits = 2\n[[layer]]\nmatch = "conv2.weight"\nbits = 8\n'
    )
    out = tmp_path / "q.onnx"
    result = invoke("kmeans", digits, "--config", tmp_path / "mixed.toml", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["opset"]["after"] == 25 and report["opset"]["storage"] == "uint2, uint4, uint8"
    types = {t.name: t.data_type for t in onnx.load(str(out)).graph.initializer if t.name.endswith("_indices")}
    assert types == {
        "conv2.weight_qc_indices": onnx.TensorProto.UINT8,
        "conv3.weight_qc_indices": onnx.TensorProto.UINT4,
        "fc1.weight_qc_indices": onnx.TensorProto.UINT2,
    }


def test_bad_config_files(tmp_path: Path, digits: Path) -> None:
    cases = {
        "unknown = 1\n": (ExitCode.USAGE, "'unknown' is not an option of qconvert kmeans"),
        "[[layer]]\nbits = 2\n": (ExitCode.USAGE, "needs match"),
        "[[layer]]\nmatch = 'x'\ncolour = 'red'\n": (ExitCode.USAGE, "unknown keys ['colour']"),
        "[[layer]]\nmatch = 'x'\nmethod = 'magic'\n": (
            ExitCode.USAGE,
            "method must be one of kmeans, linear, float, got 'magic'",
        ),
        "bits = = 2\n": (ExitCode.INPUT, "not a readable TOML file"),
    }
    for text, (code, words) in cases.items():
        (tmp_path / "c.toml").write_text(text)
        result = invoke("kmeans", digits, "--bits", "4", "--config", tmp_path / "c.toml", "-o", tmp_path / "q.onnx")
        assert result.exit_code == code, (text, result.output)
        assert words in result.stderr


def test_hybrid_kmeans_with_linear_layers(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    (tmp_path / "hybrid.toml").write_text(
        'bits = 3\n[[layer]]\nmatch = "fc1.weight"\nmethod = "linear"\nbits = 4\ngranularity = "per-channel"\n'
    )
    out = tmp_path / "q.onnx"
    result = invoke("kmeans", digits, "--config", tmp_path / "hybrid.toml", "--data", digits_data, "-o", out, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fc1 = next(w for w in report["per_weight"] if w["name"] == "fc1.weight")
    assert fc1["bits"] == 4 and fc1["granularity"] == "per-channel" and "linear" in fc1["note"]
    assert report["opset"]["after"] == 21 and report["opset"]["storage"] == "int4, packed"
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("DequantizeLinear") == 1 and ops.count("Gather") == 2
    assert report["validation"]["accuracy"]["quantized_top1"] > 0.95


def test_inputs_that_do_not_exercise_the_model_fail_gates_and_warn_otherwise(tmp_path: Path) -> None:
    """Symbolic image sizes default to 1; here every output is 0 whatever the weights: validation
    measures nothing, so gates (and auto's target) cannot pass on it."""
    model = conv_model()
    next(t for t in model.graph.initializer if t.name == "b").CopyFrom(
        onnx.numpy_helper.from_array(np.full(16, -100, np.float32), "b")
    )
    for value in (*model.graph.input, *model.graph.output):
        for dim, name in zip(value.type.tensor_type.shape.dim[2:], ("h", "w")):
            dim.dim_param = name
    path = save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = invoke("kmeans", path, "--bits", "4", "--min-snr", "30", "-o", out, "-q")
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "symbolic sizes set to 1: x 1x8x1x1" in result.stderr and "--input-shape" in result.stderr
    assert not out.exists()
    result = invoke("kmeans", path, "--bits", "4", "-o", out, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    assert any("do not exercise the model" in w for w in json.loads(result.stdout)["warnings"])
    result = invoke("kmeans", path, "--bits", "4", "--input-shape", "x=1x8x8x8", "-o", out, "--json")
    assert json.loads(result.stdout)["validation"]["source"] == "random (seed 0)"
