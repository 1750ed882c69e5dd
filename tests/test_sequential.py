"""Sequential GPTQ towards the float outputs (`qconvert.fidelity.sequential`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import qconvert
from qconvert.cli import cli
from qconvert.fidelity import hessian, sequential, statistics
from qconvert.fidelity.bias import bias_shift
from qconvert.methods import refine
from qconvert.render.sections import fidelity
from qconvert.runtime import Feeds
from qconvert.select import select_weights
from tests.test_gptq import one_node


@pytest.mark.parametrize(
    "node, x_shape, w_shape",
    [
        (
            helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 1], pads=[1, 0, 1, 2]),
            (2, 4, 9, 8),
            (6, 2, 3, 3),
        ),
        (
            helper.make_node("Conv", ["x", "w"], ["y"], group=3, dilations=[2, 2], pads=[2] * 4),
            (1, 3, 7, 7),
            (3, 1, 3, 3),
        ),
        (helper.make_node("Conv", ["x", "w"], ["y"], strides=[2, 2]), (2, 5, 6, 6), (4, 5, 1, 1)),
        (helper.make_node("MatMul", ["x", "w"], ["y"]), (2, 7, 5), (5, 3)),
        (helper.make_node("Gemm", ["x", "w"], ["y"], transA=1), (5, 6), (5, 3)),
    ],
)
def test_patches_are_the_rows_whose_second_moments_the_statistics_pass_gathers(node, x_shape, w_shape):
    """The rows `patches` makes in numpy (im2col) give the H that the in-graph pass gives, in the weight's column
    order, and as many as `_rows` counts from the input's shape."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(x_shape).astype(np.float32)
    model = one_node(node, rng.standard_normal(w_shape))
    layer = statistics.find_layers(model, select_weights(model).weights)["w"]
    h = statistics.input_moments(model, {"w": layer}, Feeds([{"x": x}], 1, "test"), second_moments={"w"}).hessians
    rows = sequential.patches(layer, x)
    assert rows.shape[:2] == hessian.shape(layer) and rows.shape[2] == sequential._rows(layer, x.shape)
    np.testing.assert_allclose(rows @ rows.transpose(0, 2, 1), h["w"], rtol=1e-4, atol=1e-4)


