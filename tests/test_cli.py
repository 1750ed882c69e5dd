"""The command line end to end: outputs, reports, determinism, exit codes, never touching the input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert import __version__
from qconvert.cli import cli
from qconvert.errors import ExitCode
from qconvert.report import SCHEMA_VERSION

from conftest import conv_model, save


def run(*args: str | Path) -> click.testing.Result:  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_digits_4bit_end_to_end(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    before = digest(digits)
    out = tmp_path / "d4.onnx"
    result = run("kmeans", digits, "--bits", "4", "--data", digits_data, "-o", out)
    assert result.exit_code == 0, result.output
    assert digest(digits) == before
    onnx.checker.check_model(str(out), full_check=True)
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION and report["method"] == "kmeans"
    assert report["output"]["bytes"] == out.stat().st_size
    assert report["size_ratio"] < 0.2
    assert report["opset"] == {
        "before": 13,
        "after": 21,
        "storage": "uint4",
        "note": "opset raised from 13 to 21 for uint4 indices",
    }
    accuracy = report["validation"]["accuracy"]
    assert accuracy["float_top1"] > 0.97 and accuracy["float_top1"] - accuracy["quantized_top1"] < 0.02
    assert {w["name"] for w in report["per_weight"]} == {"conv2.weight", "conv3.weight", "fc1.weight"}
    assert all(w["snr_db"] > 15 for w in report["per_weight"])
    # no float weight left where a palette went
    names = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert not names & {"conv2.weight", "conv3.weight", "fc1.weight"}


def test_same_input_gives_identical_model_and_report(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    reports = []
    for name in ("a.onnx", "b.onnx"):
        result = run("kmeans", digits, "--bits", "3", "--per-channel", "--data", digits_data, "-o", tmp_path / name)
        assert result.exit_code == 0, result.output
        report = json.loads((tmp_path / name).with_suffix(".report.json").read_text())
        for volatile in ("timings_s", "latency_ms", "time_by_op", "output"):
            report.pop(volatile)
        report["options"].pop("data", None)
        reports.append(report)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert reports[0] == reports[1]


def test_json_goes_to_stdout_alone(tmp_path: Path) -> None:
    model = save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["kmeans", str(model), "--bits", "2", "--json"])
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["weights"]["quantized"] == 1
    assert report["validation"]["outputs"][0]["name"] == "y"
    assert Path(report["output"]["path"]).name == "m.kmeans2.onnx"


def test_constant_node_weights_are_palettized(tmp_path: Path) -> None:
    model = save(conv_model(cin=16, cout=32, weight_in_constant=True), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = run("kmeans", model, "--bits", "4", "-o", out)
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out)).graph
    assert not [n for n in graph.node if n.op_type == "Constant"]
    assert out.stat().st_size < model.stat().st_size / 4


@pytest.mark.parametrize(
    ("source", "flags", "opset", "storage"),
    [(9, [], 21, "uint4"), (11, ["--keep-opset"], 11, "packed"), (9, ["--keep-opset"], 9, "uint8")],
)
def test_old_opset_is_raised_or_kept(tmp_path: Path, source: int, flags: list[str], opset: int, storage: str) -> None:
    model = save(conv_model(cin=16, cout=32, opset=source), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = run("kmeans", model, "--bits", "4", "-o", out, "--json", *flags)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["opset"]["after"] == opset and report["opset"]["storage"] == storage
    assert report["validation"]["outputs"][0]["snr_db"] > 15
    written = onnx.load(str(out))
    assert written.opset_import[0].version == opset


@pytest.mark.usefixtures("no_opset_21")
def test_linear_layers_get_their_opset_when_the_indices_cannot_have_theirs(tmp_path: Path) -> None:
    """The version converter fails on some models at 21 (uint4 indices) but not at 13 (per-channel
    DequantizeLinear; seen: a CRNN at 12). The indices then fall back to packed, and the opset goes to 13."""
    model = conv_model(cin=16, cout=32, opset=12)
    w2 = np.random.default_rng(1).standard_normal((32, 32, 3, 3)).astype(np.float32) * 0.1
    model.graph.initializer.append(numpy_helper.from_array(w2, "w2"))
    model.graph.node.append(helper.make_node("Conv", ["y", "w2"], ["z"], pads=[1] * 4))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 32, 8, 8]))
    path = save(model, tmp_path / "m.onnx")
    config = tmp_path / "plan.toml"
    config.write_text('bits = 4\n[[layer]]\nmatch = "w2"\nmethod = "linear"\nbits = 8\ngranularity = "per-channel"\n')
    result = run("kmeans", path, "--config", config, "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["opset"]["before"], report["opset"]["after"]) == (12, 13)
    assert report["opset"]["storage"] == "int8, packed" and "fails the ONNX checker" in report["opset"]["note"]
    assert report["validation"]["outputs"][0]["snr_db"] > 15


def test_int4_linear_below_every_reachable_opset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The version converter refuses every opset: per-tensor int4 is stored bit-packed at the model's opset
    12; per-channel scales need DequantizeLinear's axis (opset 13): a one-line error, exit 4, nothing written."""
    from qconvert.errors import UnsupportedModelError
    from qconvert.methods import driver as method

    def converter(model: onnx.ModelProto, target: int, **kwargs: bool) -> onnx.ModelProto:
        raise UnsupportedModelError(f"the model converted to opset {target} fails the ONNX checker: (as a test)")

    monkeypatch.setattr(method, "raise_opset", converter)
    path = save(conv_model(cin=16, cout=32, opset=12), tmp_path / "m.onnx")
    result = run("linear", path, "--bits", "4", "--per-tensor", "-o", tmp_path / "t.onnx")
    assert result.exit_code == 0, result.output
    assert onnx.load(str(tmp_path / "t.onnx")).opset_import[0].version == 12
    result = run("linear", path, "--bits", "4", "-o", tmp_path / "q.onnx")
    assert result.exit_code == ExitCode.UNSUPPORTED
    assert result.stderr.startswith("qconvert: error: ") and "opset 13" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "q.onnx").exists()


