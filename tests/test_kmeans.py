"""The k-means quantizer: optimality against an exact DP, exactness, determinism, layout."""

from __future__ import annotations

import json
import re

import ml_dtypes
import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from qconvert.cli import cli
from qconvert.quant.kmeans import nearest, palettize, palettize_grouped, palettize_scaled, reconstruct
from qconvert.quant.layout import from_rows, snr_db, to_rows

from conftest import save_gemm


def exact_kmeans_mse(values: np.ndarray, k: int, weights: np.ndarray | None = None) -> float:
    """Textbook O(k n^2) dynamic programme over the sorted values: the true 1-D optimum of the mean
    (weighted) squared error, Σ w·(x − c)² / n."""
    order = np.argsort(values, kind="stable")
    x = values.astype(np.float64)[order]
    w = np.ones_like(x) if weights is None else weights.astype(np.float64)[order]
    n = x.size
    c = np.concatenate([[0.0], np.cumsum(w)])
    s = np.concatenate([[0.0], np.cumsum(w * x)])
    s2 = np.concatenate([[0.0], np.cumsum(w * x * x)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        cost = np.where(j > i, (s2[j] - s2[i]) - (s[j] - s[i]) ** 2 / (c[j] - c[i]), np.inf)
    best = cost[0].copy()
    for _ in range(k - 1):
        best = np.minimum(best, np.min(best[:, None] + cost, axis=0))
    return max(best[n], 0.0) / n


def sample(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(n).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=n).astype(np.float32)
    return np.concatenate([rng.normal(-3, 0.3, n // 2), rng.normal(2, 1, n - n // 2)]).astype(np.float32)


def mse(palette, rows: np.ndarray, weights: np.ndarray | None = None) -> float:
    error = (reconstruct(palette).astype(np.float64) - rows.astype(np.float64)) ** 2
    return float(np.mean(error if weights is None else weights * error))


@pytest.mark.parametrize("kind", ["normal", "laplace", "bimodal"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6])
def test_mse_within_half_percent_of_exact_optimum(kind: str, bits: int) -> None:
    values = sample(kind, 700, np.random.default_rng(bits))
    optimum = exact_kmeans_mse(values, 1 << bits)
    assert mse(palettize(values[None], bits=bits), values[None]) <= 1.005 * optimum


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 6])
def test_weighted_mse_within_half_percent_of_exact_optimum(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = sample("laplace", 600, rng)
    weights = rng.lognormal(0.0, 1.5, 600)  # input-activation energies vary by orders of magnitude
    optimum = exact_kmeans_mse(values, 1 << bits, weights)
    palette = palettize(values[None], bits=bits, weights=weights[None])
    assert mse(palette, values[None], weights) <= 1.005 * optimum
    # and it beats the unweighted palette on the weighted error it was asked to minimise
    assert mse(palette, values[None], weights) < mse(palettize(values[None], bits=bits), values[None], weights)


def test_weighted_binned_rows_near_optimum() -> None:
    rng = np.random.default_rng(3)
    rows = np.stack([sample("normal", 900, rng) * s for s in (1.0, 5.0)])
    weights = rng.lognormal(0.0, 1.0, rows.shape)
    palette = palettize(rows, bits=3, weights=weights, max_points=64)
    for c in range(2):
        optimum = exact_kmeans_mse(rows[c], 8, weights[c])
        assert (
            mse(palette.__class__(palette.codebook[c : c + 1], palette.indices[c : c + 1]), rows[c : c + 1], weights[c])
            <= 1.01 * optimum
        )


def test_equal_weights_change_nothing() -> None:
    rows = sample("bimodal", 800, np.random.default_rng(5))[None]
    plain, weighted = palettize(rows, bits=4), palettize(rows, bits=4, weights=np.full(rows.shape, 3.0))
    np.testing.assert_allclose(weighted.codebook, plain.codebook, rtol=1e-6)


def test_weights_must_be_positive() -> None:
    with pytest.raises(ValueError):
        palettize(np.ones((1, 4), np.float32), bits=1, weights=np.zeros((1, 4)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_mse_near_optimum_when_runs_are_binned(bits: int) -> None:
    # 1200 values but the DP may only see 6 * 2**bits runs: the binned path plus Lloyd polish.
    values = sample("laplace", 1200, np.random.default_rng(7))
    optimum = exact_kmeans_mse(values, 1 << bits)
    palette = palettize(values[None], bits=bits, max_points=min(1200, 6 << bits))
    assert mse(palette, values[None]) <= 1.01 * optimum


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_few_distinct_values_are_exact(bits: int) -> None:
    rng = np.random.default_rng(0)
    levels = rng.standard_normal(1 << bits).astype(np.float32)
    rows = rng.choice(levels, size=(3, 500))
    palette = palettize(rows, bits=bits)
    np.testing.assert_array_equal(reconstruct(palette), rows)


def test_constant_and_zero_rows_are_exact() -> None:
    rows = np.stack([np.zeros(64, np.float32), np.full(64, 0.25, np.float32)])
    np.testing.assert_array_equal(reconstruct(palettize(rows, bits=4)), rows)


def test_indices_in_range_and_codebook_sorted_and_shaped() -> None:
    rows = np.random.default_rng(1).standard_normal((5, 300)).astype(np.float32)
    for bits in range(1, 9):
        palette = palettize(rows, bits=bits)
        assert palette.codebook.shape == (5, 1 << bits)
        assert palette.indices.shape == rows.shape and palette.indices.dtype == np.uint8
        assert int(palette.indices.max()) < (1 << bits)
        assert np.all(np.diff(palette.codebook.astype(np.float64), axis=1) >= 0)


def test_each_value_maps_to_its_nearest_centroid() -> None:
    rows = np.random.default_rng(2).standard_normal((4, 400)).astype(np.float32)
    palette = palettize(rows, bits=3)
    distance = np.abs(rows[:, :, None] - palette.codebook[:, None, :])
    chosen = np.take_along_axis(distance, palette.indices[:, :, None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_array_equal(chosen, distance.min(axis=2))


def test_rows_are_independent() -> None:
    rows = np.random.default_rng(3).standard_normal((6, 250)).astype(np.float32) * np.arange(1, 7)[:, None]
    together = palettize(rows, bits=3)
    for c in range(6):
        alone = palettize(rows[c : c + 1], bits=3)
        np.testing.assert_array_equal(together.indices[c], alone.indices[0])
        np.testing.assert_array_equal(together.codebook[c], alone.codebook[0])


def test_deterministic() -> None:
    rows = np.random.default_rng(4).standard_normal((3, 5000)).astype(np.float32)
    a, b = palettize(rows, bits=4), palettize(rows.copy(), bits=4)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_codebook_keeps_the_weight_dtype(dtype: type) -> None:
    rows = np.random.default_rng(5).standard_normal((2, 300)).astype(dtype)
    palette = palettize(rows, bits=4)
    assert palette.codebook.dtype == np.dtype(dtype)
    assert snr_db(rows, reconstruct(palette)) > 15


def test_nearest_with_fewer_values_than_centroids() -> None:
    rows = np.array([[0.5, -1.0, 0.5]], np.float32)
    palette = palettize(rows, bits=4)
    np.testing.assert_array_equal(reconstruct(palette), rows)
    np.testing.assert_array_equal(nearest(rows, palette.codebook), palette.indices)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bits", [1, 4, 5, 6])
def test_nearest_counts_midpoints_below_each_value_ties_going_low(dtype: type, bits: int) -> None:
    """Both ways of `nearest` (comparisons up to 5 bits, a search past them) agree with an exact search
    in float64, also for values that sit exactly on a midpoint."""
    rng = np.random.default_rng(bits)
    rows = rng.standard_normal((3, 2000)).astype(dtype)
    codebook = np.sort(rng.choice(rows.ravel(), (3, 1 << bits)), axis=1)
    wide = codebook.astype(np.float64)
    mids = (wide[:, 1:] + wide[:, :-1]) / 2
    rows[:, : mids.shape[1]] = mids.astype(dtype)  # on (or rounded next to) a midpoint
    want = [np.searchsorted(mids[c], rows[c].astype(np.float64), side="left") for c in range(3)]
    np.testing.assert_array_equal(nearest(rows, codebook), np.array(want, np.uint8))


def test_rejects_bad_bits() -> None:
    with pytest.raises(ValueError):
        palettize(np.zeros((1, 4), np.float32), bits=9)


@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_rows_layout_round_trip(axis: int | None) -> None:
    w = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    rows = to_rows(w, axis)
    assert rows.shape[0] == (1 if axis is None else w.shape[axis])
    np.testing.assert_array_equal(from_rows(rows, w.shape, axis), w)
    if axis is not None:  # row c holds exactly the slice at index c along the axis
        np.testing.assert_array_equal(np.sort(rows[1]), np.sort(np.take(w, 1, axis=axis).ravel()))


def test_scaled_palettes_where_channels_differ_in_range(tmp_path) -> None:
    """Channels whose ranges differ a thousandfold: one codebook per tensor crushes the small ones, 64
    codebooks cost 16 floats each; one codebook scaled per channel (4 bytes each) wins per stored bit.
    The file decodes to exactly what the report measured, and zero channels stay exact."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 128)) * np.geomspace(1e-3, 1, 64)[:, None]).astype(np.float32)
    w[5] = 0
    palette = palettize_scaled(w, 4, 0)
    assert palette.codebook.shape == (1, 16) and palette.scale is not None and palette.scale[5] == 0
    assert np.all(reconstruct(palette)[5] == 0)
    shared = reconstruct(palettize(w.reshape(1, -1), bits=4)).reshape(w.shape)
    rows = [np.median([snr_db(w[c], r[c]) for c in range(64) if c != 5]) for r in (reconstruct(palette), shared)]
    assert snr_db(w, reconstruct(palette)) > snr_db(w, shared) and rows[0] > rows[1] + 10  # small channels too
    save_gemm(w, tmp_path / "m.onnx")
    args = ["kmeans", str(tmp_path / "m.onnx"), "--bits", "4", "--per-channel", "-o", str(tmp_path / "q.onnx")]
    result = CliRunner().invoke(cli, [*args, "--json", "--no-validate"])
    assert result.exit_code == 0, result.output
    (report,) = json.loads(result.stdout)["per_weight"]
    assert report["granularity"] == "per-channel-scaled" and report["groups"] == 64
    decoded = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"x": np.eye(128, dtype=np.float32)})[0].T
    assert abs(snr_db(w, decoded) - report["snr_db"]) < 0.01  # the weights the file computes with


def test_grouped_palettes_share_codebooks_among_channels_of_like_range(tmp_path) -> None:
    """Four families of 16 channels, interleaved, each drawing from 16 values of its own (ranges far apart):
    groups of channels sorted by range put each family together, so a codebook per group is exact where one
    per tensor is not, and costs a fraction of a codebook per channel. Auto picks it (groups of 16: one codebook
    per family); forced --group-size 8 gives two per family; the file decodes to the weight exactly either way
    (uint4 indices, or bit-packed ones at the model's opset 13)."""
    rng = np.random.default_rng(1)
    values = [np.sort(rng.standard_normal(16)) * 10.0**f for f in range(4)]
    w = np.stack([rng.choice(values[c % 4], 128) for c in range(64)]).astype(np.float32)
    palette = palettize_grouped(w, 4, 0, 16)
    assert palette.codebook.shape == (4, 16) and palette.owner is not None
    assert all(len(set(palette.owner[c::4])) == 1 for c in range(4))  # one codebook per family
    np.testing.assert_array_equal(reconstruct(palette), w)
    assert snr_db(w, reconstruct(palettize(w.reshape(1, -1), bits=4)).reshape(w.shape)) < 40
    save_gemm(w, tmp_path / "m.onnx")
    for flags, groups in (([], 4), (["--group-size", "8"], 8), (["--group-size", "8", "--keep-opset"], 8)):
        args = ["kmeans", str(tmp_path / "m.onnx"), "--bits", "4", *flags, "-o", str(tmp_path / f"q{len(flags)}.onnx")]
        result = CliRunner().invoke(cli, [*args, "--json", "--no-validate"])
        assert result.exit_code == 0, result.output
        (report,) = json.loads(result.stdout)["per_weight"]
        assert report["granularity"] == "grouped" and report["groups"] == groups and report["snr_db"] is None
        # indices, codebooks and a uint16 offset per channel
        assert report["stored_bytes"] == 64 * 128 // 2 + groups * 16 * 4 + 64 * 2
        session = ort.InferenceSession(str(tmp_path / f"q{len(flags)}.onnx"))
        np.testing.assert_array_equal(session.run(None, {"x": np.eye(128, dtype=np.float32)})[0].T, w)


def test_a_weight_is_encoded_only_where_that_makes_it_smaller(tmp_path) -> None:
    """A weight whose encoding (indices, codebook, decode nodes and their names) would take no fewer bytes
    than its float values stays float, with both sizes as the reason: the same file as excluding it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = {"tiny": rng.standard_normal((4, 3, 1, 1)), "big": rng.standard_normal((16, 4, 3, 3))}
    nodes = [
        helper.make_node("Conv", ["x", "tiny"], ["a"]),
        helper.make_node("Conv", ["a", "big"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 8, 8])],
        [numpy_helper.from_array(w.astype(np.float32), n) for n, w in weights.items()],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    files, reports = {}, {}
    for label, flags in (("measured", []), ("excluded", ["--exclude", "tiny"])):
        out = tmp_path / f"{label}.onnx"
        args = ["kmeans", str(model), "--bits", "4", "--min-elements", "1", *flags, "-o", str(out), "--json"]
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        files[label], reports[label] = out.read_bytes(), json.loads(result.stdout)
    assert [w["name"] for w in reports["measured"]["per_weight"]] == ["big"]
    (skipped,) = reports["measured"]["skipped"]
    encoded, stored = (int(word) for word in skipped["reason"].split() if word.isdigit())
    assert stored == 48 and encoded > stored and "decode nodes" in skipped["reason"]
    assert files["measured"] == files["excluded"]
    # with --small-weights int8, those under --min-elements take int8 where that is smaller than float
    args = ["kmeans", str(model), "--bits", "4", "--small-weights", "int8", "-o", str(tmp_path / "d.onnx"), "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    (big,) = report["per_weight"]
    assert (big["name"], big["bits"], big["note"]) == ("big", 8, "int8: 576 elements < --min-elements 1024")
    assert big["stored_bytes"] < big["float_bytes"] / 3
    (skipped,) = report["skipped"]
    assert skipped["name"] == "tiny" and skipped["reason"].endswith("48 as float")
    nodes = [n.op_type for n in onnx.load(str(tmp_path / "d.onnx")).graph.node]
    assert nodes.count("DequantizeLinear") == 1 and "Gather" not in nodes


def test_small_int8_weights_are_bias_corrected_where_their_filters_cancel(tmp_path) -> None:
    """--small-weights int8 with calibration data: a depthwise filter whose values nearly cancel (a derivative, as
    in the PP-OCRv4 recognizer's stem) answers flat inputs with its rounding error alone; bias correction takes
    that mean error out, and the layer check keeps it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    derivative = np.array([[0.3, -2.1, 0.4], [-1.9, 6.0, -1.6], [1.5, -4.0, 1.4]], np.float32)
    weight = np.stack([derivative * s + rng.normal(0, 1e-3, (3, 3)) for s in rng.uniform(0.5, 2, 16)])[:, None]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], group=16)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 16, 10, 10])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(model))
    flat = rng.uniform(1, 3, (32, 16, 1, 1)) + rng.normal(0, 0.001, (32, 16, 12, 12))
    np.savez(tmp_path / "cal.npz", x=flat.astype(np.float32))
    args = ["kmeans", str(model), "--bits", "4", "--small-weights", "int8", "--calibration", str(tmp_path / "cal.npz")]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "q.onnx"), "--json", "--no-validate"])
    assert result.exit_code == 0, result.output
    (small,) = json.loads(result.stdout)["per_weight"]
    assert (
        small["bits"] == 8
        and small["note"].startswith("int8: 144 elements")
        and "bias-corrected" in small["techniques"]
    )
    figures = re.findall(r"plain ([-\d.]+) dB, plain \+ bias-corrected ([-\d.]+) dB", small["note"])
    plain, corrected = (float(v) for v in figures[0])
    assert corrected > plain + 6, small["note"]  # the layer's output SNR on the calibration data
