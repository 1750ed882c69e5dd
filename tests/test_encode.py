"""Encoding: onnxruntime decodes exactly the numpy reconstruction, for every bit width and layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qconvert.encode import EncodedWeight, IndexStorage, encode_palettes, pack_indices
from qconvert.methods import METHODS
from qconvert.quant.kmeans import palettize, reconstruct
from qconvert.quant.layout import from_rows, to_rows
from qconvert.select import select_weights


def weight_model(
    op: str, shape: tuple[int, ...], opset: int, *, constant: bool = False, dtype: type = np.float32
) -> onnx.ModelProto:
    """x -> op(x, w) -> y, plus w -> Identity -> w_out so the decoded weight can be read back."""
    w = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    cin = shape[1] if op == "Conv" else shape[0]
    cout = shape[0] if op == "Conv" else shape[1]
    out_hw = 3 if op == "Conv" else 7
    nodes = [helper.make_node(op, ["x", "w"], ["y"]), helper.make_node("Identity", ["w"], ["w_out"])]
    inits = []
    if constant:
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w")))
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", elem, [1, cin, 5, 5])],
        [
            helper.make_tensor_value_info("y", elem, [1, cout, out_hw, out_hw]),
            helper.make_tensor_value_info("w_out", elem, list(shape)),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def run_round_trip(
    model: onnx.ModelProto, bits: int, per_channel: bool, storage: IndexStorage
) -> tuple[np.ndarray, np.ndarray, onnx.ModelProto]:
    (weight,) = select_weights(model).weights
    array = weight.array()
    axis = weight.channel_axis if per_channel else None
    palette = palettize(to_rows(array, axis), bits=bits)
    expected = from_rows(reconstruct(palette), array.shape, axis)
    encode_palettes(model, [EncodedWeight(weight, palette, axis, bits, storage)])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.zeros(session.get_inputs()[0].shape, array.dtype)
    (decoded,) = session.run(["w_out"], {"x": x})
    return decoded, expected, model


CASES = [(b, IndexStorage.PACKED, 13) for b in (1, 2, 3, 4, 5, 6)] + [
    (2, IndexStorage.UINT2, 25),
    (4, IndexStorage.UINT4, 21),
    (7, IndexStorage.UINT8, 13),
    (8, IndexStorage.UINT8, 13),
    (3, IndexStorage.PACKED, 11),  # ReduceSum with the axes attribute
    (8, IndexStorage.UINT8, 9),
]


@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize(("bits", "storage", "opset"), CASES, ids=[f"{b}bit-{s.value}-op{o}" for b, s, o in CASES])
def test_onnxruntime_decodes_the_numpy_reconstruction(
    bits: int, storage: IndexStorage, opset: int, per_channel: bool
) -> None:
    decoded, expected, _ = run_round_trip(weight_model("Conv", (6, 4, 3, 3), opset), bits, per_channel, storage)
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("storage", [IndexStorage.UINT4, IndexStorage.PACKED])
def test_conv_transpose_per_channel_uses_axis_one(storage: IndexStorage) -> None:
    model = weight_model("ConvTranspose", (4, 6, 3, 3), 21)
    decoded, expected, _ = run_round_trip(model, 4, True, storage)
    np.testing.assert_array_equal(decoded, expected)
    offsets = next(t for t in model.graph.initializer if "channel_offsets" in t.name)
    assert list(offsets.dims) == [1, 6, 1, 1]


def test_constant_node_weight_is_replaced() -> None:
    decoded, expected, model = run_round_trip(
        weight_model("Conv", (6, 4, 3, 3), 13, constant=True), 3, False, IndexStorage.PACKED
    )
    np.testing.assert_array_equal(decoded, expected)
    assert not any(n.op_type == "Constant" and n.output[0] == "w" for n in model.graph.node)


def test_fp16_weight_keeps_fp16_codebook() -> None:
    decoded, expected, model = run_round_trip(
        weight_model("Conv", (6, 4, 3, 3), 21, dtype=np.float16), 4, True, IndexStorage.UINT4
    )
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded, expected)
    codebook = next(t for t in model.graph.initializer if t.name.endswith("codebook"))
    assert codebook.data_type == TensorProto.FLOAT16


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_pack_indices_layout_and_size(bits: int) -> None:
    indices = np.random.default_rng(bits).integers(0, 1 << bits, size=37).astype(np.uint8)
    packed = pack_indices(indices, bits)
    assert packed.shape == (5, bits)  # ceil(37 / 8) groups of `bits` bytes
    words = packed.astype(np.uint64) @ (np.uint64(256) ** np.arange(bits, dtype=np.uint64))
    unpacked = (words[:, None] >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64((1 << bits) - 1)
    np.testing.assert_array_equal(unpacked.reshape(-1)[:37], indices)


def test_native_uint4_is_stored_at_half_a_byte() -> None:
    _, _, model = run_round_trip(weight_model("Conv", (16, 8, 3, 3), 21), 4, False, IndexStorage.UINT4)
    indices = next(t for t in model.graph.initializer if t.name.endswith("_indices"))
    assert indices.data_type == TensorProto.UINT4
    assert len(indices.raw_data) == 16 * 8 * 9 // 2


def test_stored_bytes_counts_codebook_and_indices() -> None:
    rows = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    palette = palettize(rows, bits=3)
    kmeans = METHODS["kmeans"]
    assert kmeans.data_bytes(palette.indices.size, 4, 4, 3, IndexStorage.PACKED) == 4 * 8 * 4 + 50 * 3
    assert kmeans.data_bytes(palette.indices.size, 4, 4, 3, IndexStorage.UINT8) == 4 * 8 * 4 + 400


def test_onnxruntime_folds_the_decoding_at_load(tmp_path: Path) -> None:
    """The palettized model runs as the float one: Cast/Gather/unpacking are constant-folded away."""
    for storage, opset in ((IndexStorage.UINT4, 21), (IndexStorage.PACKED, 13)):
        model = weight_model("Conv", (6, 4, 3, 3), opset)
        model.graph.output.pop()  # keep only the Conv output, as a real model would
        model.graph.node.pop()
        (weight,) = select_weights(model).weights
        palette = palettize(to_rows(weight.array(), 0), bits=4)
        encode_palettes(model, [EncodedWeight(weight, palette, 0, 4, storage)])
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(tmp_path / f"optimized_{storage.value}.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
        assert [n.op_type for n in optimized.graph.node] == ["Conv"], storage