def test_fp16_model_stays_fp16(tmp_path: Path) -> None:
    model = save(conv_model(cin=16, cout=32, dtype=np.float16), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = run("kmeans", model, "--bits", "4", "-o", out)
    assert result.exit_code == 0, result.output
    codebook = next(t for t in onnx.load(str(out)).graph.initializer if t.name.endswith("codebook"))
    assert codebook.data_type == TensorProto.FLOAT16


def test_depthwise_per_channel_falls_back_to_per_tensor(tmp_path: Path) -> None:
    from cnn_shapes import mobilenet

    model = save(mobilenet(width=0.5, classes=10, size=32), tmp_path / "m.onnx")
    result = run(
        "kmeans",
        model,
        "--bits",
        "4",
        "--per-channel",
        "--min-elements",
        "256",
        "-o",
        tmp_path / "q.onnx",
        "--json",
        "--no-validate",
    )
    assert result.exit_code == 0, result.output
    weights = json.loads(result.stdout)["per_weight"]
    depthwise = [w for w in weights if w["shape"][1] == 1 and w["shape"][2] == 3]
    assert depthwise and all(w["granularity"] == "per-tensor" and "bits per weight" in w["note"] for w in depthwise)
    assert any(w["granularity"] in ("per-channel", "per-channel-scaled") for w in weights)


def test_symbolic_dimension_that_cannot_be_one(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([2, 64], np.int64), "shape")],
    )
    model = save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    failed = run("kmeans", model, "--bits", "4", "-o", out)
    assert failed.exit_code == ExitCode.UNSUPPORTED
    assert "x[1x64]" in failed.stderr and "--input-shape" in failed.stderr
    assert not out.exists()
    assert run("kmeans", model, "--bits", "4", "-o", out, "--input-shape", "x=2x64").exit_code == 0
    assert out.exists()


