"""Data-aware quantization, bias correction, BN folding decisions and the per-layer / whole-model checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert import sections
from qconvert.cli import cli
from qconvert.errors import OutputError
from qconvert.fidelity import bias, checks, statistics
from qconvert.fidelity.checks import Candidate
from qconvert.methods.common import fold_pays
from qconvert.methods.refine import Refiner
from qconvert.runtime import Feeds
from qconvert.select import select_weights


def layer_model(op: str, rng: np.random.Generator) -> tuple[onnx.ModelProto, np.ndarray]:
    """x -> one Conv (2 groups, no bias, no padding) / Gemm (transB, alpha, beta, C) / MatMul (and an Add of a
    bias, as exporters write a Linear layer) -> y."""
    inits = []
    nodes = []
    if op == "Conv":
        x_shape, y_shape = [64, 6, 5, 5], [64, 8, 3, 3]
        w = rng.standard_normal((8, 3, 3, 3))
        node = helper.make_node("Conv", ["x", "w"], ["y"], group=2)
    elif op == "Gemm":
        x_shape, y_shape = [16, 12], [16, 10]
        w = rng.standard_normal((10, 12))
        inits.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "c"))
        node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], transB=1, alpha=0.7, beta=1.5)
    else:
        x_shape, y_shape = [2, 16, 12], [2, 16, 10]
        w = rng.standard_normal((12, 10))
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        if op == "MatMul+Add":
            node.output[0] = "p"
            inits.append(numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "b"))
            nodes.append(helper.make_node("Add", ["p", "b"], ["y"]))
    inits.append(numpy_helper.from_array(w.astype(np.float32), "w"))
    graph = helper.make_graph(
        [node, *nodes],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    # Inputs with a mean far from zero, different per channel: the case bias correction is for.
    axis = -1 if op.startswith("MatMul") else 1
    offsets = np.moveaxis(np.zeros(x_shape), axis, -1) + rng.uniform(0, 3, x_shape[axis])
    x = (rng.standard_normal(x_shape) + np.moveaxis(offsets, -1, axis)).astype(np.float32)
    return model, x


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def with_weight(model: onnx.ModelProto, array: np.ndarray) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    w = next(t for t in copy.graph.initializer if t.name == "w")
    w.CopyFrom(numpy_helper.from_array(array.astype(np.float32), "w"))
    return copy


def feeds(x: np.ndarray) -> Feeds:
    return Feeds([{"x": x}], x.shape[0], "test")


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul", "MatMul+Add"])
def test_bias_correction_restores_the_mean_output(op: str) -> None:
    rng = np.random.default_rng(0)
    model, x = layer_model(op, rng)
    weights = select_weights(model).weights
    layers = statistics.find_layers(model, weights)
    moments = statistics.input_moments(model, layers, feeds(x)).moments
    w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    coarse = np.round(w * 2 + 0.3) / 2  # a biased quantizer: its error has a non-zero mean
    shift = bias.bias_shift(layers["w"], moments["w"], w, coarse)
    quantized = with_weight(model, coarse)
    mean_axis = tuple(a for a in range(x.ndim) if a != (1 if op == "Conv" else x.ndim - 1))
    stored = len(quantized.graph.initializer)
    before = np.abs((run(model, x) - run(quantized, x)).mean(axis=mean_axis)).max()
    bias.apply_bias_shifts(
        quantized, {"w": (statistics.find_layers(quantized, select_weights(quantized).weights)["w"], shift)}
    )
    onnx.checker.check_model(quantized, full_check=True)
    after = np.abs((run(model, x) - run(quantized, x)).mean(axis=mean_axis)).max()
    # exact for Gemm and MatMul; a Conv's windows see the channel mean only on average over the data
    assert before > 0.5 and after < (0.03 if op == "Conv" else 1e-5) * before
    if op.startswith("MatMul"):  # an Add of the shift, or the existing Add's bias shifted
        assert [n.op_type for n in quantized.graph.node] == ["MatMul", "Add"]
        assert len(quantized.graph.initializer) == stored + (op == "MatMul")


def test_one_pass_gives_the_activation_ranges_too() -> None:
    """Min and max reduced in the graph over several batches: the graph input and the layer output
    ranges are numpy's (over all batches), and equal what the separate calibration pass finds."""
    from qconvert.calibrate import activation_ranges
    from qconvert.plan import CalibrationMethod

    rng = np.random.default_rng(2)
    model, x = layer_model("Conv", rng)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "n"
    layers = statistics.find_layers(model, select_weights(model).weights)
    batches = Feeds([{"x": x[i : i + 16]} for i in range(0, 64, 16)], 64, "test")
    stats = statistics.input_moments(model, layers, batches, extremes=["x", "y"])
    y = run(model, x)
    assert stats.ranges == {"x": (float(x.min()), float(x.max())), "y": (float(y.min()), float(y.max()))}
    assert activation_ranges(model, ["x", "y"], batches, method=CalibrationMethod.MINMAX) == stats.ranges
    # the moments come from the batches the checks do not run on: the last one (16 samples >= 8) is held out
    assert stats.checks.samples == 16 and stats.in_sample is not None and stats.in_sample.samples == 16
    np.testing.assert_allclose(stats.moments["w"].mean, x[:48].astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(stats.reference[0], y[48:], rtol=1e-6)


def test_importance_follows_conv_groups() -> None:
    rng = np.random.default_rng(1)
    model, x = layer_model("Conv", rng)
    layer = statistics.find_layers(model, select_weights(model).weights)["w"]
    moments = statistics.input_moments(model, {"w": layer}, feeds(x)).moments
    np.testing.assert_allclose(moments["w"].square, np.mean(x.astype(np.float64) ** 2, axis=(0, 2, 3)), rtol=1e-6)
    importance = statistics.importance(layer, moments["w"], (8, 3, 3, 3))
    assert importance is not None and importance.shape == (8, 3, 1, 1)
    # output channels 0-3 read input channels 0-2 (group 0), channels 4-7 read 3-5 (group 1)
    np.testing.assert_allclose(importance[0, :, 0, 0], moments["w"].square[:3])
    np.testing.assert_allclose(importance[5, :, 0, 0], moments["w"].square[3:])


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
def test_layer_snr_is_measured_on_the_layer_output(op: str) -> None:
    """With and without a bias shift (whose error follows from the error's sums per channel)."""
    rng = np.random.default_rng(2)
    model, x = layer_model(op, rng)
    layer = statistics.find_layers(model, select_weights(model).weights)["w"]
    w = numpy_helper.to_array(model.graph.initializer[-1])
    noisy = w + rng.standard_normal(w.shape).astype(np.float32) * 0.1
    shift = rng.standard_normal(w.shape[layer.out_axis]).astype(np.float32)
    snrs = checks.layer_snr(model, [Candidate(layer, noisy), Candidate(layer, noisy, shift)], feeds(x))
    want, got = run(model, x).astype(np.float64), run(with_weight(model, noisy), x).astype(np.float64)
    for value, out in zip(snrs, (got, got + bias.output_layout(layer, shift))):
        assert value == pytest.approx(10 * np.log10(np.sum(want**2) / np.sum((want - out) ** 2)), abs=1e-3)


def a_section_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sections, "MIN_SECTION_BYTES", 1)
    monkeypatch.setattr(sections, "SECTIONS", 1 << 30)


