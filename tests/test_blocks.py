"""Block-wise linear weights: a scale per B weights along the input axis (DequantizeLinear block_size, opset 21)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qconvert
from qconvert.cli import cli
from qconvert.errors import UsageError
from qconvert.fidelity import gptq
from qconvert.plan import Granularity, LinearPlan
from qconvert.quant.layout import from_rows, per_block, snr_db, to_rows

from conftest import save_gemm


def blocky(rows: int = 64, columns: int = 256, seed: int = 0) -> np.ndarray:
    """Gaussian rows with one outlier each (30 sigma): a scale per channel spends its levels on it, a scale
    per block of 32 only in the outlier's block."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, columns))
    w[np.arange(rows), rng.integers(0, columns, rows)] = 30.0
    return w.astype(np.float32)


def test_block_rows_round_trip_and_lay_out_the_scales_as_onnx_wants():
    array = np.arange(2 * 64 * 3 * 3, dtype=np.float32).reshape(2, 64, 3, 3)
    rows = to_rows(array, 1, 16)
    assert rows.shape == (2 * 3 * 3 * 4, 16)
    np.testing.assert_array_equal(rows[0], array[0, :16, 0, 0])  # B consecutive values along the axis
    np.testing.assert_array_equal(from_rows(rows, array.shape, 1, 16), array)
    scales = per_block(rows[:, 0], array.shape, 1, 16)
    assert scales.shape == (2, 4, 3, 3) and scales[1, 2, 0, 1] == array[1, 32, 0, 1]


def test_forced_blocks_are_a_blocked_dequantize_linear_that_decodes_to_what_was_reported(tmp_path: Path):
    w = blocky()
    save_gemm(w, tmp_path / "m.onnx")
    blocked = qconvert.linear(tmp_path / "m.onnx", bits=4, block_size=32, output=tmp_path / "b.onnx")
    channel = qconvert.linear(tmp_path / "m.onnx", bits=4, block_size=0, output=tmp_path / "c.onnx")
    model = onnx.load(tmp_path / "b.onnx")
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 1, "block_size": 32} and model.opset_import[0].version >= 21
    scale = next(t for t in model.graph.initializer if t.name == dq.input[1])
    assert list(scale.dims) == [64, 256 // 32]
    weight = blocked.report.weights[0]
    assert weight.granularity == "blocked" and weight.groups == 64 * 8
    assert weight.snr_db > channel.report.weights[0].snr_db + 6
    # the file decodes to exactly the values measured: the Gemm on them equals the model's output
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("w"))
    x = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    y, decoded = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ decoded.T, rtol=1e-4, atol=1e-4)
    assert snr_db(w, decoded) == pytest.approx(weight.snr_db, abs=0.01)


def test_int4_weighs_blocks_per_stored_bit(tmp_path: Path):
    """Blocks of 32 cost a bit per weight more than a scale per channel: they are kept where they gain more
    than ~6 dB for it, and the report says what they would have gained where they are not."""
    save_gemm(blocky(), tmp_path / "blocky.onnx")
    gaussian = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    save_gemm(gaussian, tmp_path / "gaussian.onnx")
    chosen = qconvert.linear(tmp_path / "blocky.onnx", bits=4).report.weights[0]
    kept = qconvert.linear(tmp_path / "gaussian.onnx", bits=4).report.weights[0]
    assert chosen.granularity == "blocked"
    assert kept.granularity == "per-channel" and "blocks of 32 gained" in kept.note
    assert qconvert.linear(tmp_path / "blocky.onnx", bits=8).report.weights[0].granularity == "per-channel"


def test_blocks_fall_back_to_per_channel_where_the_opset_cannot_be_raised(tmp_path: Path, no_opset_21):
    save_gemm(blocky(), tmp_path / "m.onnx")
    out = tmp_path / "b.onnx"
    result = CliRunner().invoke(
        cli, ["linear", str(tmp_path / "m.onnx"), "--bits", "4", "--block-size", "32", "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["per_weight"][0]["granularity"] == "per-channel" and "need opset 21" in report["opset"]["note"]
    assert report["opset"]["storage"] == "packed"


def test_error_compensation_rounds_each_weight_to_its_own_block_grid():
    """GPTQ with a grid per weight gives what it gives with the same grid per row when the grids do not
    change along the columns; and with blocks, every result lies on its block's grid."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((1, 8, 64))
    x = rng.standard_normal((256, 64))
    hessian = (x.T @ x)[None]
    step = np.full((1, 8, 1), 0.25)
    low = -7 * step
    per_row = gptq.compensate(weights, hessian, low + np.arange(15) * step)
    grids = gptq.ElementGrids(np.broadcast_to(low, weights.shape), np.broadcast_to(step, weights.shape), 14)
    np.testing.assert_allclose(gptq.compensate(weights, hessian, grids), per_row)
    blocks = np.repeat(rng.uniform(0.05, 0.5, (1, 8, 4)), 16, axis=2)
    rounded = gptq.compensate(weights, hessian, gptq.ElementGrids(-7 * blocks, blocks, 14))
    k = rounded / blocks
    np.testing.assert_allclose(k, np.rint(k), atol=1e-9)
    assert np.abs(np.rint(k)).max() == 7  # the grid has 15 levels: -7..7, and the largest are used


def test_block_size_contradictions_are_usage_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="at least 2"):
        LinearPlan(block_size=1)
    with pytest.raises(UsageError, match="per-tensor"):
        LinearPlan(block_size=32, granularity=Granularity.PER_TENSOR)
    with pytest.raises(UsageError, match="weights-only"):
        LinearPlan(block_size=32, calibration=tmp_path / "c.npz")
    assert LinearPlan(block_size=0, calibration=tmp_path / "c.npz").block_size == 0


def test_calibration_data_compensates_blocked_weights(tmp_path: Path):
    w = blocky(seed=4)
    save_gemm(w, tmp_path / "m.onnx")
    rng = np.random.default_rng(5)
    mix = rng.standard_normal((256, 256)) * 0.3 + np.eye(256)  # correlated inputs: what compensation exploits
    data = tmp_path / "x.npz"
    np.savez(data, x=(rng.standard_normal((512, 256)) @ mix).astype(np.float32))  # more samples than inputs
    plain = qconvert.linear(
        tmp_path / "m.onnx", bits=4, block_size=32, data=data, data_aware=False, bias_correction=False
    )
    aware = qconvert.linear(tmp_path / "m.onnx", bits=4, block_size=32, data=data)
    weight = aware.report.weights[0]
    assert weight.granularity == "blocked" and "error-compensated" in weight.techniques
    assert aware.report.validation.outputs[0].snr_db > plain.report.validation.outputs[0].snr_db
