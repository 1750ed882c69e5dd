"""Error-compensating rounding (GPTQ): the input second moments it needs, the rounding itself, and its use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert.cli import cli
from qconvert.fidelity import gptq, hessian, statistics
from qconvert.runtime import Feeds
from qconvert.select import select_weights


def one_node(node: onnx.NodeProto, weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize(
    "cin, cout, groups, stride, pads, dilation, dims, k",
    [
        (4, 6, 2, 2, [1, 0, 1, 2], 1, 2, 3),  # grouped, strided, uneven pads
        (3, 3, 3, 1, [1, 1, 1, 1], 2, 2, 3),  # depthwise, dilated
        (4, 2, 1, 2, [1, 2], 1, 1, 3),  # 1-D
        (6, 4, 2, 1, [0, 0, 0, 0], 1, 2, 1),  # grouped 1x1: the input's pixels
        (6, 4, 1, 2, [0, 0, 0, 0], 1, 2, 1),  # strided 1x1: picked
    ],
)
def test_conv_second_moments_are_those_of_its_patches(cin, cout, groups, stride, pads, dilation, dims, k):
    """wᵀ H w is the energy of the output channel that w computes, as onnxruntime computes it."""
    rng = np.random.default_rng(0)
    shape = (cout, cin // groups, *[k] * dims)
    x = rng.standard_normal((2, cin, *[9] * dims)).astype(np.float32)
    w = rng.standard_normal(shape)
    node = helper.make_node(
        "Conv", ["x", "w"], ["y"], group=groups, strides=[stride] * dims, pads=pads, dilations=[dilation] * dims
    )
    model = one_node(node, w)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)
    layer = statistics.find_layers(model, select_weights(model).weights)["w"]
    assert hessian.shape(layer) == (groups, int(np.prod(shape[1:])))
    h = statistics.input_moments(model, {"w": layer}, Feeds([{"x": x}], 2, "test"), second_moments={"w"}).hessians
    rows = hessian.matrix(layer, w)
    predicted = np.einsum("grc,gcd,grd->gr", rows, h["w"].astype(np.float64), rows).reshape(-1)
    np.testing.assert_allclose(predicted, np.sum(y**2, axis=tuple(a for a in range(y.ndim) if a != 1)), rtol=1e-4)
    np.testing.assert_array_equal(hessian.from_matrix(layer, rows), w)


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_statistics_pass_gathers_second_moments(op):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 5)).astype(np.float32)
    w = rng.standard_normal((5, 3))
    node = helper.make_node(op, ["x", "w"], ["y"])
    model = one_node(node, w)
    weights = select_weights(model).weights
    layers = statistics.find_layers(model, weights)
    feeds = Feeds([{"x": x[:4]}, {"x": x[4:]}], 6, "test")
    stats = statistics.input_moments(model, layers, feeds, second_moments={"w"})  # the last batch is held out
    np.testing.assert_allclose(stats.hessians["w"][0], x[:4].T.astype(np.float64) @ x[:4], rtol=1e-5)
    assert not statistics.input_moments(model, layers, feeds).hessians


def correlated(rng: np.random.Generator, samples: int, columns: int) -> np.ndarray:
    mixing = rng.standard_normal((columns, columns)) * 0.3 + np.eye(columns)
    return rng.standard_normal((samples, columns)) @ mixing


@pytest.mark.parametrize("kind", ["grid", "codebook"])
def test_compensated_rounding_stays_on_the_levels_and_lowers_the_output_error(kind):
    rng = np.random.default_rng(2)
    x = correlated(rng, 2000, 48)
    w = rng.standard_normal((1, 16, 48))
    if kind == "grid":  # int4 per row
        scale = np.abs(w).max(axis=2, keepdims=True) / 7
        levels = np.arange(-8, 8)[None, None, :] * scale
    else:  # one sorted codebook for all rows
        levels = np.sort(rng.standard_normal(8))[None, None, :]
    every = np.broadcast_to(levels, (1, 16, levels.shape[-1]))[:, :, None, :]  # [G, R, 1, L]
    plain = np.take_along_axis(every, np.abs(w[..., None] - every).argmin(-1)[..., None], -1)[..., 0]
    rounded = gptq.compensate(w, (x.T @ x)[None], levels)
    on_levels = np.abs(rounded[..., None] - every).min(axis=-1)
    assert on_levels.max() < 1e-9
    error = lambda r: float(np.sum(((w - r)[0] @ x.T) ** 2))  # noqa: E731
    assert error(rounded) < 0.8 * error(plain)


def test_inputs_that_never_vary_take_plain_rounding():
    """A dead input (H's diagonal 0) pushes nothing onto the others, and is itself rounded to nearest."""
    rng = np.random.default_rng(3)
    x = correlated(rng, 500, 6)
    x[:, 2] = 0
    w = rng.standard_normal((1, 4, 6))
    levels = np.linspace(-2, 2, 9)[None, None, :]
    rounded = gptq.compensate(w, (x.T @ x)[None], levels)
    nearest = levels[0, 0][np.abs(w[0, :, 2, None] - levels[0, 0]).argmin(-1)]
    np.testing.assert_array_equal(rounded[0, :, 2], nearest)


def test_linear_int4_compensates_where_inputs_correlate(tmp_path: Path):
    """x -> MatMul (mixing, left float: correlated features) -> MatMul -> y, int4 weights-only with calibration
    data: the second layer's data-aware result is GPTQ's, the report says so, and the model is closer to
    float on samples it was not calibrated on than with --no-data-aware."""
    rng = np.random.default_rng(4)
    mixing = (np.eye(32) + rng.standard_normal((32, 32))).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "mix"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [
            numpy_helper.from_array(mixing, "mix"),
            numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w"),
        ],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), model)
    for name, seed in (("cal", 5), ("eval", 6)):
        np.savez(tmp_path / f"{name}.npz", x=np.random.default_rng(seed).standard_normal((256, 32)).astype(np.float32))
    snrs = {}
    for flag in ("--data-aware", "--no-data-aware"):
        args = ["linear", str(model), "--bits", "4", "--weights-only", "--calibration", str(tmp_path / "cal.npz")]
        args += [
            "--data",
            str(tmp_path / "eval.npz"),
            "--exclude",
            "mix",
            "-o",
            str(tmp_path / f"{flag}.onnx"),
            "--json",
        ]
        result = CliRunner().invoke(cli, [*args, *([flag] if flag.startswith("--no") else [])])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        snrs[flag] = report["validation"]["outputs"][0]["snr_db"]
        techniques = {w["name"]: w["techniques"] for w in report["per_weight"]}
        assert ("error-compensated" in techniques["w"]) == (flag == "--data-aware")
    assert snrs["--data-aware"] > snrs["--no-data-aware"] + 1.0
    args = ["linear", str(model), "--weights-only", "--calibration", str(tmp_path / "cal.npz"), "--json"]
    result = CliRunner().invoke(cli, [*args, "--exclude", "mix", "-o", str(tmp_path / "int8.onnx")])
    report = json.loads(result.output)  # int8: rounding error is small, GPTQ is not worth its cost
    assert all("error-compensated" not in w["techniques"] for w in report["per_weight"])


