"""Cross-layer equalization: the same model in float, matched channel ranges, less quantization error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert.cli import cli
from qconvert.equalize import equalize


def separable(between: str = "Relu", shared: bool = False) -> onnx.ModelProto:
    """x -> Conv 3x3 (16 channels, ranges a thousandfold apart) -> BN -> `between` -> depthwise 3x3 -> Relu
    -> Conv 1x1 -> y; `shared`: the first Conv's output is also a model output."""
    rng = np.random.default_rng(0)
    spread = np.geomspace(1e-2, 10, 16).astype(np.float32)
    inits = {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32) * spread[:, None, None, None],
        "gamma": rng.uniform(0.5, 2, 16).astype(np.float32),
        "beta": rng.standard_normal(16).astype(np.float32),
        "mean": rng.standard_normal(16).astype(np.float32) * 0.1,
        "var": rng.uniform(0.5, 2, 16).astype(np.float32),
        "w2": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * spread[::-1, None, None, None],
        "b2": rng.standard_normal(16).astype(np.float32),
        "w3": rng.standard_normal((8, 16, 1, 1)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
        helper.make_node(between, ["n1"], ["a1"]),
        helper.make_node("Conv", ["a1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=16),
        helper.make_node("Relu", ["c2"], ["a2"]),
        helper.make_node("Conv", ["a2", "w3"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8, 12, 12])]
    if shared:
        outputs.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [None, 16, 12, 12]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 3, 12, 12])],
        outputs,
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(["y"], {"x": x})[0]


def test_equalized_pairs_compute_the_same_with_matched_channel_ranges() -> None:
    """Through BN and Relu into the depthwise Conv: the same outputs, and the first's channel ranges (as folded
    with the BN) equal to the depthwise kernels' (a thousandfold spread apart before). The depthwise -> 1x1
    pair is left alone: a dense second Conv mixes the channels in each of its rows."""
    model = separable()
    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(np.float32)
    before = run(model, x)
    assert equalize(model) == ["c2"]
    np.testing.assert_allclose(run(model, x), before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    folded = np.abs(inits["w1"]).reshape(16, -1).max(axis=1) * np.abs(inits["gamma"]) / np.sqrt(inits["var"] + 1e-5)
    np.testing.assert_allclose(folded, np.abs(inits["w2"]).reshape(16, -1).max(axis=1), rtol=1e-5)


def test_pairs_need_a_homogeneous_op_and_tensors_read_once() -> None:
    for model in (separable("Sigmoid"), separable(shared=True)):
        weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert equalize(model) == []
        after = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        assert all(np.array_equal(weights[n], after[n]) for n in weights)


def test_equalization_lowers_per_tensor_quantization_error(tmp_path: Path) -> None:
    """Per-tensor int8 weights lose the small channels of a weight whose ranges are a thousandfold apart;
    equalized, the output SNR rises, and the report names the equalized Convs."""
    onnx.save(separable(), tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(2).standard_normal((8, 3, 12, 12)).astype(np.float32))
    snr = {}
    for flag in ("--no-equalize", None):
        args = ["linear", str(tmp_path / "m.onnx"), "--per-tensor", "--data", str(tmp_path / "data.npz")]
        args += ["-o", str(tmp_path / f"{flag}.onnx"), "--json", *([flag] if flag else [])]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        snr[flag] = report["validation"]["outputs"][0]["snr_db"]
        assert report["details"].get("equalized") == (None if flag else ["c2"])
    assert snr[None] > snr["--no-equalize"] + 6


def test_full_qdq_equalizes_only_when_asked(tmp_path: Path) -> None:
    """With activations quantized, equalization moves their ranges too: off unless --equalize."""
    onnx.save(separable(), tmp_path / "m.onnx")
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(2).standard_normal((8, 3, 12, 12)).astype(np.float32))
    for flags, expected in (([], None), (["--equalize"], ["c2"])):
        args = ["linear", str(tmp_path / "m.onnx"), "--calibration", str(tmp_path / "data.npz"), "--no-validate"]
        result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / f"q{len(flags)}.onnx"), "--json", *flags])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["details"].get("equalized") == expected


def test_pairs_with_a_weight_left_float_are_left_alone(tmp_path: Path) -> None:
    """Equalizing against a weight that stays float gains nothing: --exclude w1, no pair."""
    onnx.save(separable(), tmp_path / "m.onnx")
    args = ["kmeans", str(tmp_path / "m.onnx"), "--bits", "4", "--exclude", "w1", "--min-elements", "1"]
    result = CliRunner().invoke(cli, [*args, "--no-validate", "-o", str(tmp_path / "q.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert "equalized" not in report["details"] and {w["name"] for w in report["per_weight"]} == {"w2", "w3"}
