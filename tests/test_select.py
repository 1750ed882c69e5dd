"""Weight selection: which tensors, where they live, their channel axis."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconvert.select import select_weights

from conftest import conv_model


def parse(text: str, **arrays: np.ndarray) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return model


def test_axis_per_consumer() -> None:
    rng = np.random.default_rng(0)
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 4, 8, 8] x, float[2, 6] a)
            => (float[1, 6, 8, 8] y1, float[1, 3, 10, 10] y2, float[2, 5] y3, float[2, 7] y4, float[2, 9] y5) {
            y1 = Conv <pads = [1, 1, 1, 1]> (x, wconv)
            y2 = ConvTranspose (x, wdeconv)
            y3 = Gemm <transB = 1> (a, wgemm_t)
            y4 = Gemm (a, wgemm)
            y5 = MatMul (a, wmatmul)
        }
        """,
        wconv=rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
        wdeconv=rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        wgemm_t=rng.standard_normal((5, 6)).astype(np.float32),
        wgemm=rng.standard_normal((6, 7)).astype(np.float32),
        wmatmul=rng.standard_normal((6, 9)).astype(np.float32),
    )
    axes = {w.name: w.channel_axis for w in select_weights(model).weights}
    assert axes == {"wconv": 0, "wdeconv": 1, "wgemm_t": 0, "wgemm": 1, "wmatmul": 1}


def test_biases_bn_statistics_and_shapes_are_not_weights() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[1, 4, 8, 8] x) => (float[1, 64] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            n = BatchNormalization (c, scale, bias, mean, var)
            y = Reshape (n, shape)
        }
        """,
        w=np.ones((4, 4, 3, 3), np.float32),
        b=np.ones(4, np.float32),
        scale=np.ones(4, np.float32),
        bias=np.ones(4, np.float32),
        mean=np.ones(4, np.float32),
        var=np.ones(4, np.float32),
        shape=np.array([1, 64], np.int64),
    )
    assert [w.name for w in select_weights(model).weights] == ["w"]


def test_shared_weight_is_selected_once_with_every_consumer() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 6] a, float[2, 6] b) => (float[2, 6] y, float[2, 6] z) {
            y = MatMul (a, w)
            z = MatMul (b, w)
        }
        """,
        w=np.ones((6, 6), np.float32),
    )
    (weight,) = select_weights(model).weights
    assert [c.op_type for c in weight.consumers] == ["MatMul", "MatMul"]


def test_conflicting_axes_give_no_channel_axis() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 6] a) => (float[2, 6] y, float[2, 6] z) {
            y = MatMul (a, w)
            z = Gemm <transB = 1> (a, w)
        }
        """,
        w=np.ones((6, 6), np.float32),
    )
    (weight,) = select_weights(model).weights
    assert weight.channel_axis is None


def test_constant_node_weight() -> None:
    (weight,) = select_weights(conv_model(weight_in_constant=True)).weights
    assert weight.name == "w" and weight.source == "constant" and weight.shape == (16, 8, 3, 3)


def test_weights_inside_if_branches_and_from_outer_scope() -> None:
    rng = np.random.default_rng(0)
    inner = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    outer = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)

    def branch(name: str, weight: str, with_init: bool) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("Conv", ["x", weight], [f"{name}_y"])],
            name,
            [],
            [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [1, 4, 8, 8])],
            [numpy_helper.from_array(inner, weight)] if with_init else [],
        )

    graph = helper.make_graph(
        [
            helper.make_node(
                "If",
                ["cond"],
                ["y"],
                then_branch=branch("then", "w_inner", True),
                else_branch=branch("else", "w_outer", False),
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(outer, "w_outer")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    found = {w.name: w.graph_path for w in select_weights(model).weights}
    assert found["w_outer"] == "main"
    assert found["w_inner"].startswith("main/") and "then_branch" in found["w_inner"]


def test_skips_small_excluded_and_integer_weights() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 64] a, int8[2, 64] q) => (float[2, 64] y1, float[2, 64] y2, float[2, 4] y3, int8[2, 64] y4) {
            y1 = MatMul (a, big)
            y2 = MatMul (a, head_w)
            y3 = MatMul (a, small)
            y4 = MatMul (q, int_w)
        }
        """,
        big=np.ones((64, 64), np.float32),
        head_w=np.ones((64, 64), np.float32),
        small=np.ones((64, 4), np.float32),
        int_w=np.ones((64, 64), np.int8),
    )
    selection = select_weights(model, min_elements=1024, exclude=("head_*",))
    assert [w.name for w in selection.weights] == ["big"]
    reasons = {s.name: s.reason for s in selection.skipped}
    assert "exclude" in reasons["head_w"]
    assert "min-elements" in reasons["small"]
    assert "not a float" in reasons["int_w"]


def test_dequantized_weights_are_reported_as_already_quantized() -> None:
    model = parse(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2, 64] a) => (float[2, 64] y) {
            w = DequantizeLinear (wq, scale)
            y = MatMul (a, w)
        }
        """,
        wq=np.ones((64, 64), np.int8),
        scale=np.array(0.1, np.float32),
    )
    selection = select_weights(model)
    assert selection.weights == []
    assert "already quantized" in selection.skipped[0].reason


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float_kinds_are_selected(dtype: type) -> None:
    (weight,) = select_weights(conv_model(dtype=dtype)).weights
    assert weight.array().dtype == dtype
