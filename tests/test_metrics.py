"""Task metrics: built-ins, the user's own functions, in gates and in the report; bad metrics fail cleanly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert.cli import cli
from qconvert.errors import ExitCode
from qconvert.metrics import MetricError, resolve

CHARACTERS = list("abcdefgh")


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def recognizer(path: Path, scale: float) -> Path:
    """x [N, 12, 10] -> Softmax(scale * x): a stand-in CTC recognizer (class 0 the blank, then a..h, space)
    carrying its character list as PaddleOCR models do. A negative scale reads every line wrong."""
    factor = numpy_helper.from_array(np.array(scale, np.float32), "scale")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["logits"]), helper.make_node("Softmax", ["logits"], ["y"], axis=-1)],
        "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12, 10])],
        [factor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    helper.set_model_props(model, {"character": "\n".join(CHARACTERS)})
    onnx.save(model, str(path))
    return path


def text_data(folder: Path) -> tuple[Path, Path]:
    """Inputs whose greedy decoding spells known strings, and those strings as JSON labels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 12, 10)).astype(np.float32)
    best = x.argmax(axis=2)
    words = [
        "".join(([" "] + CHARACTERS + [" "])[c] for i, c in enumerate(r) if c and (i == 0 or c != r[i - 1]))
        for r in best
    ]
    np.savez(folder / "lines.npz", x=x)
    (folder / "strings.json").write_text(json.dumps(words))
    return folder / "lines.npz", folder / "strings.json"


def test_ctc_exact_gate_passes_and_fails(tmp_path: Path) -> None:
    reference = recognizer(tmp_path / "float.onnx", 1.0)
    data, labels = text_data(tmp_path)
    same = recognizer(tmp_path / "same.onnx", 3.0)  # other probabilities, the same best classes
    wrong = recognizer(tmp_path / "wrong.onnx", -1.0)
    gate = ["--data", data, "--labels", labels, "--metric", "ctc-exact", "--max-metric-drop", "1", "--json"]
    passed = invoke("compare", reference, same, *gate)
    assert passed.exit_code == 0, passed.output
    metric = json.loads(passed.stdout)["validation"]["metric"]
    assert metric == {"name": "ctc-exact", "float_value": 100.0, "converted_value": 100.0}
    failed = invoke("compare", reference, wrong, *gate)
    assert failed.exit_code == ExitCode.GATE and "--max-metric-drop on ctc-exact: 100, limit 1" in failed.stderr
    chars = invoke("compare", reference, wrong, "--data", data, "--labels", labels, "--metric", "ctc-char", "--json")
    assert json.loads(chars.stdout)["validation"]["metric"]["converted_value"] < 50


def test_top1_and_iou_built_ins(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    result = invoke(
        "kmeans",
        digits,
        "--bits",
        "4",
        "--data",
        digits_data,
        "--metric",
        "top1",
        "--max-metric-drop",
        "2",
        "-o",
        tmp_path / "q.onnx",
        "--json",
    )
    assert result.exit_code == 0, result.output
    validation = json.loads(result.stdout)["validation"]
    assert validation["metric"]["float_value"] == pytest.approx(100 * validation["accuracy"]["float_top1"])
    assert validation["metric"]["converted_value"] == pytest.approx(100 * validation["accuracy"]["quantized_top1"])
    iou = resolve("iou@0.5")
    maps = [np.array([[0.9, 0.9, 0.1, 0.6]])]
    assert iou(maps, None, maps) == 100.0
    assert iou([np.array([[0.9, 0.1, 0.1, 0.6]])], None, maps) == pytest.approx(100 * 2 / 3)
    assert iou(maps, np.array([[1, 0, 0, 0]]), maps) == pytest.approx(100 / 3)


def test_user_metrics_and_their_failures(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "import numpy as np\n"
        "def share(outputs, labels):\n    return 100.0 * float(np.mean(outputs[0].argmax(1) == labels))\n"
        "def broken(outputs, labels):\n    raise KeyError('scores')\n"
        "def words(outputs, labels):\n    return 'high'\n"
    )
    base = ["kmeans", digits, "--bits", "4", "--data", digits_data, "-o", tmp_path / "q.onnx"]
    result = invoke(*base, "--metric", f"{tmp_path / 'mine.py'}:share", "--max-metric-drop", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["metric"]["float_value"] > 90
    (tmp_path / "q.onnx").unlink()
    cases = {
        "nowhere_module:score": "cannot import it: ModuleNotFoundError",
        f"{tmp_path / 'mine.py'}:absent": "cannot import it: AttributeError",
        f"{tmp_path / 'mine.py'}:broken": "KeyError: 'scores'",
        f"{tmp_path / 'mine.py'}:words": "returned str, not a number",
        "iou@high": "iou@T takes a number",
    }
    for spec, words in cases.items():
        result = invoke(*base, "--metric", spec)
        assert result.exit_code == ExitCode.USAGE, (spec, result.output)
        assert f"metric {spec}" in result.stderr and words in result.stderr and result.stderr.count("\n") == 1
        assert not (tmp_path / "q.onnx").exists()
    result = invoke(*base, "--max-metric-drop", "1")
    assert result.exit_code == ExitCode.USAGE and "needs a task metric" in result.stderr
    result = invoke("kmeans", digits, "--bits", "4", "--metric", "top1", "-o", tmp_path / "q.onnx")  # random inputs
    assert result.exit_code == ExitCode.USAGE and "metric top1: needs labels" in result.stderr


def test_the_api_takes_callables_and_any_labels(tmp_path: Path) -> None:
    reference = recognizer(tmp_path / "float.onnx", 1.0)
    data, labels = text_data(tmp_path)
    strings = json.loads(labels.read_text())
    with np.load(data) as npz:
        x = npz["x"]

    def lengths(outputs: list[np.ndarray], words: list[str]) -> float:
        return float(sum(len(w) for w in words))

    report = qconvert.compare(
        reference,
        recognizer(tmp_path / "same.onnx", 2.0),
        data={"x": x},
        labels=strings,
        metric=lengths,
        max_metric_drop=0,
    )
    assert report.passed and report.validation.metric.name == "lengths"
    assert report.validation.metric.float_value == sum(len(w) for w in strings)
    bare = helper.make_model(helper.make_graph([], "g", [], [])).SerializeToString()
    with pytest.raises(MetricError, match="no character list"):
        resolve("ctc-exact", bare)


def test_auto_searches_against_the_metric(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    result = invoke(
        "auto",
        digits,
        "--metric",
        "top1",
        "--max-metric-drop",
        "1",
        "--data",
        digits_data,
        "-o",
        tmp_path / "q.onnx",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["details"]["auto"]["target"] == {"metric_drop": 1.0}
    assert [g["gate"] for g in report["gates"]["checks"]] == ["--max-metric-drop"]
    assert report["validation"]["metric"]["float_value"] - report["validation"]["metric"]["converted_value"] <= 1
    assert report["size_ratio"] < 0.2
