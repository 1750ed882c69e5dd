"""qconvert auto: sensitivity, allocation, the verified plan and its reuse."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from qconvert import io, opset, pipeline, runtime
from qconvert.cli import cli
from qconvert.errors import ExitCode, QConvertError
from qconvert.fidelity import bias, statistics
from qconvert.mixed import allocation, holdout, search, sensitivity
from qconvert.mixed import options as option_kinds
from qconvert.plan import AutoPlan, Granularity, KMeansPlan, LayerOverride, ValidationPlan
from qconvert.select import select_weights


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_auto_meets_the_target_writes_the_model_and_a_reusable_plan(
    tmp_path: Path, digits: Path, digits_data: Path
) -> None:
    out, plan = tmp_path / "a.onnx", tmp_path / "plan.toml"
    code, output = run(
        "auto", digits, "--target-snr", 25, "--data", digits_data, "-o", out, "--plan-out", plan, "--json"
    )
    assert code == 0, output
    report = json.loads(output)
    assert report["gates"]["passed"] and report["validation"]["outputs"][0]["snr_db"] >= 25
    details = report["details"]["auto"]
    assert {p["weight"] for p in details["plan"]} == {w["name"] for w in report["per_weight"]}
    assert details["iterations"][-1]["passed"] or any(i["passed"] for i in details["iterations"])
    chosen = {p["weight"]: p for p in details["plan"]}
    assert all(w["bits"] == chosen[w["name"]]["bits"] for w in report["per_weight"])
    # --data stood in for the calibration data: fitted on the first two thirds, every plan checked on the rest
    assert details["held_out"] == {"data": str(digits_data), "labels": None, "fitted_on": 240, "checked_on": 120}
    assert report["validation"]["source"] == f"{digits_data} (samples 241-360, held out)"
    # the plan file redoes the same model without searching, from the same samples
    arrays = dict(np.load(digits_data))
    np.savez(tmp_path / "fit.npz", **{k: v[:240] for k, v in arrays.items()})
    again = tmp_path / "again.onnx"
    code, output = run("kmeans", digits, "--config", plan, "--calibration", tmp_path / "fit.npz", "-o", again, "-q")
    assert code == 0, output
    assert again.read_bytes() == out.read_bytes()


def test_auto_is_deterministic_and_a_lower_target_gives_a_smaller_model(
    tmp_path: Path, digits: Path, digits_data: Path
) -> None:
    sizes = []
    for name, target in (("a", 30), ("b", 30), ("c", 15)):
        code, output = run(
            "auto", digits, "--target-snr", target, "--data", digits_data, "-o", tmp_path / f"{name}.onnx", "-q"
        )
        assert code == 0, output
        sizes.append((tmp_path / f"{name}.onnx").stat().st_size)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sizes[2] < sizes[0]


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--target-snr", "20", "--min-top1", "0.9"],
        ["--target-snr", "20", "--methods", "zip"],
        ["--target-snr", "20", "--bits", "9"],
        ["--target-snr", "20", "--no-validate"],
    ],
)
def test_auto_usage_errors(tmp_path: Path, digits: Path, args: list[str]) -> None:
    code, output = run("auto", digits, *args, "-o", tmp_path / "a.onnx")
    assert code == ExitCode.USAGE, output
    assert output.count("\n") == 1 and not (tmp_path / "a.onnx").exists()


def chain(rng: np.random.Generator, softmax: bool = False) -> onnx.ModelProto:
    """x -> Gemm(w1) -> Gemm(w2) -> y [-> Softmax -> p]: linear up to y, so the last layer's noise reaches
    y unchanged."""
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
        for n, s in (("w1", (16, 32)), ("w2", (32, 8)))
    ]
    nodes = [helper.make_node("Gemm", ["x", "w1"], ["h"]), helper.make_node("Gemm", ["h", "w2"], ["y"])]
    if softmax:
        nodes.append(helper.make_node("Softmax", ["y"], ["p"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("p" if softmax else "y", TensorProto.FLOAT, ["n", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("softmax", [False, True])
def test_noise_gain_of_the_last_linear_layer_is_one(softmax: bool) -> None:
    """Measured at the scores: a final Softmax, whose saturation would hide the noise, is looked through."""
    rng = np.random.default_rng(0)
    model = chain(rng, softmax)
    assert sensitivity.scored_outputs(model) == ["y"]
    layers = statistics.find_layers(model, select_weights(model).weights)
    samples = runtime.Feeds([{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(4)], 4, "test")
    perturbed = {
        name: option_kinds.sampled_kmeans(numpy_helper.to_array(t), 2, rng)
        for name, t in ((t.name, t) for t in model.graph.initializer)
    }
    gains = sensitivity.noise_gains(model, layers, samples, perturbed, groups=16)
    ratio, gain = gains["w2"]
    assert ratio > 1e-3 and gain == pytest.approx(1.0, rel=1e-3)
    assert gains["w1"][1] > 0


@pytest.mark.parametrize("corrected", [False, True])
def test_noise_gains_match_the_quantized_model_layer_by_layer(corrected: bool) -> None:
    """Each layer's noise (measured for its batch slot alone) times its gain is the output error of the
    model with that one weight quantized (and its bias corrected): through ReLUs, pooling and a Gemm
    with transA."""
    rng = np.random.default_rng(1)
    shapes = {"c1": (8, 3, 3, 3), "c2": (8, 8, 3, 3), "fc": (8, 5)}
    weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    nodes = [
        helper.make_node("Conv", ["x", "c1"], ["a"], pads=[1] * 4),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Conv", ["r", "c2"], ["b"]),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Transpose", ["f"], ["t"], perm=[1, 0]),
        helper.make_node("Gemm", ["t", "fc"], ["y"], transA=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(w, n) for n, w in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    layers = statistics.find_layers(model, select_weights(model).weights)
    assert set(layers) == set(shapes)
    samples = runtime.Feeds([{"x": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(3)], 3, "test")
    perturbed = {n: option_kinds.sampled_kmeans(w, 2, rng) for n, w in weights.items()}
    moments = statistics.input_moments(model, layers, samples).moments
    shifts = (
        {n: bias.bias_shift(layers[n], moments[n], w, perturbed[n]) for n, w in weights.items()} if corrected else {}
    )
    gains = sensitivity.noise_gains(model, layers, samples, perturbed, 3, shifts)  # type: ignore[arg-type]
    clean = [r["y"].astype(np.float64) for r in runtime.run_with_outputs(model, ["y"], samples, "test")]
    for name in weights:
        quantized = onnx.ModelProto()
        quantized.CopyFrom(model)
        next(t for t in quantized.graph.initializer if t.name == name).CopyFrom(
            numpy_helper.from_array(perturbed[name], name)
        )
        if corrected:
            bias.apply_bias_shifts(
                quantized,
                {name: (statistics.find_layers(quantized, select_weights(quantized).weights)[name], shifts[name])},
            )
        noisy = [r["y"] for r in runtime.run_with_outputs(quantized, ["y"], samples, "test")]
        expected = sum(float(np.sum((n - c) ** 2)) for c, n in zip(clean, noisy)) / sum(
            float(np.sum(c * c)) for c in clean
        )
        ratio, gain = gains[name]
        assert ratio * gain == pytest.approx(expected, rel=1e-3), name


def test_trial_conversions_reuse_palettes_and_the_float_outputs_with_identical_results(digits: Path) -> None:
    trials, validation = pipeline.Trials(), ValidationPlan()
    base = KMeansPlan(bits=4, granularity=Granularity.PER_CHANNEL)
    first = pipeline.convert(digits, None, base, validation, trials=trials).report
    assert trials.reference is not None
    assert len({key[1] for key in trials.palettes}) == len(first.weights)  # each weight's palettes, by digest
    before = set(trials.palettes)
    changed = dataclasses.replace(base, overrides=(LayerOverride(first.weights[0].name, bits=3),))
    again = pipeline.convert(digits, None, changed, validation, trials=trials)
    assert {key[2] for key in set(trials.palettes) - before} == {3}  # only the changed weight was palettized again
    fresh = pipeline.convert(digits, None, changed, validation)
    assert again.model_bytes == fresh.model_bytes
    assert again.report.validation == fresh.report.validation


def test_allocation_meets_the_budget_at_the_smallest_size() -> None:
    def option(method: str, bits: int, size: int, noise: float) -> option_kinds.Option:
        return option_kinds.Option(method, bits, Granularity.PER_TENSOR, size, noise)

    options = {
        "a": [option("float", 32, 400, 0.0), option("kmeans", 4, 50, 1e-3), option("kmeans", 2, 25, 1e-2)],
        "b": [option("float", 32, 400, 0.0), option("kmeans", 4, 50, 1e-4), option("kmeans", 2, 25, 1e-3)],
    }
    choice = allocation.allocate(options, 2.5e-3)  # a at 4 bits + b at 2 bits fits, at 75 bytes
    assert (choice["a"].bits, choice["b"].bits) == (4, 2)
    assert all(o.method == "float" for o in allocation.allocate(options, 0.0).values())


def test_allocation_spends_what_the_convex_hull_leaves() -> None:
    """a's middle option is off the hull of size against noise (no λ picks it), yet it fits the budget."""

    def option(size: int, noise: float) -> option_kinds.Option:
        return option_kinds.Option("kmeans", 4, Granularity.PER_TENSOR, size, noise)

    options = {
        "a": [option(400, 0.0), option(100, 1.0), option(90, 1.5), option(50, 3.0)],
        "b": [option(400, 0.0), option(100, 0.5)],
    }
    choice = allocation.allocate(options, 2.0)
    assert (choice["a"].size, choice["b"].size) == (90, 100)


