"""The Python API, through itself: models as paths or ModelProtos, data as files, dicts or feed iterables."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qconvert
from qconvert import io
from qconvert.cli import cli
from qconvert.errors import ExitCode

from conftest import conv_model, save


def test_kmeans_from_a_path_matches_the_command_line(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    result = qconvert.kmeans(digits, bits=4, data=digits_data, min_snr=15)
    assert isinstance(result.model, onnx.ModelProto) and result.report.output_path is None
    assert result.report.passed and result.report.validation is not None and result.report.validation.accuracy
    written = result.save(str(tmp_path / "api.onnx"))  # a str, as users write it
    assert written == tmp_path / "api.onnx" and result.report.output_path == str(written)
    cli_out = tmp_path / "cli.onnx"
    assert (
        CliRunner()
        .invoke(cli, ["kmeans", str(digits), "--bits", "4", "--data", str(digits_data), "-o", str(cli_out), "-q"])
        .exit_code
        == 0
    )
    assert written.read_bytes() == cli_out.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.onnx", "cli.onnx", "cli.report.json"]  # no temp files


class Reader:
    """Like an onnxruntime CalibrationDataReader: get_next() gives a feed dict, then None."""

    def __init__(self, arrays: np.ndarray) -> None:
        self.batches = iter(arrays[i : i + 1] for i in range(len(arrays)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def test_model_protos_dicts_and_readers_give_the_same_model_as_files(
    tmp_path: Path, digits: Path, digits_data: Path
) -> None:
    """Full QDQ from an in-memory model and a reader of calibration feeds: the same bytes as from the files."""
    with np.load(digits_data) as npz:
        inputs, labels = npz["input"], npz["labels"]
    from_files = qconvert.linear(digits, calibration=digits_data, data=digits_data)
    from_memory = qconvert.linear(
        onnx.load(str(digits)), calibration=Reader(inputs), data={"input": inputs}, labels=labels
    )
    assert from_memory.model_bytes == from_files.model_bytes
    assert from_memory.report.input_path == "(in memory)"
    assert from_memory.report.validation is not None and from_files.report.validation is not None
    assert from_memory.report.validation.source == "data (in memory)"  # not a temp path: reports are reproducible
    assert from_memory.report.validation.outputs == from_files.report.validation.outputs
    assert from_memory.report.validation.accuracy == from_files.report.validation.accuracy
    assert "qconvert-" not in from_memory.report.to_json()
    by_iterable = qconvert.linear(
        digits, calibration=[{"input": inputs[:100]}, {"input": inputs[100:]}], validate=False
    )
    assert by_iterable.model_bytes == qconvert.linear(digits, calibration=digits_data, validate=False).model_bytes


def test_typed_errors(tmp_path: Path, digits: Path) -> None:
    with pytest.raises(qconvert.InputError) as missing:
        qconvert.kmeans(tmp_path / "nope.onnx", bits=4)
    assert missing.value.exit_code == ExitCode.INPUT
    with pytest.raises(qconvert.UsageError, match="'bitz'"):
        qconvert.linear(digits, bitz=4)
    with pytest.raises(qconvert.UsageError, match="between 1 and 8"):
        qconvert.kmeans(digits, bits=9)
    with pytest.raises(qconvert.InputError, match="no array named 'input'"):
        qconvert.kmeans(digits, bits=4, data={"x": np.zeros((2, 1, 8, 8), np.float32)})


def test_a_failed_gate_writes_nothing(tmp_path: Path, digits: Path) -> None:
    result = qconvert.kmeans(digits, bits=1, min_snr=60, output=tmp_path / "q.onnx")
    assert not result.report.passed and [g.gate for g in result.report.failed_gates] == ["--min-snr"]
    assert list(tmp_path.iterdir()) == []
    kept = qconvert.kmeans(digits, bits=1, min_snr=60, output=tmp_path / "q.onnx", keep_failed=True)
    assert (tmp_path / "q.onnx").read_bytes() == kept.model_bytes


def test_big_models_are_staged_and_saved_with_their_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 2 GB (the limit lowered here) without an output, the model waits in a temp stage; save() writes
    it under any name as model + data file, atomically, leaving no stage behind."""
    save(conv_model(cin=64, cout=64), tmp_path / "m.onnx")
    monkeypatch.setattr(io, "PROTOBUF_LIMIT", 1000)
    result = qconvert.kmeans(tmp_path / "m.onnx", bits=4)
    assert result.model_bytes is None and result.staged is not None and result.staged.exists()
    stage = result.staged.parent
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    result.save(out)
    assert not stage.exists() and result.report.output_data == str(out.parent / "small.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["small.onnx", "small.onnx.data"]
    x = np.random.default_rng(0).standard_normal((1, 64, 8, 8)).astype(np.float32)
    want, got = (ort.InferenceSession(str(p)).run(None, {"x": x})[0] for p in (tmp_path / "m.onnx", out))
    assert 10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)) > 15


def test_compare_inspect_auto_and_the_renderings(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    converted = qconvert.kmeans(digits, bits=3, data=digits_data)
    report = qconvert.compare(onnx.load(str(digits)), converted.model, data=digits_data, min_top1=0.5)
    assert report.passed and report.input_path == report.output_path == "(in memory)"
    assert report.validation == converted.report.validation
    info = qconvert.inspect(digits, min_elements=1)
    assert info["path"] == str(digits) and {w["name"] for w in info["weights"]} >= {
        w.name for w in converted.report.weights
    }
    chosen = qconvert.auto(digits, target_snr=20, data=digits_data)
    assert chosen.report.passed and chosen.report.details["auto"]["plan"]
    markdown, page = chosen.report.to_markdown(), chosen.report.to_html()
    assert "### qconvert kmeans: passed" in markdown and "<svg" in page
    assert (
        hashlib.sha256(chosen.model_bytes or b"").hexdigest()
        == hashlib.sha256(qconvert.auto(digits, target_snr=20, data=digits_data).model_bytes or b"").hexdigest()
    )  # deterministic
