"""Bad and awkward inputs: each gets a documented exit code and one line; inputs stay untouched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert.cli import cli
from qconvert.errors import ExitCode

from conftest import ROOT, conv_model, save


def invoke(*args: object) -> click.testing.Result:  # noqa: F821
    return CliRunner().invoke(cli, [str(a) for a in args])


def files(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def check_contract(result, code: int, words: str, folder: Path, before: dict[str, str]) -> None:
    assert result.exit_code == code, result.output
    assert words in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.output
    assert files(folder) == before  # input untouched, no output, no temp file


def with_external_data(folder: Path) -> Path:
    """A small conv model saved as m.onnx with its weights in m.data beside it."""
    onnx.save(
        conv_model(cin=64, cout=64),
        str(folder / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    return folder / "m.onnx"


def test_truncated_model(tmp_path: Path) -> None:
    data = conv_model(cin=16, cout=32).SerializeToString()
    (tmp_path / "m.onnx").write_bytes(data[: len(data) // 2])
    before = files(tmp_path)
    check_contract(invoke("kmeans", tmp_path / "m.onnx", "--bits", "4"), ExitCode.INPUT, "m.onnx", tmp_path, before)


def test_protobuf_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "t.onnx").write_bytes(numpy_helper.from_array(np.ones((4, 4), np.float32), "t").SerializeToString())
    before = files(tmp_path)
    check_contract(
        invoke("kmeans", tmp_path / "t.onnx", "--bits", "4"), ExitCode.INPUT, "not an ONNX model", tmp_path, before
    )


def test_model_failing_the_checker(tmp_path: Path) -> None:
    model = conv_model(cin=16, cout=32)
    model.graph.node[1].input[0] = "dangling"
    save(model, tmp_path / "m.onnx")
    before = files(tmp_path)
    check_contract(
        invoke("kmeans", tmp_path / "m.onnx", "--bits", "4"), ExitCode.INPUT, "invalid ONNX model", tmp_path, before
    )


def test_external_data_file_missing(tmp_path: Path) -> None:
    model = conv_model(cin=64, cout=64)
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    (tmp_path / "m.data").unlink()
    before = files(tmp_path)
    check_contract(invoke("kmeans", tmp_path / "m.onnx", "--bits", "4"), ExitCode.INPUT, "m.onnx", tmp_path, before)


def test_external_data_linked_from_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """An untrusted model must not read files outside its folder, even with --no-validate (onnxruntime would
    refuse it, but qconvert reads weights itself): a symbolic link that leaves the folder is an input error."""
    model_dir, secret = tmp_path / "model", tmp_path / "secret"
    model_dir.mkdir()
    secret.mkdir()
    onnx.save(
        conv_model(cin=64, cout=64),
        str(secret / "m.onnx"),
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    (secret / "m.onnx").rename(model_dir / "m.onnx")
    (model_dir / "m.data").symlink_to(secret / "m.data")
    before = files(model_dir)
    result = invoke("kmeans", model_dir / "m.onnx", "--bits", "4", "--no-validate", "-o", model_dir / "q.onnx")
    check_contract(result, ExitCode.INPUT, "outside the model's folder", model_dir, before)
    # A link that stays inside the folder is followed, as onnxruntime follows it.
    (model_dir / "m.data").unlink()
    (secret / "m.data").rename(model_dir / "real.data")
    (model_dir / "m.data").symlink_to(model_dir / "real.data")
    assert invoke("kmeans", model_dir / "m.onnx", "--bits", "4", "-o", model_dir / "q.onnx").exit_code == 0


def test_model_and_external_data_get_the_same_usual_permissions(tmp_path: Path) -> None:
    with_external_data(tmp_path)
    old = os.umask(0o022)
    try:
        result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx")
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    modes = {name: (tmp_path / name).stat().st_mode & 0o777 for name in ("q.onnx", "q.onnx.data", "q.report.json")}
    assert modes == dict.fromkeys(modes, 0o644)


def test_opset_older_than_supported(tmp_path: Path) -> None:
    save(conv_model(cin=16, cout=32, opset=5), tmp_path / "m.onnx")
    before = files(tmp_path)
    check_contract(
        invoke("kmeans", tmp_path / "m.onnx", "--bits", "4"),
        ExitCode.UNSUPPORTED,
        "opset 5 is older than 7",
        tmp_path,
        before,
    )


def custom_op_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Mystery", ["h"], ["y"], domain="com.example"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13), helper.make_opsetid("com.example", 1)])


def test_custom_domain_ops_fail_validation_unless_allowed(tmp_path: Path) -> None:
    save(custom_op_model(), tmp_path / "m.onnx")
    before = files(tmp_path)
    check_contract(
        invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx"),
        ExitCode.UNSUPPORTED,
        "cannot load the input model",
        tmp_path,
        before,
    )
    result = invoke(
        "kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--allow-unvalidated", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["validation"] is None and any("not validated" in w for w in report["warnings"])
    assert (tmp_path / "q.onnx").exists()


def test_nan_weights_are_left_alone_and_reported(tmp_path: Path) -> None:
    model = conv_model(cin=16, cout=32)
    w = numpy_helper.to_array(model.graph.initializer[1]).copy()
    w[0, 0, 0, 0] = np.nan
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(w, "w"))
    save(model, tmp_path / "m.onnx")
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "--no-validate")
    assert result.exit_code == ExitCode.UNSUPPORTED
    assert "NaN or Inf" in result.stderr


def test_bf16_weights_keep_bf16(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 64])],
        [numpy_helper.from_array(w, "w")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--no-validate", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["per_weight"][0]["dtype"] == "bfloat16"
    codebook = next(t for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer if t.name.endswith("codebook"))
    assert codebook.data_type == TensorProto.BFLOAT16


def test_multi_input_multi_output_with_int64_input(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"]),
            helper.make_node("MatMul", ["emb", "w"], ["y1"]),
            helper.make_node("MatMul", ["x", "w"], ["y2"]),
        ],
        "g",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 48]),
        ],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["n", 48]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["n", 48]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((10, 48)).astype(np.float32), "table"),
            numpy_helper.from_array(rng.standard_normal((48, 48)).astype(np.float32), "w"),
        ],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    result = invoke(
        "kmeans", tmp_path / "m.onnx", "--bits", "6", "--input-shape", "ids=3", "--input-shape", "x=3x48", "--json"
    )
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout)["validation"]["outputs"]
    assert [o["name"] for o in outputs] == ["y1", "y2"] and all(o["snr_db"] > 25 for o in outputs)


def test_disk_full_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    before = files(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx")
    check_contract(result, ExitCode.OUTPUT, "No space left on device", tmp_path, before)


def test_internal_errors_are_one_line_unless_debug(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qconvert.methods.kmeans

    save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("simulated bug")

    monkeypatch.setattr(qconvert.methods.kmeans, "encode_palettes", broken)
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4")
    assert result.exit_code == ExitCode.INTERNAL
    assert "internal error: ZeroDivisionError: simulated bug" in result.stderr and "Traceback" not in result.stderr
    result = CliRunner().invoke(cli, ["--debug", "kmeans", str(tmp_path / "m.onnx"), "--bits", "4"])
    assert result.exit_code == ExitCode.INTERNAL and "Traceback" in result.stderr


def test_sigint_exits_130_without_partial_output(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "samples"))
    from cnn_shapes import resnet

    save(resnet(width=32, blocks=(2, 2, 2, 2), classes=100, size=64), tmp_path / "m.onnx")
    before = files(tmp_path)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qconvert",
            "kmeans",
            str(tmp_path / "m.onnx"),
            "--bits",
            "8",
            "-o",
            str(tmp_path / "q.onnx"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)  # imports done, converting
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == ExitCode.INTERRUPTED, stderr
    assert stderr.strip() == "qconvert: error: interrupted"
    assert files(tmp_path) == before


def test_weight_also_read_by_a_non_weight_consumer(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("ReduceSum", ["w"], ["norm"], keepdims=0)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 32])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("norm", TensorProto.FLOAT, []),
        ],
        [numpy_helper.from_array(w, "w")],
    )
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    (weight,) = json.loads(result.stdout)["per_weight"]
    assert "also read by ReduceSum" in weight["note"]


def test_nhwc_input(tmp_path: Path) -> None:
    model = conv_model(cin=16, cout=32)
    graph = model.graph
    graph.node.insert(0, helper.make_node("Transpose", ["x_nhwc"], ["x"], perm=[0, 3, 1, 2]))
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x_nhwc", TensorProto.FLOAT, [1, 8, 8, 16]))
    save(model, tmp_path / "m.onnx")
    result = invoke("linear", tmp_path / "m.onnx", "--per-channel", "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["validation"]["outputs"][0]["snr_db"] > 30


def test_unwritable_output_location(tmp_path: Path) -> None:
    save(conv_model(cin=16, cout=32), tmp_path / "m.onnx")
    before = files(tmp_path)
    check_contract(
        invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", "/proc/q.onnx"),
        ExitCode.OUTPUT,
        "cannot write",
        tmp_path,
        before,
    )


def test_raising_the_opset_converts_like_the_version_converter_without_copying_the_weights() -> None:
    """The converter sees a skeleton; the result is what it gives for the whole model (ReduceMean's
    axes move to an input at 18), with the weights kept in place."""
    from onnx import version_converter

    from qconvert.opset import raise_opset

    model = conv_model(cin=64, cout=64, opset=11)
    graph = model.graph
    graph.node.append(helper.make_node("ReduceMean", ["y"], ["m"], axes=[2, 3], keepdims=1))
    graph.node.append(helper.make_node("Reshape", ["m", "shape"], ["z"]))
    graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "shape"))
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 64]))
    onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    expected = version_converter.convert_version(model, 21)
    expected.ir_version = 10
    del expected.graph.value_info[:]  # the types it infers are not kept: the input recorded none

    converted = raise_opset(model, 21)
    assert model.SerializeToString() == before  # keep_input: a converted copy
    assert converted.SerializeToString() == expected.SerializeToString()
    reduce = next(n for n in converted.graph.node if n.op_type == "ReduceMean")
    assert len(reduce.input) == 2 and [a.name for a in reduce.attribute] == ["keepdims"]
    onnx.checker.check_model(converted, full_check=True)
    weight = model.graph.initializer[0]
    moved = raise_opset(model, 21, keep_input=False)  # in place: one copy of the weights, not two
    assert moved is model and model.graph.initializer[0] is weight
    assert moved.SerializeToString() == expected.SerializeToString()


def test_external_data_model_converts_and_counts_its_data(tmp_path: Path) -> None:
    with_external_data(tmp_path)
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["input"]["bytes"] == (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.data").stat().st_size
    assert report["size_ratio"] < 0.2
    # Written as it came: weights in a data file named after the output, next to it; nothing else left over.
    data = tmp_path / "q.onnx.data"
    assert report["output"]["data"] == str(data)
    assert report["output"]["bytes"] == (tmp_path / "q.onnx").stat().st_size + data.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.data", "m.onnx", "q.onnx", "q.onnx.data", "q.report.json"]
    stored = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    assert any(t.external_data for t in stored.graph.initializer)
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((1, 64, 8, 8)).astype(np.float32)
    want, got = (ort.InferenceSession(str(tmp_path / name)).run(None, {"x": x})[0] for name in ("m.onnx", "q.onnx"))
    assert 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)) > 15


def test_models_over_2gb_are_written_with_external_data_and_never_to_stdout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 2 GB protobuf limit, lowered to a few bytes: a single-file input comes out as model + data file;
    a failed gate leaves neither (nor the staging folder); stdout cannot take two files."""
    from qconvert import io

    save(conv_model(cin=64, cout=64), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    result = invoke(
        "kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--min-snr", "99", "--json"
    )
    assert result.exit_code == ExitCode.GATE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.report.json"]
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", tmp_path / "q.onnx", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"]["data"] == str(tmp_path / "q.onnx.data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "q.onnx", "q.onnx.data", "q.report.json"]
    before = files(tmp_path)
    result = invoke("kmeans", tmp_path / "m.onnx", "--bits", "4", "-o", "-")
    check_contract(result, ExitCode.USAGE, "needs an output file", tmp_path, before)


def test_big_models_are_validated_without_folding_and_the_same_metrics(
    tmp_path: Path, digits: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past FOLD_LIMIT the converted model runs unoptimized (weights decoded at use, not all at load):
    the outputs are the same, only latency is not measured."""
    from qconvert import pipeline
    from qconvert.plan import KMeansPlan, ValidationPlan

    plan, validation = KMeansPlan(bits=4), ValidationPlan(data=digits_data)
    folded = pipeline.convert(digits, None, plan, validation).report
    monkeypatch.setattr(pipeline, "FOLD_LIMIT", 0)
    unfolded = pipeline.convert(digits, None, plan, validation).report
    assert unfolded.validation.outputs[0].snr_db == pytest.approx(folded.validation.outputs[0].snr_db, abs=1e-3)
    assert unfolded.validation.accuracy == folded.validation.accuracy
    assert folded.latency_ms is not None and unfolded.latency_ms is None
    assert any("without onnxruntime's graph optimizations" in w for w in unfolded.warnings)
