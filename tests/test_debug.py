"""`qconvert debug`: per-tensor drift in graph order, and the cause of the largest jumps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert.cli import cli
from qconvert.errors import ExitCode


def three_convs(path: Path) -> Path:
    """x -> Conv a -> Relu -> Conv b -> Relu -> Conv c -> y, 16 channels each."""
    rng = np.random.default_rng(0)
    inits, nodes, current = [], [], "x"
    for name in "abc":
        inits.append(
            numpy_helper.from_array((rng.standard_normal((16, 16, 3, 3)) * 0.2).astype(np.float32), f"w_{name}")
        )
        nodes += [
            helper.make_node("Conv", [current, f"w_{name}"], [f"conv_{name}"], pads=[1] * 4),
            helper.make_node("Relu", [f"conv_{name}"], [f"relu_{name}"]),
        ]
        current = f"relu_{name}"
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [1, 16, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    onnx.save(model, str(path))
    return path


def test_debug_finds_the_quantized_weight_that_costs_most(tmp_path: Path) -> None:
    """Only conv b's weight is quantized, and coarsely: the drift starts there, and the weight is the cause."""
    model = three_convs(tmp_path / "m.onnx")
    config = tmp_path / "plan.toml"
    config.write_text(
        '[[layer]]\nmatch = "w_b"\nbits = 2\n[[layer]]\nmatch = "w_a"\nskip = true\n'
        '[[layer]]\nmatch = "w_c"\nskip = true\n'
    )
    converted = tmp_path / "q.onnx"
    assert (
        CliRunner()
        .invoke(
            cli,
            [
                "kmeans",
                str(model),
                "--bits",
                "8",
                "--config",
                str(config),
                "--min-elements",
                "1",
                "-o",
                str(converted),
                "-q",
            ],
        )
        .exit_code
        == 0
    )
    result = CliRunner().invoke(
        cli, ["debug", str(model), str(converted), "--json", "--report-html", str(tmp_path / "d.html")]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    snr = {t["name"]: t["snr_db"] for t in report["tensors"]}
    assert snr["conv_a"] is None and snr["relu_a"] is None  # exact before the quantized layer
    assert snr["conv_b"] < 20 and snr["relu_c"] is not None
    top = report["jumps"][0]
    assert (top["tensor"], top["cause"]) == ("conv_b", "weight")
    assert top["input_error_snr_db"] is None or top["input_error_snr_db"] > 100  # its input is float (to rounding)
    assert "<polyline" in (tmp_path / "d.html").read_text()


def test_debug_through_the_api_on_full_qdq(tmp_path: Path) -> None:
    """Full QDQ: every tensor is measured as its consumers see it (after Quantize/DequantizeLinear)."""
    model = three_convs(tmp_path / "m.onnx")
    data = {"x": np.random.default_rng(1).standard_normal((8, 16, 8, 8)).astype(np.float32)}
    converted = qconvert.linear(model, calibration=data, validate=False).model
    report = qconvert.debug(model, converted, data=data, jumps=2)
    assert report.converted_path == "(in memory)" and report.samples == 8
    # graph order; each Conv writes its Relu's output (absorbed into its range), so its own output is gone
    assert [t.name for t in report.tensors] == ["relu_a", "relu_b", "relu_c"] and report.unmatched == 3
    assert all(t.snr_db is not None and 15 < t.snr_db < 60 for t in report.tensors)
    # a Relu absorbed into its Conv's output range has no node of its own in the converted model to run
    assert len(report.jumps) == 2 and {j.cause for j in report.jumps} == {"unknown"}
    unrelated = tmp_path / "other.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["zz"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
        [helper.make_tensor_value_info("zz", TensorProto.FLOAT, [1, 16, 8, 8])],
    )
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    other.ir_version = 7
    onnx.save(other, str(unrelated))
    result = CliRunner().invoke(cli, ["debug", str(model), str(unrelated)])
    assert result.exit_code == ExitCode.USAGE and "no intermediate tensor" in result.stderr


def test_a_jump_whose_input_was_absorbed_is_named_without_running_it(tmp_path: Path) -> None:
    """A Clip absorbed into the integer Conv before it: the converted model has no tensor for the Clip's input,
    so its jump cannot be run alone: it is named, its SNR measured, its cause unknown (this used to fail the
    whole report on onnxruntime's "Graph output does not exist")."""
    from test_linear import channel_scaled_model

    import qconvert

    model, data = channel_scaled_model(tmp_path, spread=1.0)
    converted = tmp_path / "q.onnx"
    qconvert.linear(model, calibration=data, validate=False, output=converted)
    report = qconvert.debug(model, converted, data=data)
    jumps = {jump.tensor: jump for jump in report.jumps}
    assert jumps["r1"].cause == "unknown" and jumps["r1"].weight_error_snr_db is None
    assert jumps["r1"].snr_db is not None and jumps["r1"].snr_db > 20  # measured all the same