BAD_INPUTS = {  # case: (arguments, with {d} the folder and {m} a valid model), exit code, words in the message
    "missing file": ("kmeans {d}/nope.onnx --bits 4", ExitCode.INPUT, "no such file"),
    "directory without -o": ("kmeans {d} --bits 4", ExitCode.USAGE, "need -o DIR"),
    "random bytes": ("kmeans {d}/junk.onnx --bits 4", ExitCode.INPUT, "not an ONNX model"),
    "empty file": ("kmeans {d}/empty.onnx --bits 4", ExitCode.INPUT, "not an ONNX model"),
    "nothing to quantize": ("kmeans {d}/relu.onnx --bits 4", ExitCode.UNSUPPORTED, "nothing to quantize"),
    "output is input": ("kmeans {m} --bits 4 -o {m}", ExitCode.USAGE, "overwrite the input"),
    "bits out of range": ("kmeans {m} --bits 9", ExitCode.USAGE, "--bits"),
    "unknown input name": ("kmeans {m} --bits 4 --input-shape nope=1x2", ExitCode.USAGE, "unknown input 'nope'"),
    "bad input shape": ("kmeans {m} --bits 4 --input-shape x=1xfoo", ExitCode.USAGE, "NAME=D1xD2"),
    "data lacks an input": ("kmeans {m} --bits 4 --data {d}/wrong.npz", ExitCode.INPUT, "no array named 'x'"),
    "data missing": ("kmeans {m} --bits 4 --data {d}/nope.npz", ExitCode.INPUT, "no such file"),
    "output dir missing": ("kmeans {m} --bits 4 -o {d}/no/q.onnx", ExitCode.OUTPUT, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_its_exit_code(tmp_path: Path, case: str) -> None:
    model = save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    (tmp_path / "junk.onnx").write_bytes(np.random.default_rng(0).bytes(300))
    (tmp_path / "empty.onnx").write_bytes(b"")
    relu = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    save(helper.make_model(relu), tmp_path / "relu.onnx")
    np.savez(tmp_path / "wrong.npz", other=np.zeros((2, 8, 8, 8), np.float32))
    template, code, words = BAD_INPUTS[case]
    before = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    result = run(*template.format(d=tmp_path, m=model).split())
    assert result.exit_code == code, result.output
    assert words in result.stderr
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0  # one line
    after = {p: digest(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # inputs untouched, nothing half-written left behind


def test_module_entry_point_and_version() -> None:
    done = subprocess.run([sys.executable, "-m", "qconvert", "--version"], capture_output=True, text=True, check=True)
    assert __version__ in done.stdout


def test_help_documents_examples_and_exit_codes() -> None:
    result = run("kmeans", "--help")
    assert "qconvert kmeans model.onnx --bits 4" in result.output
    assert "Exit codes" in result.output and "130" in result.output


def test_written_model_runs_like_the_report_says(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    out = tmp_path / "q.onnx"
    assert run("kmeans", digits, "--bits", "2", "--per-channel", "--data", digits_data, "-o", out).exit_code == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    with np.load(digits_data) as data:
        logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": data["input"]})[
            0
        ]
        accuracy = float(np.mean(logits.argmax(1) == data["labels"]))
    assert accuracy == pytest.approx(report["validation"]["accuracy"]["quantized_top1"])


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_parallel_quantization_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    import qconvert.methods.common as common
    import qconvert.pipeline as pipeline
    from qconvert.plan import Granularity, KMeansPlan, LinearPlan

    from cnn_shapes import resnet

    model = save(resnet(width=8, blocks=(1, 1, 1, 1), classes=10, size=32), tmp_path / "m.onnx")
    monkeypatch.setattr(common, "PARALLEL_MIN_ELEMENTS", 0)  # use the pool even for this small model
    if method == "kmeans":
        plan: KMeansPlan | LinearPlan = KMeansPlan(bits=3, granularity=Granularity.PER_CHANNEL, min_elements=256)
    else:  # clipping searches and bias corrections from calibration data, activations too
        data = tmp_path / "cal.npz"
        np.savez(data, input=np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32))
        plan = LinearPlan(min_elements=256, calibration=data)
    serial = pipeline.convert(model, tmp_path / "a.onnx", plan, None, workers=1)
    parallel = pipeline.convert(model, tmp_path / "b.onnx", plan, None, workers=2)
    assert serial.model_bytes == parallel.model_bytes
    if method == "linear":
        assert parallel.report.details["calibration"]["layers_refined"] > 0