def test_the_target_is_the_float_weight_where_the_inputs_are_exact_and_undoes_a_known_distortion():
    """x̂ = x: W' = W. x̂ = A x (an invertible mixing the layers before added): W' ≈ W A⁻¹, which gives W x
    from x̂."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 6, 4000))
    w = rng.standard_normal((1, 3, 6))
    same = sequential._Sums.zeros(1, 6)
    same.add(x, x)
    np.testing.assert_allclose(sequential._target(w, same), w, atol=1e-12)
    mixing = np.eye(6) + 0.3 * rng.standard_normal((6, 6))
    mixed = sequential._Sums.zeros(1, 6)
    mixed.add(x, mixing @ x)
    target = sequential._target(w, mixed)
    error = lambda v: float(np.sum((w[0] @ x[0] - v[0] @ mixing @ x[0]) ** 2) / np.sum((w[0] @ x[0]) ** 2))  # noqa: E731
    assert error(target) < 1e-3 < 0.1 < error(w)


def chain(tmp_path: Path, layers: int, width: int) -> Path:
    """x [N, T, width] through `layers` MatMuls with Relu between: a deep net whose errors add up."""
    rng = np.random.default_rng(2)
    nodes, weights, y = [], [], "x"
    for i in range(layers):
        w = rng.standard_normal((width, width)) * np.sqrt(2 / width)
        weights.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [y, f"w{i}"], [f"m{i}"]))
        y = f"m{i}" if i == layers - 1 else f"r{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [f"m{i}"], [y]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, width])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 64, width])],
        weights,
    )
    path = tmp_path / "chain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    return path


def test_rounding_again_in_graph_order_beats_gptq_on_float_inputs(tmp_path: Path):
    """k-means 3 of a deep chain: the layers rounded again on the quantized model's inputs, the report says so,
    and the model is closer to float on samples it never saw than with GPTQ on the float inputs alone."""
    model = chain(tmp_path, layers=6, width=48)
    mixing = np.eye(48) + 0.5 * np.random.default_rng(3).standard_normal((48, 48))
    calibration, unseen = (
        {"x": (np.random.default_rng(seed).standard_normal((n, 64, 48)) @ mixing).astype(np.float32)}
        for seed, n in ((4, 16), (5, 8))
    )

    def snr(**kwargs: object) -> tuple[float, dict]:
        report = qconvert.kmeans(model, bits=3, calibration=calibration, data=unseen, **kwargs).report.to_dict()
        return report["validation"]["outputs"][0]["snr_db"], report

    again, report = snr(output=tmp_path / "again.onnx")
    verdict = report["details"]["calibration"]["sequential"]
    assert verdict["kept"] and verdict["layers"] == 6 and verdict["samples"] == 16
    assert verdict["sequential_model_snr_db"] > verdict["model_snr_db"]
    assert all("sequential" in w["techniques"] for w in report["per_weight"])
    once, report = snr(output=tmp_path / "once.onnx", sequential=False)  # GPTQ on the float inputs alone
    assert "sequential" not in report["details"]["calibration"]
    assert again > once + 1.0, (again, once)
    np.savez(tmp_path / "cal.npz", **calibration)
    args = ["kmeans", str(model), "--bits", "3", "--calibration", str(tmp_path / "cal.npz"), "--no-validate"]
    result = CliRunner().invoke(cli, [*args, "--no-sequential", "-o", str(tmp_path / "cli.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    assert "sequential" not in json.loads(result.output)["details"]["calibration"]


LAST = ("shifted_model_snr_db", "unshifted_model_snr_db", "plain_shifted_model_snr_db", "plain_model_snr_db")


@pytest.mark.parametrize("measured", ["as measured", "unshifted better", "plain better"])
def test_the_last_layer_keeps_what_the_held_out_samples_say(tmp_path, monkeypatch, measured):
    """The last layer rounded again is measured with and without its bias shift (no later layer was fitted to it),
    and plainly rounded with and without one; the best stays, the report says all four, and the final fit and the
    written model follow it (a MatMul's shift is an Add after it). "unshifted better" and "plain better" make the
    held-out check prefer one, as on the PP-OCRv4 recognizer and detector."""
    if measured != "as measured":
        real = refine.checks.model_snr
        boosted = 1 + LAST.index("unshifted_model_snr_db" if measured == "unshifted better" else "plain_model_snr_db")

        def preferring(model, variants, *args):  # type: ignore[no-untyped-def]
            snrs = real(model, variants, *args)
            return [s + 10 * (i == boosted) for i, s in enumerate(snrs)] if len(variants) == 5 else snrs

        monkeypatch.setattr(refine.checks, "model_snr", preferring)
    path = chain(tmp_path, layers=3, width=32)
    calibration = {"x": (np.random.default_rng(6).standard_normal((16, 64, 32)) + 0.5).astype(np.float32)}
    conversion = qconvert.kmeans(path, bits=3, calibration=calibration, validate=False)
    report = conversion.report.to_dict()
    verdict = report["details"]["calibration"]["sequential"]
    last = verdict["last_layer"]
    assert last["layer"] == "w2" and verdict["kept"]
    best = max(LAST, key=lambda k: last[k])
    assert verdict["sequential_model_snr_db"] == last[best]
    assert last["shifted"] == (best in ("shifted_model_snr_db", "plain_shifted_model_snr_db"))
    assert last["rounded_again"] == (best in ("shifted_model_snr_db", "unshifted_model_snr_db"))
    if measured != "as measured":
        assert best == LAST[boosted - 1]
    techniques = {w["name"]: w["techniques"] for w in report["per_weight"]}
    assert ("sequential" in techniques["w2"]) == last["rounded_again"]
    assert ("bias-corrected" in techniques["w2"]) == last["shifted"]
    assert all("bias-corrected" in techniques[w] for w in ("w0", "w1"))
    graph = conversion.model.graph
    last_product = next(n.output[0] for n in graph.node if n.op_type == "MatMul" and "w2" in "".join(n.input))
    assert any(last_product in n.input for n in graph.node if n.op_type == "Add") == last["shifted"]
    said = "\n".join(fidelity(conversion.report))
    assert f"{verdict['layers']} GPTQ layers rounded again in graph order" in said
    assert ("w2, the last of them, keeps its bias" in said) == (last["rounded_again"] and not last["shifted"])
    assert ("w2, the last of them, stays plainly rounded" in said) == (not last["rounded_again"])


def test_a_fit_leaves_the_unshifted_layers_bias_alone(tmp_path: Path):
    model = onnx.load(chain(tmp_path, layers=2, width=8))
    weights = select_weights(model).weights
    layers = statistics.find_layers(model, weights)
    arrays = {w.name: w.array() for w in weights}
    x = (np.random.default_rng(7).standard_normal((2, 64, 8)) + 1).astype(np.float32)
    feeds = Feeds([{"x": x}], 2, "test")
    noisy = {name: (lambda a=a: a + 0.1) for name, a in arrays.items()}

    def fit(unshifted: tuple[str, ...]) -> dict:
        fitted = [layers["w0"], layers["w1"]]
        reround = lambda name, target, second: np.round(target, 1)  # noqa: E731
        return sequential.fit(model, fitted, noisy, {}, arrays.__getitem__, reround, feeds, True, unshifted)

    both, one = fit(()), fit(("w1",))
    assert both["w0"][1] is not None and both["w1"][1] is not None
    assert one["w1"][1] is None and np.array_equal(one["w0"][1], both["w0"][1])


@pytest.mark.parametrize(
    "cin, cout, groups, stride, pads, dilation, k, extra",
    [
        (3, 2, 1, 2, [0] * 4, 1, 2, [0, 0]),  # taps that tile the output (a detector's upsampling head)
        (4, 6, 2, 2, [1, 0, 1, 2], 1, 3, [1, 0]),  # grouped, overlapping taps, uneven pads, output padding
        (4, 4, 4, 1, [1] * 4, 2, 3, [0, 0]),  # depthwise, dilated
        (6, 3, 1, 1, [0] * 4, 1, 1, [0, 0]),  # 1x1: the input's pixels
    ],
)
def test_a_conv_transpose_is_a_layer_whose_rows_give_its_output(cin, cout, groups, stride, pads, dilation, k, extra):
    """ConvTranspose ([Cin, Cout/G, k, k]) as the techniques see it: its weight as [G, R, C] times the rows that
    `patches` makes is onnxruntime's output; the in-graph H is those rows' H; its bias shift is the mean output
    error where the taps tile the output."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((cin, cout // groups, k, k))
    x = (rng.standard_normal((2, cin, 5, 6)) + 0.5).astype(np.float32)
    node = helper.make_node(
        "ConvTranspose", ["x", "w"], ["y"], group=groups, strides=[stride] * 2, pads=pads,
        dilations=[dilation] * 2, output_padding=extra,
    )  # fmt: skip
    model = one_node(node, w)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0].astype(np.float64)
    layer = statistics.find_layers(model, select_weights(model).weights)["w"]
    assert sequential.supported(layer) and layer.in_channels == cin
    rows = sequential.patches(layer, x).astype(np.float64)
    assert rows.shape[:2] == hessian.shape(layer) and rows.shape[2] == sequential._rows(layer, x.shape)
    matrix = hessian.matrix(layer, w)
    np.testing.assert_array_equal(hessian.from_matrix(layer, matrix), w)
    outputs = (matrix @ rows).reshape(cout, 2, -1).transpose(1, 0, 2)  # [G, R, N·pixels] -> [N, Cout, pixels]
    np.testing.assert_allclose(outputs, y.reshape(2, cout, -1), rtol=1e-4, atol=1e-4)
    stats = statistics.input_moments(model, {"w": layer}, Feeds([{"x": x}], 2, "test"), second_moments={"w"})
    np.testing.assert_allclose(stats.hessians["w"], rows @ rows.transpose(0, 2, 1), rtol=1e-4, atol=1e-3)
    if stride == k and not any(pads):
        rounded = np.round(w)
        shift = bias_shift(layer, stats.moments["w"], w, rounded)
        error = (matrix - hessian.matrix(layer, rounded)) @ rows.mean(axis=2)[:, :, None]
        np.testing.assert_allclose(shift, error.reshape(-1), rtol=1e-5)