def test_predicted_sizes_match_the_written_files(tmp_path: Path, digits: Path) -> None:
    """Option sizes include what each encoding adds to the graph: packed indices' decode nodes cost
    about 1 KB, which decides between bit widths on small models."""
    model, _ = io.load_model(digits)
    options = search.profile(model, AutoPlan(target_snr=20), ValidationPlan(), lambda _: None).options
    base = {name: next(o for o in opts if o.label == "kmeans 4-bit pt") for name, opts in options.items()}

    def written(choice: dict[str, option_kinds.Option]) -> int:
        return pipeline.convert(
            digits, None, search.plan_for(choice, AutoPlan(target_snr=20)), None
        ).report.output_bytes

    reference = written(base)
    for label in ("kmeans 3-bit pt", "kmeans 6-bit pt", "linear 8-bit pc"):
        changed = next(o for o in options["fc1.weight"] if o.label == label)
        difference = written({**base, "fc1.weight": changed}) - reference
        assert abs(difference - (changed.size - base["fc1.weight"].size)) <= 16, label


def test_options_are_what_the_model_can_be_converted_to(digits: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When the version converter cannot take the model to opset 21, int4 weights and 4-bit indices are sized
    as packed (as the conversion will store them: more decode nodes than uint4 or int4 DequantizeLinear)."""
    model, _ = io.load_model(digits)

    def labels() -> dict[str, int]:
        options = search.profile(model, AutoPlan(target_snr=20), ValidationPlan(), lambda _: None).options["fc1.weight"]
        return {o.label: o.size for o in options}

    free = labels()

    def converter(model: onnx.ModelProto, target: int, **kwargs: bool) -> onnx.ModelProto:
        raise QConvertError(f"cannot convert the model to opset {target}: (as a test)")

    monkeypatch.setattr(opset, "raise_opset", converter)
    stuck = labels()
    assert stuck["linear 4-bit pc"] > free["linear 4-bit pc"] and stuck["linear 8-bit pc"] == free["linear 8-bit pc"]
    assert stuck["kmeans 4-bit pt"] > free["kmeans 4-bit pt"]  # packed: more decode nodes than uint4


def test_auto_with_an_accuracy_target(tmp_path: Path, digits: Path, digits_data: Path) -> None:
    code, output = run(
        "auto", digits, "--max-accuracy-drop", 0.5, "--data", digits_data, "-o", tmp_path / "a.onnx", "--json"
    )
    assert code == 0, output
    report = json.loads(output)
    accuracy = report["validation"]["accuracy"]
    assert accuracy["float_top1"] - accuracy["quantized_top1"] <= 0.005
    assert report["validation"]["samples"] == 120  # the held-out third, with its labels
    assert report["details"]["auto"]["target"] == {"accuracy_drop": 0.5}
    assert report["output"]["bytes"] < 0.3 * report["input"]["bytes"]


def test_held_out_only_where_the_checks_would_see_the_calibration_data(tmp_path: Path, digits_data: Path) -> None:
    """Other calibration data: nothing split. The same samples under two names (and JSON labels): the last
    third becomes the validation data, its labels with it."""
    arrays = dict(np.load(digits_data))
    np.savez(tmp_path / "other.npz", input=arrays["input"][:30])
    np.savez(tmp_path / "copy.npz", input=arrays["input"][:30])
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps([f"digit {d}" for d in arrays["labels"][:30]]))
    validation = ValidationPlan(data=tmp_path / "copy.npz", labels=labels)
    with holdout.held_out(AutoPlan(target_snr=20, calibration=digits_data), validation) as split:
        assert split.details is None and split.validation == validation
    with holdout.held_out(AutoPlan(target_snr=20, calibration=tmp_path / "other.npz"), validation) as split:
        assert split.details is not None and (split.details["fitted_on"], split.details["checked_on"]) == (20, 10)
        assert split.plan.calibration is not None and split.validation.data is not None
        np.testing.assert_array_equal(np.load(split.plan.calibration)["input"], arrays["input"][:20])
        np.testing.assert_array_equal(np.load(split.validation.data)["input"], arrays["input"][20:30])
        assert split.validation.labels is not None
        assert json.loads(split.validation.labels.read_text()) == [f"digit {d}" for d in arrays["labels"][20:30]]
    assert not split.validation.data.exists()  # the temp files go with the context
