"""Property-based tests of the quantizers (hypothesis) and a seeded fuzz test of the CLI contract."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from qconvert.cli import cli
from qconvert.errors import ExitCode
from qconvert.quant.kmeans import palettize, reconstruct
from qconvert.quant.linear import dequantize, grid_for, quantize

from conftest import conv_model

BOUND = float(np.float32(1e30))
finite = st.floats(min_value=-BOUND, max_value=BOUND, allow_nan=False, allow_infinity=False, width=32)
scales = st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30])


@st.composite
def weight_rows(draw: st.DrawFn) -> np.ndarray:
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 300))
    kind = draw(st.sampled_from(["any", "normal", "constant", "few"]))
    if kind == "any":
        return draw(arrays(np.float32, (rows, cols), elements=finite))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(scales)
    if kind == "normal":
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
    if kind == "constant":
        return np.full((rows, cols), np.float32(draw(finite)))
    return rng.choice(rng.standard_normal(3) * scale, size=(rows, cols)).astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(weight_rows(), st.integers(1, 8))
def test_kmeans_properties(rows: np.ndarray, bits: int) -> None:
    palette = palettize(rows, bits=bits)
    assert palette.indices.shape == rows.shape and int(palette.indices.max()) < (1 << bits)
    rebuilt = reconstruct(palette).astype(np.float64)
    assert np.all(np.isfinite(rebuilt))
    r64 = rows.astype(np.float64)
    # every value lies within its row's range, and the error never exceeds the row's span
    assert np.all(rebuilt >= r64.min(axis=1, keepdims=True) - 1e-6 * np.abs(r64).max())
    assert np.all(np.abs(rebuilt - r64) <= (r64.max(axis=1) - r64.min(axis=1))[:, None] * (1 + 1e-6) + 1e-30)
    for c in range(rows.shape[0]):  # at most 2**bits distinct values: exact
        if np.unique(rows[c]).size <= (1 << bits):
            np.testing.assert_array_equal(reconstruct(palette)[c], rows[c])
    again = palettize(rows.copy(), bits=bits)
    np.testing.assert_array_equal(again.indices, palette.indices)


@settings(max_examples=200, deadline=None)
@given(weight_rows(), st.sampled_from([4, 8]), st.booleans())
def test_linear_properties(rows: np.ndarray, bits: int, symmetric: bool) -> None:
    grid = grid_for(rows, bits=bits, symmetric=symmetric)
    assert np.all(grid.scale > 0) and np.all(np.isfinite(grid.scale))
    q = quantize(rows, grid)
    assert q.min() >= grid.qmin and q.max() <= grid.qmax
    zero = dequantize(quantize(np.zeros((rows.shape[0], 1), np.float32), grid), grid)
    np.testing.assert_array_equal(zero, 0.0)
    error = np.abs(dequantize(q, grid).astype(np.float64) - rows.astype(np.float64))
    step = grid.scale.astype(np.float64)[:, None]
    # half a step, plus float32 rounding of the dequantized value itself
    assert np.all(error <= step / 2 * (1 + 1e-5) + np.abs(rows.astype(np.float64)) * 2e-7 + 1e-37)


def test_fuzzed_model_bytes_keep_the_contract(tmp_path: Path) -> None:
    """Mutated models: every run ends with a documented exit code, one line on error, input intact."""
    valid = conv_model(cin=16, cout=32).SerializeToString()
    rng = np.random.default_rng(20261126)
    documented = {int(c) for c in ExitCode} - {ExitCode.INTERNAL, ExitCode.INTERRUPTED}
    runner = CliRunner()
    codes = []
    for case in range(60):
        data = bytearray(valid)
        for _ in range(int(rng.integers(1, 8))):
            kind = rng.integers(3)
            at = int(rng.integers(len(data)))
            if kind == 0:
                data[at] = int(rng.integers(256))
            elif kind == 1:
                del data[at : at + int(rng.integers(1, 16))]
            else:
                data[at:at] = rng.bytes(int(rng.integers(1, 16)))
        path = tmp_path / f"case{case}.onnx"
        path.write_bytes(bytes(data))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out = tmp_path / f"case{case}.out.onnx"
        result = runner.invoke(cli, ["kmeans", str(path), "--bits", "3", "-o", str(out), "--samples", "1"])
        codes.append(result.exit_code)
        assert result.exit_code in documented, (case, result.output)
        assert "Traceback" not in result.output
        if result.exit_code != 0:
            assert result.stderr.strip().count("\n") == 0 and not out.exists()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left
    assert len(set(codes)) >= 2  # the mutations reach more than one outcome