def test_refitted_codebooks_serve_the_rows_that_share_them():
    """A refit over rows that share codebooks (`owner`) solves each codebook over its own rows alone: rows
    0 and 2 share one, 1 and 3 another, the same as refitting each pair by itself as one shared codebook;
    and the refit lowers the output error of the rounding it refits."""
    rng = np.random.default_rng(7)
    x = correlated(rng, 1000, 24)
    h = (x.T @ x)[None]
    w = rng.standard_normal((1, 4, 24))
    levels = np.sort(rng.standard_normal((2, 8)), axis=1)
    owner = np.array([0, 1, 0, 1])
    per_row = levels[owner][None]
    rounded = gptq.compensate(w, h, per_row)
    fitted = gptq.refit(w, h, per_row, rounded, owner)
    for codebook, rows in ((0, [0, 2]), (1, [1, 3])):
        alone = gptq.refit(w[:, rows], h, levels[codebook][None, None], rounded[:, rows])
        np.testing.assert_allclose(fitted[0, rows], np.broadcast_to(alone[0, 0], (2, 8)), rtol=1e-9, atol=1e-12)
    index = np.abs(rounded[..., None] - per_row[:, :, None, :]).argmin(-1)[..., None]  # each weight's entry

    def error(levels_used: np.ndarray) -> float:
        values = np.take_along_axis(np.broadcast_to(levels_used[:, :, None, :], (*w.shape, 8)), index, -1)[..., 0]
        return float(np.sum(((w - values)[0] @ x.T) ** 2))

    assert error(fitted) < error(per_row)