def chain_model(rng: np.random.Generator) -> tuple[onnx.ModelProto, dict[str, np.ndarray], Feeds]:
    """Conv, Relu, Conv + skip, pooling, Gemm (its weight in a Constant node at the top, as paddle2onnx
    writes weights), Mul by an input read late, MatMul; its weights by name; two samples."""
    inits = [
        numpy_helper.from_array(a.astype(np.float32), n)
        for n, a in [
            ("w1", rng.standard_normal((8, 4, 3, 3)) * 0.3),
            ("w2", rng.standard_normal((8, 8, 3, 3)) * 0.2),
            ("w3", rng.standard_normal((10, 8)) * 0.5),
            ("b3", rng.standard_normal(10)),
            ("w4", rng.standard_normal((10, 6))),
        ]
    ]
    w3 = inits.pop(2)  # in a Constant node: run again by each pass, not handed on
    nodes = [
        helper.make_node("Constant", [], ["w3"], value=w3),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"]),
        helper.make_node("GlobalAveragePool", ["s"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g"], transB=1),
        helper.make_node("Mul", ["g", "scale"], ["m"]),
        helper.make_node("MatMul", ["m", "w4"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    samples = Feeds(
        [
            {"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32), "scale": np.array([s], np.float32)}
            for s in (0.5, 2.0)
        ],
        2,
        "test",
    )
    return model, {t.name: numpy_helper.to_array(t) for t in [*inits, w3]}, samples


def test_layer_checks_in_several_passes_measure_what_one_pass_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Passes in the model's order hand on the tensors later nodes read (a skip connection, an input read
    late) and start there, from memory or, past CARRY_BYTES, from disk."""
    rng = np.random.default_rng(5)
    model, arrays, samples = chain_model(rng)
    layers = statistics.find_layers(model, select_weights(model, min_elements=1).weights)
    assert set(layers) == {"w1", "w2", "w3", "w4"}
    candidates = []
    for name, layer in layers.items():
        w = arrays[name]
        noisy = w + rng.standard_normal(w.shape).astype(np.float32) * 0.05
        candidates += [
            Candidate(layer, noisy),
            Candidate(layer, noisy, rng.standard_normal(w.shape[layer.out_axis]).astype(np.float32) * 0.1),
        ]
    starts: list[list[str]] = []
    real = sections.model_session
    monkeypatch.setattr(
        sections,
        "model_session",
        lambda m, what, skeleton, **kw: (
            starts.append([i.name for i in skeleton.graph.input]) or real(m, what, skeleton=skeleton, **kw)
        ),
    )
    one_pass = checks.layer_snr(model, candidates, samples)
    a_section_per_layer(monkeypatch)
    chained = checks.layer_snr(model, candidates, samples)
    monkeypatch.setattr(sections, "CARRY_BYTES", 0)
    on_disk = checks.layer_snr(model, candidates, samples)
    assert starts[0] == ["x", "scale"] and len(starts) == 1 + 4 + 4
    assert starts[1:5] == [
        ["x"],
        ["c1"],
        ["c2", "r1"],
        ["g", "scale"],
    ]  # where the previous pass stopped; "scale", read late, kept
    assert starts[5:] == starts[1:5]
    assert all(np.isfinite(one_pass)) and one_pass[0] != one_pass[1]
    np.testing.assert_allclose(chained, one_pass, rtol=1e-5)
    np.testing.assert_allclose(on_disk, one_pass, rtol=1e-5)


def test_whole_model_passes_in_sections_measure_what_one_session_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The statistics pass and the whole-model variants run in sections, each session holding only the
    weights its nodes read; moments, extremes, the reference outputs and the variants' SNRs come out as
    from one session, with the tensors handed on in memory or on disk (and the temp folders removed)."""
    rng = np.random.default_rng(7)
    model, arrays, samples = chain_model(rng)
    layers = statistics.find_layers(model, select_weights(model, min_elements=1).weights)
    noisy = {n: arrays[n] + 0.05 * rng.standard_normal(arrays[n].shape).astype(np.float32) for n in layers}
    shifts = {
        n: (layers[n], 0.1 * rng.standard_normal(layers[n].weight_shape[layers[n].out_axis]).astype(np.float32))
        for n in ("w2", "w4")
    }
    held: list[list[str]] = []
    real = sections.model_session

    def holding(m: onnx.ModelProto, what: str, skeleton: onnx.ModelProto, **kw: object) -> object:
        names = {t.name for t in skeleton.graph.initializer} | {
            n.output[0] for n in skeleton.graph.node if n.op_type == "Constant"
        }
        held.append(sorted(names & arrays.keys()))
        return real(m, what, skeleton=skeleton, **kw)

    monkeypatch.setattr(sections, "model_session", holding)
    folders: list[str] = []
    temporary = sections.tempfile.TemporaryDirectory
    monkeypatch.setattr(
        sections.tempfile, "TemporaryDirectory", lambda **kw: (d := temporary(**kw), folders.append(d.name))[0]
    )

    def measure() -> tuple[statistics.Statistics, list[float | None]]:
        stats = statistics.input_moments(model, layers, samples, ["x", "c1", "r1", "s", "g", "m", "y"])
        return stats, checks.model_snr(model, [(noisy, {}), (noisy, shifts)], stats.checks, stats.reference)

    whole = measure()
    assert held == [["b3", "w1", "w2", "w3", "w4"]] * 3 and not folders
    held.clear()
    a_section_per_layer(monkeypatch)
    in_sections = measure()
    assert held == [["w1"], ["w2"], ["b3", "w3"], ["w4"]] * 3  # the statistics pass, then each variant
    monkeypatch.setattr(sections, "CARRY_BYTES", 0)
    on_disk = measure()
    assert folders and not any(Path(f).exists() for f in folders)
    for stats, snrs in (in_sections, on_disk):
        assert stats.moments.keys() == whole[0].moments.keys() == set(layers)
        for name, moments in stats.moments.items():
            np.testing.assert_allclose(moments.mean, whole[0].moments[name].mean, rtol=1e-5)
            np.testing.assert_allclose(moments.square, whole[0].moments[name].square, rtol=1e-5)
        assert stats.ranges.keys() == whole[0].ranges.keys() == {"x", "c1", "r1", "s", "g", "m", "y"}
        np.testing.assert_allclose(
            [stats.ranges[t] for t in stats.ranges], [whole[0].ranges[t] for t in stats.ranges], rtol=1e-5
        )
        np.testing.assert_allclose(stats.reference[0], whole[0].reference[0], rtol=1e-5)
        np.testing.assert_allclose(snrs, whole[1], rtol=1e-5)
    assert whole[1][0] != whole[1][1]


def test_a_temp_folder_that_cannot_be_written_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _, samples = chain_model(np.random.default_rng(8))
    layers = statistics.find_layers(model, select_weights(model, min_elements=1).weights)
    a_section_per_layer(monkeypatch)
    monkeypatch.setattr(sections, "CARRY_BYTES", 0)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(sections.tempfile, "tempdir", str(tmp_path / "file"))  # not a folder
    with pytest.raises(OutputError, match=r"^cannot keep activations between calibration passes in the temp folder \("):
        statistics.input_moments(model, layers, samples)


def test_a_refinement_that_hurts_is_not_kept() -> None:
    rng = np.random.default_rng(3)
    model, x = layer_model("Conv", rng)
    weights = select_weights(model).weights
    refiner = Refiner.gather(model, weights, feeds(x), data_aware=True, bias_correction=False)
    w = weights[0].array()
    plain = np.round(w * 4) / 4
    decisions = refiner.decide(
        model, {"w": (plain, np.zeros_like(w))}, lambda _: w
    )  # a "refined" result that is garbage
    assert not decisions["w"].refined and decisions["w"].techniques == ()
    assert decisions["w"].note.startswith("layer output SNR on the calibration data: plain ")
    assert "data-aware" in decisions["w"].note
    better = refiner.decide(model, {"w": (plain, np.round(w * 8) / 8)}, lambda _: w)  # a finer grid: it wins
    assert better["w"].refined and better["w"].techniques == ("data-aware",)
    assert better["w"].layer_snr_db > better["w"].plain_layer_snr_db
    assert refiner.chosen != "plain" and refiner.model_snr_db[refiner.chosen] > refiner.model_snr_db["plain"]


def per_tensor_round(values: np.ndarray) -> np.ndarray:
    step = np.abs(values).max() / 7  # a 4-bit symmetric grid for the whole tensor
    return np.round(values / step) * step


def test_fold_pays_unless_one_channel_takes_the_grid() -> None:
    w = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    assert fold_pays(w, np.full(8, 3.0), 0, per_tensor_round, None)  # a uniform factor changes nothing
    skewed = np.ones(8)
    skewed[0] = 500.0
    assert not fold_pays(w, skewed, 0, per_tensor_round, None)  # folded, channel 0 would take the whole grid


def split_digits(digits_data: Path, folder: Path) -> tuple[Path, Path]:
    with np.load(digits_data) as npz:
        x, labels = npz["input"], npz["labels"]
    calibration, validation = folder / "calibration.npz", folder / "validation.npz"
    np.savez(calibration, input=x[:180])
    np.savez(validation, input=x[180:], labels=labels[180:])
    return calibration, validation


@pytest.mark.parametrize(
    "args",
    [
        ["kmeans", "--bits", "3", "--calibration", "{calibration}", "--data", "{validation}"],
        [
            "linear",
            "--bits",
            "8",
            "--per-channel",
            "--calibration",
            "{calibration}",
            "--data",
            "{validation}",
        ],  # full QDQ
        [
            "linear",
            "--bits",
            "4",
            "--per-channel",
            "--weights-only",
            "--calibration",
            "{calibration}",
            "--data",
            "{validation}",
        ],
        ["linear", "--bits", "4", "--per-channel", "--data", "{calibration}"],  # weights-only, learns from --data
    ],
)
def test_techniques_beat_plain_on_digits(tmp_path: Path, digits: Path, digits_data: Path, args: list[str]) -> None:
    calibration, validation = split_digits(digits_data, tmp_path)
    args = [a.format(calibration=calibration, validation=validation) for a in args]

    def convert(*flags: str) -> dict:
        result = CliRunner().invoke(
            cli, [args[0], str(digits), *args[1:], "-o", str(tmp_path / "q.onnx"), "--json", *flags]
        )
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    plain = convert("--no-data-aware", "--no-bias-correction", "--no-fold-batchnorm")
    refined = convert()
    assert "calibration" not in plain["details"] and all(not w["techniques"] for w in plain["per_weight"])
    check = refined["details"]["calibration"]
    snrs = {v["variant"]: v["model_snr_db"] for v in check["variants"]}
    assert check["layers_refined"] >= 1 and check["chosen"] != "plain" and snrs[check["chosen"]] > snrs["plain"]
    assert snrs[check["chosen"]] == max(snrs.values())
    assert refined["options"]["data_aware"] is True and plain["options"]["data_aware"] is False
    assert any("bias-corrected" in w["techniques"] for w in refined["per_weight"])
    assert all(w["layer_snr_db"] is not None for w in refined["per_weight"] if w["techniques"])
    assert refined["validation"]["outputs"][0]["snr_db"] > plain["validation"]["outputs"][0]["snr_db"]
    full_qdq = args[0] == "linear" and "--calibration" in args and "--weights-only" not in args
    assert ("activations_quantized" in refined["details"]) == full_qdq


def test_bias_correction_alone_is_an_option() -> None:
    """A biased plain result and a useless data-aware one: plain with its bias corrected wins."""
    rng = np.random.default_rng(5)
    model, x = layer_model("Gemm", rng)
    weights = select_weights(model).weights
    refiner = Refiner.gather(model, weights, feeds(x), data_aware=True, bias_correction=True)
    w = weights[0].array()
    decisions = refiner.decide(model, {"w": (np.round(w * 4 + 0.3) / 4, np.zeros_like(w))}, lambda _: w)
    assert decisions["w"].techniques == ("bias-corrected",) and not decisions["w"].refined
    assert decisions["w"].layer_snr_db > decisions["w"].plain_layer_snr_db + 3


@pytest.mark.parametrize("sampled", [False, True])
def test_auto_granularity_goes_per_channel_only_where_it_pays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sampled: bool
) -> None:
    """The palettes are computed and compared per stored bit; a large weight first estimates per-channel's
    gain on a sample of channels and skips the per-channel k-means when it cannot pay (`sampled` makes every
    weight large)."""
    from qconvert.methods import kmeans

    from conftest import conv_model, save

    if sampled:
        monkeypatch.setattr(kmeans, "FORM_SAMPLE_ELEMENTS", 0)

    alike = conv_model(cout=64, cin=64, seed=1)  # i.i.d. channels: per-channel codebooks buy little
    skewed = conv_model(cout=64, cin=64, seed=1)
    w = next(t for t in skewed.graph.initializer if t.name == "w")
    scales = np.geomspace(0.01, 10.0, 64).astype(np.float32).reshape(-1, 1, 1, 1)  # channel ranges over 3 decades
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * scales, "w"))
    granularity = {}
    for name, model in (("alike", alike), ("skewed", skewed)):
        result = CliRunner().invoke(
            cli,
            [
                "kmeans",
                str(save(model, tmp_path / f"{name}.onnx")),
                "--bits",
                "3",
                "-o",
                str(tmp_path / f"{name}.q.onnx"),
                "--json",
                "--no-validate",
            ],
        )
        assert result.exit_code == 0, result.output
        (weight,) = json.loads(result.stdout)["per_weight"]
        granularity[name] = weight["granularity"], weight["note"]
    assert granularity["skewed"][0] == "per-channel-scaled"  # one codebook over the channels' own ranges
    assert granularity["alike"][0] == "per-tensor"
    assert ("sampled channels" if sampled else "gained") in granularity["alike"][1]


def test_model_session_hands_weights_over_as_arrays() -> None:
    """model_session runs a skeleton whose large weights come from the model, or from replacements,
    exactly as a session of the serialized model would; dtypes onnxruntime only takes as bytes too."""
    import ml_dtypes

    from qconvert.opset import is_hole, without_weights
    from qconvert.runtime import model_session

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 64)).astype(np.float32)
    h = rng.standard_normal((64, 64)).astype(ml_dtypes.bfloat16)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["a"]),
            helper.make_node("Cast", ["h"], ["hf"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["a", "hf"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(h, "h")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    skeleton = without_weights(model)
    assert all(is_hole(t) for t in skeleton.graph.initializer) and skeleton.ByteSize() < 1000
    x = {"x": rng.standard_normal((2, 64)).astype(np.float32)}
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_array_equal(model_session(model, "test").run(None, x)[0], expected)
    doubled = model_session(model, "test", replaced={"w": 2 * w}).run(None, x)[0]
    np.testing.assert_allclose(doubled, 2 * expected, rtol=1e-5, atol=1e-5)


def test_big_models_skip_the_techniques_with_a_warning(
    tmp_path: Path, digits: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past TECHNIQUES_LIMIT the data only validates: the techniques would hold copies of every weight."""
    from qconvert import pipeline

    monkeypatch.setattr(pipeline, "TECHNIQUES_LIMIT", digits.stat().st_size - 1)
    result = CliRunner().invoke(
        cli,
        ["kmeans", str(digits), "--bits", "4", "--data", str(digits_data), "-o", str(tmp_path / "q.onnx"), "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["data_aware"] is False and report["options"]["bias_correction"] is False
    assert "calibration" not in report["details"]
    assert all(set(w["techniques"]) <= {"batchnorm-folded"} for w in report["per_weight"])
    assert any(w.startswith("data-aware quantization and bias correction skipped") for w in report["warnings"])
    assert report["validation"]["source"] == str(digits_data)


def test_the_statistics_pass_frees_each_activation_as_the_model_alone_does(
    tmp_path: Path, digits: Path, digits_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Moments and activation extremes read the same tensors; placed apart, onnxruntime ran some readers
    late and kept activations alive until then (ResNet-50: 262 -> 377 MB). Measured in onnxruntime's
    profile: the most activations alive at once, in the order it ran the nodes."""
    from qconvert import qdq

    model = onnx.load(str(digits))
    weights = select_weights(model).weights
    probes: list[onnx.ModelProto] = []
    real = sections.model_session
    monkeypatch.setattr(
        sections,
        "model_session",
        lambda model, what, skeleton=None, **kw: probes.append(skeleton) or real(model, what, skeleton=skeleton, **kw),
    )
    x = np.load(digits_data)["input"][:1]
    tensors = qdq.activation_tensors(model, {w.name for w in weights})
    statistics.input_moments(model, statistics.find_layers(model, weights), Feeds([{"input": x}], 1, "test"), tensors)
    probe = probes[0]
    held = {t.name: t for t in model.graph.initializer}
    for i, tensor in enumerate(probe.graph.initializer):
        if tensor.name in held:
            probe.graph.initializer[i].CopyFrom(held[tensor.name])

    def most_alive(graph_model: onnx.ModelProto) -> int:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(tmp_path / "profile")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the nodes as written
        sess = ort.InferenceSession(graph_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        sess.run(None, {"input": x})
        events = json.loads(Path(sess.end_profiling()).read_text())
        ran = [
            e["name"].removesuffix("_kernel_time")
            for e in sorted(events, key=lambda e: e["ts"])
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
        ]
        nodes = {n.name: n for n in graph_model.graph.node}
        last = {name: step for step, node in enumerate(ran) for name in nodes[node].input}
        alive, most = set(), 0
        for step, node in enumerate(ran):
            alive |= {t for t in nodes[node].output if t in tensors}
            most = max(most, len(alive))
            alive -= {t for t in alive if last.get(t, -1) <= step}
        return most

    for graph_model in (model, probe):
        for i, node in enumerate(graph_model.graph.node):
            node.name = node.name or f"node{i}"
    assert any(n.op_type == "ReduceMin" for n in probe.graph.node) and any(
        n.op_type == "ReduceSumSquare" for n in probe.graph.node
    )
    assert most_alive(probe) <= most_alive(model) + 1


def test_checks_run_on_held_out_samples_fewer_on_big_models(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = onnx.load(str(digits))
    layers = statistics.find_layers(model, select_weights(model).weights)
    elements = sum(int(np.prod(layer.weight_shape)) for layer in layers.values())
    twenty = Feeds([{"input": np.zeros((1, 1, 8, 8), np.float32)} for _ in range(20)], 20, "test")
    split = statistics.Split.of(twenty, layers)
    assert split.held == list(range(12, 20)) and split.learned == list(range(12)) and statistics.CHECK_SAMPLES == 8
    assert split.in_sample == list(range(8))
    monkeypatch.setattr(statistics, "CHECK_BUDGET", 6 * elements)
    assert len(statistics.Split.of(twenty, layers).held) == 6
    monkeypatch.setattr(statistics, "CHECK_BUDGET", elements)
    split = statistics.Split.of(twenty, layers)
    assert len(split.held) == statistics.MIN_CHECK_SAMPLES == 4 and not split.in_sample  # big: no in-sample check
    # at most half the batches are held out; one batch is checked in-sample, nothing else to do
    assert statistics.Split.of(Feeds(twenty.batches[:5], 5, "test"), layers).held == [3, 4]
    one = statistics.Split.of(Feeds(twenty.batches[:1], 1, "test"), layers)
    assert one.held == one.learned == [0] and not one.in_sample


def test_layer_check_passes_hand_on_what_subgraphs_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor read only inside an If branch (from the outer scope) is handed on like any other."""
    rng = np.random.default_rng(6)
    weights = {n: (rng.standard_normal((4, 4, 3, 3)) * 0.3).astype(np.float32) for n in ("w1", "w2", "w3")}
    branch = helper.make_graph(
        [helper.make_node("Add", ["c2", "r1"], ["then_out"])],
        "then",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["c2"], ["else_out"])],
        "else",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("If", ["cond"], ["s"], then_branch=branch, else_branch=other),
        helper.make_node("Conv", ["s", "w3"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 5, 5]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5, 5])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    layers = statistics.find_layers(model, select_weights(model, min_elements=1).weights)
    candidates = [
        Candidate(layers[n], w + 0.05 * rng.standard_normal(w.shape).astype(np.float32)) for n, w in weights.items()
    ]
    samples = Feeds([{"x": rng.standard_normal((1, 4, 5, 5)).astype(np.float32), "cond": np.array(True)}], 1, "test")
    one_pass = checks.layer_snr(model, candidates, samples)
    starts: list[list[str]] = []
    real = sections.model_session
    monkeypatch.setattr(
        sections,
        "model_session",
        lambda m, what, skeleton, **kw: (
            starts.append([i.name for i in skeleton.graph.input]) or real(m, what, skeleton=skeleton, **kw)
        ),
    )
    a_section_per_layer(monkeypatch)
    np.testing.assert_allclose(checks.layer_snr(model, candidates, samples), one_pass, rtol=1e-5)
    assert starts == [["x"], ["c1"], ["c2", "cond", "r1"]]


def test_bias_shifts_keep_what_the_samples_agree_on() -> None:
    """Empirical bias correction shrinks each channel's mean error by how little its samples agree: a shift
    every sample shows is kept whole, one that is mostly sample noise (a layer after a global pool sees one
    value per channel and sample) shrinks to nothing."""
    from qconvert.fidelity.empirical import _shrunk

    rng = np.random.default_rng(0)
    steady = 0.5 + 0.01 * rng.standard_normal(8)
    noisy = 0.05 + np.tile([1.0, -1.0], 4)  # a mean of 0.05 among samples 1 apart
    shift = _shrunk(np.stack([steady, noisy], axis=1))
    assert abs(shift[0] - steady.mean()) < 1e-3 * steady.mean()
    assert shift[1] == 0
    assert np.array_equal(_shrunk(np.zeros((8, 3))), np.zeros(3))
