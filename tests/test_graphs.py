"""Awkward graph layouts end to end: subgraphs, IR 3 initializer inputs, recurrent weights."""

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
from qconvert.select import select_weights

from conftest import save


def if_model() -> onnx.ModelProto:
    """y = cond ? Conv(x, w_then) : Conv(x, w_outer); w_then lives in the branch, w_outer outside."""
    rng = np.random.default_rng(0)

    def branch(name: str, weight: str, inits: list[onnx.TensorProto]) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", weight], [f"{name}_y"], pads=[1, 1, 1, 1])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 32, 6, 6])],
            inits,
        )

    w_then = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w_then")
    w_outer = numpy_helper.from_array(rng.standard_normal((32, 16, 3, 3)).astype(np.float32), "w_outer")
    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=branch("then", "w_then", [w_then]),
                else_branch=branch("else", "w_outer", []),
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 6, 6]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32, 6, 6])],
        [w_outer],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    return model


def test_weights_in_and_around_if_branches(tmp_path: Path) -> None:
    model = save(if_model(), tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["kmeans", str(model), "--bits", "3", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {w["name"]: w["graph"].split("/")[0] for w in report["per_weight"]} == {"w_outer": "main", "w_then": "main"}
    assert any("then_branch" in w["graph"] for w in report["per_weight"])
    written = onnx.load(str(out))
    then_branch = written.graph.node[-1].attribute[0].g
    assert not [t for t in then_branch.initializer if t.name == "w_then"]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 16, 6, 6)).astype(np.float32)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        got, want = session.run(None, feed)[0], reference.run(None, feed)[0]
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95  # close, yet quantized
        assert not np.array_equal(got, want)


def test_ir3_initializer_inputs_are_dropped_with_their_weight(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 64]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 8)])
    model.ir_version = 3
    path = save(model, tmp_path / "m.onnx")
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(cli, ["kmeans", str(path), "--bits", "4", "--keep-opset", "-o", str(out)])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert [i.name for i in written.graph.input] == ["x"]
    onnx.checker.check_model(written, full_check=True)


def test_recurrent_weights_are_selected_along_the_gate_axis() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((1, 4 * 32, 16)).astype(np.float32)
    r = rng.standard_normal((1, 4 * 32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("LSTM", ["x", "W", "R"], ["y"], hidden_size=32)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 32])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    weights = {x.name: x.channel_axis for x in select_weights(model).weights}
    assert weights == {"W": 1, "R": 1}


def test_checks_beside_the_model_run_as_soon_as_their_tensor_exists(tmp_path: Path) -> None:
    """add_after places read-only checks so that onnxruntime runs each right after its tensor's
    producer (and can free the tensor), not after the whole model: measured in onnxruntime's profile."""
    from qconvert.rewrite import After, NameSource, add_after

    chain = [helper.make_node("Relu" if i % 2 else "Neg", [f"t{i}"], [f"t{i + 1}"], name=f"main{i}") for i in range(8)]
    graph = helper.make_graph(
        chain,
        "g",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [64, 64])],
        [helper.make_tensor_value_info("t8", TensorProto.FLOAT, [64, 64])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    fresh = NameSource(model)
    add_after(
        model.graph,
        {
            f"t{i}": After([helper.make_node("ReduceMax", [f"t{i}"], [fresh(f"m{i}")], keepdims=0, name=f"check{i}")])
            for i in range(8)
        },
    )
    model.graph.output.extend(helper.make_tensor_value_info(f"m{i}", TensorProto.FLOAT, []) for i in range(8))
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    sess.run(None, {"t0": np.ones((64, 64), np.float32)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    order = [
        e["name"].removesuffix("_kernel_time")
        for e in sorted(events, key=lambda e: e["ts"])
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    ]
    assert sorted(order) == sorted([*(f"main{i}" for i in range(8)), *(f"check{i}" for i in range(8))])
    for i in range(1, 7):  # t_i is checked before the node after its reader runs: t_i can be freed on time
        assert order.index(f"check{i}") < order.index(f"main{i + 1}"), order


@pytest.mark.parametrize("ir_version", [3, 7])
def test_batchnorm_folds_in_models_that_list_initializers_as_inputs(
    tmp_path: Path, digits: Path, digits_data: Path, ir_version: int
) -> None:
    """Old exporters (keep_initializers_as_inputs) list every weight as a graph input: a folded BN's
    parameters must leave the inputs with their initializers, or they become required inputs."""
    model = onnx.load(str(digits))
    listed = {i.name for i in model.graph.input}
    model.graph.input.extend(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in model.graph.initializer
        if t.name not in listed
    )
    model.ir_version = ir_version
    path = save(model, tmp_path / "old.onnx")
    for args in (
        ["kmeans", "--bits", "4"],
        ["kmeans", "--bits", "4", "--data", str(digits_data)],
        ["linear", "--calibration", str(digits_data)],
    ):
        out = tmp_path / "q.onnx"
        result = CliRunner().invoke(cli, [args[0], str(path), *args[1:], "-o", str(out), "--json"])
        assert result.exit_code == 0, (args, result.output)
        assert json.loads(result.stdout)["details"]["folded_batchnorm"]
        written = onnx.load(str(out))
        initializers = {t.name for t in written.graph.initializer}
        assert [i.name for i in written.graph.input if i.name not in initializers] == ["input"]
        onnx.checker.check_model(written, full_check=True)


def test_full_qdq_decodes_at_load_the_weights_no_integer_kernel_reads(tmp_path: Path) -> None:
    """An LSTM runs float in a full QDQ graph: a DequantizeLinear on its weights would run on every
    inference (0.7 ms of ddddocr's 5.5). They keep their integers, decoded by ops onnxruntime folds at
    load, to the values DequantizeLinear gives; the Gemm before them still runs an integer kernel."""
    import qconvert

    rng = np.random.default_rng(0)
    arrays = {
        "G": rng.standard_normal((16, 16)).astype(np.float32),
        "W": rng.standard_normal((1, 4 * 32, 16)).astype(np.float32),
        "R": rng.standard_normal((1, 4 * 32, 32)).astype(np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "G"], ["g"], transB=1),
            helper.make_node("Unsqueeze", ["g", "axes"], ["s"]),
            helper.make_node("LSTM", ["s", "W", "R"], ["y"], hidden_size=32),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 1, 32])],
        [*(numpy_helper.from_array(a, n) for n, a in arrays.items()), numpy_helper.from_array(np.array([1]), "axes")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    data = {"x": rng.standard_normal((40, 16)).astype(np.float32)}
    full = qconvert.linear(path, calibration=data, validate=False)
    weights_only = qconvert.linear(path, validate=False)
    assert full.report.details["decoded_at_load"] == ["R", "W"]
    from qconvert.render.sections import notes

    assert "decoded at load, as no integer kernel reads them: 2 weights (R, W)" in notes(full.report)
    dequantized = {n.output[0] for n in full.model.graph.node if n.op_type == "DequantizeLinear"}
    assert "G" in dequantized and not dequantized & {"R", "W"}

    def values(model: onnx.ModelProto) -> list[np.ndarray]:
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in ("W", "R"))
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(["W", "R"], {"x": data["x"][:5]})

    for got, want in zip(values(full.model), values(weights_only.model)):
        assert np.array_equal(got, want)
