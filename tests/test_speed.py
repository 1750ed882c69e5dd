"""`--optimize speed`: layers kept float where that runs faster at no loss of output SNR (`qconvert.speed`).
Timings are the machine's: the tests fix them (monkeypatched) and check what is built and chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qconvert
from qconvert import speed
from qconvert.cli import cli
from qconvert.errors import UsageError
from qconvert.plan import LinearPlan


def timed(times: dict[str, float]):
    def medians(sessions, feed, runs):
        assert set(sessions) <= set(times) and runs == speed.RUNS
        return {family: times[family] for family in sessions}

    return medians


def convert(digits: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch, times: dict[str, float]):
    monkeypatch.setattr(speed, "medians", timed(times))
    return qconvert.linear(digits, calibration=digits_data, data=digits_data, optimize="speed")


def test_the_fastest_candidate_is_built_with_its_layers_float(digits, digits_data, monkeypatch):
    times = {"none": 10.0, "small": 9.0, "all but 1x1 and matrix products": 5.0}
    result = convert(digits, digits_data, monkeypatch, times)
    chosen = result.report.details["activation_ranges"]["speed"]
    assert chosen["chosen"] == "all but 1x1 and matrix products"
    floated = set(chosen["floated"])
    assert floated and {c["float"] for c in chosen["candidates"]} <= set(times)
    model = result.model
    stored = {t.name: t for t in model.graph.initializer}
    for name in floated:  # a float initializer with its integer grid's values, read by a float Conv
        assert stored[name].data_type == onnx.TensorProto.FLOAT
        assert not any(n.op_type == "DequantizeLinear" and n.output[0] == name for n in model.graph.node)
    full = qconvert.linear(digits, calibration=digits_data, data=digits_data)
    assert len(model.graph.node) < len(full.model.graph.node)  # fewer Quantize/DequantizeLinear pairs
    snr = {c["float"]: c["snr_db"] for c in chosen["candidates"]}
    assert snr[chosen["chosen"]] >= snr["none"] - speed.TOLERANCE_DB
    sess = ort.InferenceSession(result.model_bytes, providers=["CPUExecutionProvider"])
    x = np.load(digits_data)
    x = x[[k for k in x.files if k != "labels"][0]][:4]
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()


def test_no_candidate_within_the_margin_keeps_every_layer_quantized(digits, digits_data, monkeypatch):
    times = {"none": 10.0, "small": 9.9, "all but 1x1 and matrix products": 9.8}
    result = convert(digits, digits_data, monkeypatch, times)
    chosen = result.report.details["activation_ranges"]["speed"]
    assert chosen["chosen"] == "none" and chosen["floated"] == []
    full = qconvert.linear(digits, calibration=digits_data, data=digits_data)
    assert result.model_bytes == full.model_bytes


def test_a_faster_candidate_that_loses_snr_is_not_kept(digits, digits_data, monkeypatch):
    real = speed._worst_snr

    def worse_without_quantizing(model, held, reference):  # pretend floating layers costs 10 dB
        value = real(model, held, reference)
        floated = sum(t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 4 for t in model.graph.initializer)
        return value - 10.0 if floated else value

    monkeypatch.setattr(speed, "_worst_snr", worse_without_quantizing)
    times = {"none": 10.0, "small": 5.0, "all but 1x1 and matrix products": 5.0}
    result = convert(digits, digits_data, monkeypatch, times)
    assert result.report.details["activation_ranges"]["speed"]["chosen"] == "none"


def test_speed_needs_full_qdq(tmp_path: Path, digits: Path):
    with pytest.raises(UsageError, match="full QDQ"):
        LinearPlan(optimize="speed")
    with pytest.raises(UsageError, match="size or speed"):
        LinearPlan(calibration=tmp_path / "c.npz", optimize="fast")
    result = CliRunner().invoke(cli, ["linear", str(digits), "--optimize", "speed", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "full QDQ" in result.output
