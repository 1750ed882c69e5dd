"""Loading: large initializers stay in the file (lazy) until a step reads them."""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from qconvert import io
from qconvert.errors import InputError
from qconvert.opset import without_weights
from qconvert.pipeline import convert
from qconvert.plan import KMeansPlan
from qconvert.runtime import model_session

from conftest import conv_model, save


def big_conv(tmp_path: Path) -> Path:
    model = conv_model(cout=64, cin=64)  # w: 64·64·3·3 floats = 147 KB (lazy), b: 256 B (in the message)
    model.graph.doc_string = "kept"
    return save(model, tmp_path / "m.onnx")


def test_large_initializers_load_lazy_and_read_back_exactly(tmp_path: Path) -> None:
    path = big_conv(tmp_path)
    model, size = io.load_model(path)
    tensors = {t.name: t for t in model.graph.initializer}
    assert io.is_lazy(tensors["w"]) and not io.is_lazy(tensors["b"])
    assert not tensors["w"].raw_data and model.ByteSize() < 4096  # the weight is not in memory
    assert size == path.stat().st_size
    original = onnx.load(str(path))
    want = {t.name: onnx.numpy_helper.to_array(t) for t in original.graph.initializer}
    assert io.data_bytes(tensors["w"]) == want["w"].nbytes
    np.testing.assert_array_equal(io.tensor_array(tensors["w"]), want["w"])
    io.materialize(model)
    assert model == original  # every other field, and the order of the initializers, as onnx.load reads them


def test_weights_in_external_data_load_lazy(tmp_path: Path) -> None:
    onnx.save(
        conv_model(cout=64, cin=64),
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    model, size = io.load_model(tmp_path / "m.onnx")
    assert all(io.is_lazy(t) for t in model.graph.initializer)
    assert size == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.data").stat().st_size
    io.materialize(model)
    assert model == onnx.load(str(save(conv_model(cout=64, cin=64), tmp_path / "inline.onnx")))


@pytest.mark.parametrize("data", [None, "weights/m.data"])
def test_a_skeleton_of_a_lazy_model_holds_no_weights_and_runs(tmp_path: Path, data: str | None) -> None:
    """onnxruntime reads the weights where they are in the input files (in the model, or its external data)."""
    path = big_conv(tmp_path)
    if data is not None:
        (tmp_path / "weights").mkdir()
        onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location=data, size_threshold=0)
    model, _ = io.load_model(path)
    skeleton = without_weights(model)
    assert skeleton.ByteSize() < 4096  # holes, filled from the file by model_session
    x = np.random.default_rng(0).standard_normal((1, 64, 8, 8)).astype(np.float32)
    got = model_session(model, "input model").run(None, {"x": x})[0]
    io.materialize(model)
    want = model_session(model, "input model").run(None, {"x": x})[0]  # the weights as arrays
    np.testing.assert_array_equal(got, want)


def test_a_model_file_changed_during_the_conversion_is_an_input_error(tmp_path: Path) -> None:
    path = big_conv(tmp_path)
    model, _ = io.load_model(path)
    lazy = next(t for t in model.graph.initializer if io.is_lazy(t))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # rewritten in place
    with pytest.raises(InputError, match="changed while qconvert was reading it"):
        io.tensor_array(lazy)
    with pytest.raises(InputError, match="changed while qconvert was reading it"):
        model_session(model, "input model")  # onnxruntime would read the file itself
    path.unlink()
    with pytest.raises(InputError, match="cannot read w"):
        io.tensor_array(lazy)


@pytest.mark.parametrize(
    ("location", "message"), [("../m.data", "in the model's folder"), ("m.data", "holds 1000 bytes")]
)
def test_bad_external_data_is_a_one_line_input_error(tmp_path: Path, location: str, message: str) -> None:
    model = conv_model(cout=64, cin=64)
    (tmp_path / "m.data").write_bytes(b"\0" * 1000)
    tensor = next(t for t in model.graph.initializer if t.name == "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    tensor.external_data.add(key="length", value="1000")
    (tmp_path / "sub").mkdir()
    path = save(model, tmp_path / ("sub" if location.startswith("..") else ".") / "m.onnx")
    if location.startswith(".."):
        (tmp_path / "sub" / "m.data").write_bytes(b"")
    with pytest.raises(InputError, match=message):
        io.load_model(path)


def test_a_truncated_file_is_not_a_model(tmp_path: Path) -> None:
    data = big_conv(tmp_path).read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not an ONNX model"):
        io.load_model(tmp_path / "cut.onnx")


def test_weights_left_as_they_were_are_written_from_the_input(tmp_path: Path, digits: Path) -> None:
    out = tmp_path / "q.onnx"
    convert(digits, out, KMeansPlan(bits=4, exclude=("fc1.weight",)), None)
    written = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    original = {t.name: t for t in onnx.load(str(digits)).graph.initializer}
    assert written["fc1.weight"] == original["fc1.weight"]  # its data, not a reference to the input file


def test_a_pipe_is_refused_with_a_pointer_to_standard_input(tmp_path: Path) -> None:
    fifo = tmp_path / "m.onnx"
    os.mkfifo(fifo)

    def write() -> None:  # opening a FIFO to read waits for a writer; the reader may be gone before it writes
        with contextlib.suppress(BrokenPipeError):
            fifo.write_bytes(b"x")

    writer = threading.Thread(target=write)
    writer.start()
    with pytest.raises(InputError, match="not a regular file; .* give -"):
        io.load_model(fifo)
    writer.join()
