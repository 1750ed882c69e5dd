"""Float16: the graph rewrite (`qconvert.fp16`), the search that keeps ops float32 (`methods.half`), the command."""

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
from qconvert import fp16
from qconvert.cli import cli
from qconvert.errors import UsageError
from qconvert.methods import half
from qconvert.plan import Float16Plan, LinearPlan

from conftest import conv_model, save


def run(model: onnx.ModelProto | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def snr(reference: np.ndarray, found: np.ndarray) -> float:
    error = np.sum((reference.astype(np.float64) - found) ** 2)
    return float("inf") if error == 0 else 10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / error)


def graph_model(nodes, inputs, outputs, initializers, opset: int = 13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def head_model() -> onnx.ModelProto:
    """Conv -> BatchNorm (variance past float16's range) -> Relu -> Resize (scales: float32 by the schema) ->
    Reshape by a size computed from the input's shape -> Sigmoid."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(4, np.float32), "beta"),
        numpy_helper.from_array(np.zeros(4, np.float32), "mean"),
        numpy_helper.from_array(np.full(4, 1e6, np.float32), "var"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"]),
        helper.make_node("Mul", ["bn", "four"], ["m"]),
        helper.make_node("Relu", ["m"], ["r"]),
        helper.make_node("Resize", ["r", "roi", "scales"], ["up"], mode="nearest"),
        helper.make_node("Shape", ["up"], ["shape"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["shape_f", "four"], ["scaled"]),
        helper.make_node("Div", ["scaled", "four"], ["back"]),
        helper.make_node("Cast", ["back"], ["dims"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["up", "dims"], ["same"]),
        helper.make_node("Sigmoid", ["same"], ["y"]),
    ]
    return graph_model(
        nodes,
        [helper.make_tensor_value_info("x", f, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", f, [1, 4, 16, 16])],
        inits,
    )


def test_the_rewrite_keeps_float32_what_float16_breaks_and_halves_the_rest():
    model = head_model()
    graph = fp16.analyse(model)
    reasons = {model.graph.node[i].op_type + str(i): why for i, why in graph.fixed.items()}
    assert any(k.startswith("BatchNormalization") and "range" in why for k, why in reasons.items())
    shape_ops = {k for k, why in reasons.items() if "shape arithmetic" in why}
    assert shape_ops == {"Cast6", "Mul7", "Div8", "Cast9"}  # the shape's arithmetic, not the Mul on activations
    converted, casts = fp16.convert(graph)
    onnx.checker.check_model(converted, full_check=True)
    stored = {t.name: t.data_type for t in converted.graph.initializer}
    assert stored["w"] == TensorProto.FLOAT16
    assert stored["scales"] == TensorProto.FLOAT  # Resize's scales are float32 whatever X is
    assert stored["var"] == TensorProto.FLOAT and stored["four"] == TensorProto.FLOAT  # read by float32 ops too
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (reference,), (found,) = run(model, {"x": x}), run(converted, {"x": x})
    assert found.dtype == np.float32 and np.isfinite(found).all()
    assert snr(reference, found) > 50
    assert casts >= 3  # in: x; around the BatchNorm: its input and output


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_float16_breaks_a_variance_past_its_range():
    """Why the range rule exists: with the BatchNorm in float16 its variance is Inf, its output 0, and the
    model's output a constant."""
    model = head_model()
    graph = fp16.analyse(model)
    graph.fixed = {i: why for i, why in graph.fixed.items() if "range" not in why}
    broken, _ = fp16.convert(graph)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    (reference,), (found,) = run(model, {"x": x}), run(broken, {"x": x})
    assert np.ptp(reference) > 0 and np.ptp(found) == 0


def test_inputs_and_outputs_become_float16_when_asked_and_validation_feeds_them():
    model = conv_model()
    converted, _ = fp16.convert(fp16.analyse(model), keep_io_types=False)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert not any(n.op_type == "Cast" for n in converted.graph.node)
    result = qconvert.float16(model, keep_io_types=False)
    assert result.report.validation.outputs[0].snr_db > 50


def test_constants_in_nodes_tiny_values_and_subgraphs():
    """A Constant node's value turns float16, an epsilon below float16's smallest stays above 0, and a
    tensor an If branch reads keeps its name and float32 type there."""
    f = TensorProto.FLOAT
    branch = lambda name, op: helper.make_graph(  # noqa: E731
        [helper.make_node(op, ["r"], [name])], name, [], [helper.make_tensor_value_info(name, f, None)]
    )
    nodes = [
        helper.make_node("Constant", [], ["eps"], value=numpy_helper.from_array(np.array(1e-12, np.float32))),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "eps"], ["d"]),
        helper.make_node("Div", ["x", "d"], ["q"]),
        helper.make_node("If", ["cond"], ["branch"], then_branch=branch("a", "Neg"), else_branch=branch("b", "Abs")),
        helper.make_node("Add", ["q", "branch"], ["y"]),
    ]
    model = graph_model(
        nodes,
        [helper.make_tensor_value_info("x", f, [2, 3]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", f, [2, 3])],
        [],
    )
    graph = fp16.analyse(model)
    assert graph.outer == {"r"}
    converted, _ = fp16.convert(graph)
    onnx.checker.check_model(converted, full_check=True)
    eps = next(n for n in converted.graph.node if n.op_type == "Constant").attribute[0].t
    assert eps.data_type == TensorProto.FLOAT16 and numpy_helper.to_array(eps) > 0
    x = np.array([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        (reference,), (found,) = run(model, feed), run(converted, feed)
        assert np.isfinite(found[x > 0]).all()
        np.testing.assert_allclose(found[x > 0], reference[x > 0], rtol=2e-3)


def cancelling_model() -> onnx.ModelProto:
    """y = (x + 1000.3) - 1000 for small x: in float16 the constant is 1000.5 (its step there is 0.5), so y is off
    by 0.2. (onnxruntime's CPU runs Add and Sub through float32, so what it shows is the constants' rounding.)"""
    f = TensorProto.FLOAT
    constants = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("c", 1000.3), ("k", 1000.0))]
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Add", ["r", "c"], ["shifted"]),
        helper.make_node("Sub", ["shifted", "k"], ["y"]),
    ]
    x, y = (helper.make_tensor_value_info(name, f, [4, 16]) for name in ("x", "y"))
    return graph_model(nodes, [x], [y], constants)


def test_the_search_keeps_float32_the_ops_that_drift_and_what_feeds_them(tmp_path: Path):
    model = cancelling_model()
    x = np.random.default_rng(0).uniform(0, 0.1, (8, 16)).astype(np.float32)
    data = tmp_path / "data.npz"
    np.savez(data, x=x)
    feed = {"x": x[:4]}
    plain, _ = fp16.convert(fp16.analyse(model))
    assert snr(run(model, feed)[0], run(plain, feed)[0]) < 10
    converted, details, warnings = half.halve(model, Float16Plan(), lambda _: None, data, None)
    kept = {k["op"]: k["reason"] for k in details["kept_float32"]}
    assert "drifts" in kept["Sub"] and "feeds" in kept["Add"] and "Relu" not in kept
    assert details["search"]["snr_db"] is None and not warnings  # None: exact, the chain is float32 again
    assert snr(run(model, feed)[0], run(converted, feed)[0]) > 60


def test_values_past_the_range_on_the_data_stay_float32(tmp_path: Path):
    f = TensorProto.FLOAT
    big = numpy_helper.from_array(np.array(3000.0, np.float32), "big")
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"]), helper.make_node("Relu", ["m"], ["y"])]
    model = graph_model(
        nodes, [helper.make_tensor_value_info("x", f, [1, 8])], [helper.make_tensor_value_info("y", f, [1, 8])], [big]
    )
    data = tmp_path / "x.npz"
    np.savez(data, x=np.full((2, 8), 50.0, np.float32))  # 150000 > 65504
    converted, details, _ = half.halve(model, Float16Plan(), lambda _: None, data, None)
    assert {k["op"] for k in details["kept_float32"]} == {"Mul", "Relu"}
    (found,) = run(converted, {"x": np.full((1, 8), 50.0, np.float32)})
    assert np.isfinite(found).all() and found[0, 0] == 150000.0


def test_the_command_writes_a_half_size_model_and_reports_it(tmp_path: Path):
    model = save(conv_model(cout=32, cin=16), tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["float16", str(model), "--json", "--keep", "Relu"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    out = tmp_path / "m.float16.onnx"
    assert report["output"]["path"] == str(out) and report["method"] == "float16"
    assert 0.49 < out.stat().st_size / model.stat().st_size < 0.53
    details = report["details"]["float16"]
    assert [k["op"] for k in details["kept_float32"]] == ["Relu"]
    assert report["weights"]["quantized"] == 1 and report["weights"]["ratio"] == 0.5
    assert report["per_weight"][0]["bits"] == 16 and report["per_weight"][0]["snr_db"] > 60
    again = tmp_path / "again.onnx"
    assert CliRunner().invoke(cli, ["float16", str(model), "--keep", "Relu", "-o", str(again), "-q"]).exit_code == 0
    assert again.read_bytes() == out.read_bytes()


def test_kmeans_with_float16_stores_codebooks_and_small_weights_in_float16(tmp_path: Path, digits, digits_data):
    k4 = qconvert.kmeans(digits, 4, data=digits_data, min_snr=15)
    k4_half = qconvert.kmeans(digits, 4, data=digits_data, float16=True, min_snr=15)
    assert k4_half.report.passed and k4_half.report.output_bytes < k4.report.output_bytes
    types = {t.data_type for t in k4_half.model.graph.initializer}
    assert TensorProto.FLOAT16 in types
    gathers = [n for n in k4_half.model.graph.node if n.op_type == "Gather"]
    codebooks = {t.name: t.data_type for t in k4_half.model.graph.initializer}
    assert gathers and all(codebooks.get(g.input[0]) == TensorProto.FLOAT16 for g in gathers)
    assert "float16" in k4_half.report.details


def test_float16_with_quantized_activations_is_a_usage_error(tmp_path: Path):
    with pytest.raises(UsageError, match="weights-only"):
        LinearPlan(calibration=tmp_path / "c.npz", float16=True)
    assert LinearPlan(calibration=tmp_path / "c.npz", weights_only=True, float16=True).float16


def test_onnxruntime_cpu_runs_float16_chains_through_float32():
    """What the CPU validation measures (README): onnxruntime's CPU runs float16 Add and Sub through float32
    kernels and drops the rounding between them, so (x + 1000) - 1000 gives x back, where float16 arithmetic
    (a step of 0.5 at 1000) would give 0 or 0.5."""
    h = TensorProto.FLOAT16
    k = numpy_helper.from_array(np.array(1000, np.float16), "k")
    nodes = [helper.make_node("Add", ["x", "k"], ["a"]), helper.make_node("Sub", ["a", "k"], ["y"])]
    model = graph_model(
        nodes, [helper.make_tensor_value_info("x", h, [4])], [helper.make_tensor_value_info("y", h, [4])], [k]
    )
    x = np.array([0.3, 0.1, 0.2, 0.05], np.float16)
    np.testing.assert_array_equal(run(model, {"x": x})[0], x)


def test_a_model_past_2_gb_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The search runs the model from memory; past protobuf's limit (lowered here) that is exit 4, not a crash."""
    from qconvert import io

    model = save(conv_model(cout=32, cin=16), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    result = CliRunner().invoke(cli, ["float16", str(model), "-o", str(tmp_path / "h.onnx")])
    assert result.exit_code == 4 and "under 2 GB" in result.output and not (tmp_path / "h.onnx").exists()
