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
from qconvert.render.sections import notes


def timed(times: dict[str, float]):
    def medians(sessions, feed, runs):
        assert set(sessions) <= set(times) and runs == speed.RUNS
        return {family: times[family] for family in sessions}

    return medians


def convert(digits: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch, times: dict[str, float]):
    monkeypatch.setattr(speed, "medians", timed(times))
    return qconvert.linear(digits, calibration=digits_data, data=digits_data, optimize="speed")


def test_the_fastest_candidate_is_built_with_its_layers_float(digits, digits_data, monkeypatch):
    times = {"none": 10.0, "small": 9.0, "all but 1x1 and matrix products": 5.0, "all": 6.0}
    result = convert(digits, digits_data, monkeypatch, times)
    chosen = result.report.details["activation_ranges"]["speed"]
    assert chosen["chosen"] == "all but 1x1 and matrix products"
    floated = set(chosen["floated"])
    assert floated and {c["float"] for c in chosen["candidates"]} == set(times)
    model = result.model
    full = qconvert.linear(digits, calibration=digits_data, data=digits_data)
    quantizers = [sum(n.op_type == "QuantizeLinear" for n in m.graph.node) for m in (model, full.model)]
    assert quantizers[0] < quantizers[1]  # fewer activations quantized
    # The floated layers read their integers decoded by ops onnxruntime folds at load, to the same values
    assert not any(n.op_type == "DequantizeLinear" and n.output[0] in floated for n in model.graph.node)
    stored = {t.name: t for t in model.graph.initializer}
    assert all(stored[f"{name}_qc_indices"].data_type == onnx.TensorProto.UINT8 for name in floated)
    assert decoded(model, floated) == decoded(full.model, floated)
    snr = {c["float"]: c["snr_db"] for c in chosen["candidates"]}
    assert snr[chosen["chosen"]] >= snr["none"] - speed.TOLERANCE_DB
    sess = ort.InferenceSession(result.model_bytes, providers=["CPUExecutionProvider"])
    x = np.load(digits_data)
    x = x[[k for k in x.files if k != "labels"][0]][:4]
    assert np.isfinite(sess.run(None, {sess.get_inputs()[0].name: x})[0]).all()


def decoded(model: onnx.ModelProto, names: set[str]) -> dict[str, bytes]:
    """What onnxruntime computes for these weights (their decode nodes' outputs), as bytes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in sorted(names))
    sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32) for i in sess.get_inputs()}
    values = sess.run(sorted(names), feed)
    return {name: value.tobytes() for name, value in zip(sorted(names), values)}


def test_weights_only_is_chosen_where_no_integer_kernel_pays(digits, digits_data, monkeypatch):
    times = {"none": 10.0, "small": 9.9, "all but 1x1 and matrix products": 9.8, "all": 5.0}
    result = convert(digits, digits_data, monkeypatch, times)
    chosen = result.report.details["activation_ranges"]["speed"]
    assert chosen["chosen"] == "all"
    ops = {n.op_type for n in result.model.graph.node}
    assert "QuantizeLinear" not in ops and "DequantizeLinear" not in ops
    assert len(result.model_bytes) < 0.35 * digits.stat().st_size  # the integers are stored, not floats
    assert "optimize speed: layers kept float: all (5), 5 ms a run against 10 ms" in " ".join(notes(result.report))


def test_no_candidate_within_the_margin_keeps_every_layer_quantized(digits, digits_data, monkeypatch):
    times = {"none": 10.0, "small": 9.9, "all but 1x1 and matrix products": 9.8, "all": 9.7}
    result = convert(digits, digits_data, monkeypatch, times)
    chosen = result.report.details["activation_ranges"]["speed"]
    assert chosen["chosen"] == "none" and chosen["floated"] == []
    full = qconvert.linear(digits, calibration=digits_data, data=digits_data)
    assert result.model_bytes == full.model_bytes


def test_a_faster_candidate_that_loses_snr_is_not_kept(digits, digits_data, monkeypatch):
    real = speed._worst_snr

    def worse_without_quantizing(model, held, reference):  # pretend floating layers costs 10 dB
        value = real(model, held, reference)
        floated = any(t.name.endswith("_qc_indices") for t in model.graph.initializer)
        return value - 10.0 if floated else value

    monkeypatch.setattr(speed, "_worst_snr", worse_without_quantizing)
    times = {"none": 10.0, "small": 5.0, "all but 1x1 and matrix products": 5.0, "all": 5.0}
    result = convert(digits, digits_data, monkeypatch, times)
    assert result.report.details["activation_ranges"]["speed"]["chosen"] == "none"


def test_speed_needs_full_qdq(tmp_path: Path, digits: Path):
    with pytest.raises(UsageError, match="full QDQ"):
        LinearPlan(optimize="speed")
    with pytest.raises(UsageError, match="size or speed"):
        LinearPlan(calibration=tmp_path / "c.npz", optimize="fast")
    result = CliRunner().invoke(cli, ["linear", str(digits), "--optimize", "speed", "-o", str(tmp_path / "o.onnx")])
    assert result.exit_code == 2 and "full QDQ" in result.output


def test_the_fidelity_floor_forgives_what_is_far_below_the_outputs():
    assert 29.4 < speed._floor(30.0) < 29.5  # near the outputs: about 0.5 dB
    assert 48.0 < speed._floor(55.0) < 49.0  # at 55 dB, 52 dB is the same fidelity
    assert speed._floor(90.0) == pytest.approx(speed.NEGLIGIBLE_DB, abs=0.01)
    assert speed._floor(None) == np.inf  # an exact full plan: only exact candidates
