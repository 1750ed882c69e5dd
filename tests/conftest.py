"""Shared fixtures: tiny models built with onnx.helper, and the committed samples."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"
sys.path.insert(0, str(SAMPLES))


def conv_model(
    *,
    cout: int = 16,
    cin: int = 8,
    k: int = 3,
    opset: int = 13,
    dtype: type = np.float32,
    weight_in_constant: bool = False,
    seed: int = 0,
) -> onnx.ModelProto:
    """x[1, cin, 8, 8] -> Conv(w[cout, cin, k, k], bias) -> Relu -> y."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((cout, cin, k, k)) * 0.1).astype(dtype)
    b = (rng.standard_normal(cout) * 0.1).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[k // 2] * 4),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    inits = [numpy_helper.from_array(b, "b")]
    if weight_in_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", elem, [1, cin, 8, 8])],
        [helper.make_tensor_value_info("y", elem, [1, cout, 8, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7 if opset < 21 else 10
    return model


def save_gemm(w: np.ndarray, path) -> None:
    """x -> Gemm(w [O, I], transB) -> y, opset 13."""
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", w.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", w.shape[0]])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


@pytest.fixture
def no_opset_21(monkeypatch: pytest.MonkeyPatch) -> None:
    """The version converter refuses opset 21 and above, as it does on some models (ddddocr's CRNN fails the
    ONNX checker there), and converts to lower ones."""
    from qconvert.errors import UnsupportedModelError
    from qconvert.methods import driver

    real = driver.raise_opset

    def refuse(model: onnx.ModelProto, target: int, **kwargs: bool) -> onnx.ModelProto:
        if target >= 21:
            raise UnsupportedModelError("the model converted to opset 21 fails the ONNX checker: (as a test)")
        return real(model, target, **kwargs)

    monkeypatch.setattr(driver, "raise_opset", refuse)


@pytest.fixture
def digits() -> Path:
    return SAMPLES / "digits_cnn.onnx"


@pytest.fixture
def digits_data() -> Path:
    return SAMPLES / "digits_test.npz"


@pytest.fixture
def make_tensor():
    def build(array: np.ndarray, name: str) -> TensorProto:
        return numpy_helper.from_array(array, name)

    return build
