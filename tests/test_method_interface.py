"""A new method is one module plus one registry line: a toy method, written here the way a new module in
qconvert/methods/ would be, runs through the same driver, reports, size model and validation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import qconvert
from qconvert.cli import cli
from qconvert.methods import METHODS
from qconvert.methods.base import Context, Need, file_bytes, weight_report
from qconvert.plan import LayerSetting
from qconvert.quant.layout import from_rows, snr_db, to_rows
from qconvert.report import Histogram, WeightReport
from qconvert.rewrite import GraphEdit, replace_weights
from qconvert.select import Weight, select_weights


# ---- the whole method: what a new qconvert/methods/ternary.py would hold ------------------------------------
@dataclass(frozen=True)
class TernaryWeight:
    weight: Weight
    signs: np.ndarray  # int8 in {-1, 0, 1}, the weight's layout
    scale: np.ndarray  # [C] float32, one per output channel
    axis: int | None
    bits: int = 2

    def dequantized(self) -> np.ndarray:
        rows = to_rows(self.signs, self.axis).astype(np.float32) * self.scale[:, None]
        return from_rows(rows, self.weight.shape, self.axis)


class Ternary:
    """Weights in {-s, 0, +s} per output channel (s the mean magnitude of those kept), stored as int8 and
    decoded by a Mul."""

    name: ClassVar[str] = "ternary"
    runtime_note: ClassVar[str | None] = None

    def unsupported(self, weight: Weight) -> str | None:
        return None if weight.tensor.data_type == onnx.TensorProto.FLOAT else "ternary takes float32 weights"

    def axes(self, weight: Weight, setting: LayerSetting, context: Context) -> tuple[list[int | None], str | None]:
        return [weight.channel_axis], None

    def need(self, weight: Weight, setting: LayerSetting, axis: int | None) -> Need:
        return Need(wanted=7, required=7)

    def opset_reason(self, settings: list[LayerSetting], before: int) -> str | None:
        return None

    def quantize(
        self,
        weight: Weight,
        array: np.ndarray,
        setting: LayerSetting,
        axis: int | None,
        importance: np.ndarray | None,
        context: Context,
    ) -> TernaryWeight:
        rows = to_rows(array, axis)
        kept = np.abs(rows) > 0.7 * np.abs(rows).mean(axis=1, keepdims=True)
        scale = np.where(kept.any(axis=1), (np.abs(rows) * kept).sum(axis=1) / np.maximum(kept.sum(axis=1), 1), 1.0)
        signs = (np.sign(rows) * kept).astype(np.int8)
        return TernaryWeight(weight, from_rows(signs, array.shape, axis), scale.astype(np.float32), axis)

    def choose(
        self,
        weight: Weight,
        tried: dict[int | None, TernaryWeight],  # type: ignore[override]
        setting: LayerSetting,
    ) -> tuple[int | None, str | None]:
        return next(iter(tried)), None

    def storage(self, item: TernaryWeight) -> str:  # type: ignore[override]
        return "int8"

    def data_bytes(self, elements: int, channels: int, itemsize: int, bits: int, storage: str) -> int:
        return elements + 4 * channels

    def encode(self, model: onnx.ModelProto, items: list[TernaryWeight]) -> None:  # type: ignore[override]
        def build(edit: GraphEdit, item: TernaryWeight) -> None:
            shape = [1] * item.signs.ndim
            shape[item.axis or 0] = -1
            signs = edit.node(
                item.weight.name,
                "Cast",
                [edit.constant(item.weight.name, "signs", item.signs)],
                "float",
                to=onnx.TensorProto.FLOAT,
            )
            scale = edit.constant(item.weight.name, "scale", item.scale.reshape(shape))
            edit.node(item.weight.name, "Mul", [signs, scale], "decode", output=item.weight.name)

        replace_weights(model, [(item.weight, partial(build, item=item)) for item in items])

    def report(
        self,
        weight: Weight,
        array: np.ndarray,
        item: TernaryWeight,  # type: ignore[override]
        note: str | None,
    ) -> WeightReport:
        return weight_report(
            weight,
            array,
            item,
            groups=item.scale.size,
            stored_bytes=self.data_bytes(array.size, item.scale.size, 4, 2, "int8"),
            snr_db=snr_db(array, item.dequantized()),
            note=note,
        )

    def histogram(self, name: str, array: np.ndarray, item: TernaryWeight) -> Histogram:  # type: ignore[override]
        return Histogram.of(name, array, np.outer(item.scale, [-1.0, 0.0, 1.0]), rows=item.scale.size)

    def stand_in(self, weight: Weight, bits: int, axis: int | None, opset: int) -> TernaryWeight:
        return self.quantize(
            weight,
            weight.array(),
            LayerSetting(self.name, bits, None, False),
            axis,
            None,  # type: ignore[arg-type]
            Context(opset),
        )


# ---- end of the method -----------------------------------------------------------------------------------------


@pytest.fixture
def ternary(monkeypatch: pytest.MonkeyPatch) -> Ternary:
    method = Ternary()
    monkeypatch.setitem(METHODS, method.name, method)  # the one registry line
    return method


def test_a_registered_method_runs_from_a_layer_override(
    tmp_path: Path, digits: Path, digits_data: Path, ternary: Ternary
) -> None:
    config = tmp_path / "plan.toml"
    config.write_text('bits = 4\n[[layer]]\nmatch = "fc1.weight"\nmethod = "ternary"\n')
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(
        cli, ["kmeans", str(digits), "--config", str(config), "--data", str(digits_data), "-o", str(out), "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fc1 = next(w for w in report["per_weight"] if w["name"] == "fc1.weight")
    assert (
        fc1["note"].startswith("ternary by a layer override")
        and fc1["stored_bytes"] == fc1["elements"] + 4 * fc1["groups"]
    )
    assert report["opset"]["storage"] == "int8, uint4"
    # In the graph: int8 signs times a scale per channel, decoding to three levels per channel.
    model = onnx.load(str(out))
    signs = next(t for t in model.graph.initializer if t.name == "fc1.weight_qc_signs")
    assert signs.data_type == onnx.TensorProto.INT8
    assert set(np.unique(onnx.numpy_helper.to_array(signs))) <= {-1, 0, 1}
    x = np.load(digits_data)["input"][:8]
    assert ort.InferenceSession(str(out)).run(None, {"input": x})[0].shape == (8, 10)
    assert report["validation"]["accuracy"]["quantized_top1"] > 0.8


def test_the_size_model_and_the_api_know_it(digits: Path, ternary: Ternary) -> None:
    model = onnx.load(str(digits))
    (weight,) = [w for w in select_weights(model).weights if w.name == "fc1.weight"]
    size = file_bytes(ternary, weight, 2, weight.channel_axis, 13)
    result = qconvert.kmeans(
        digits, bits=8, validate=False, overrides=(qconvert.plan.LayerOverride("*", method="ternary"),)
    )
    assert {w.note for w in result.report.weights} == {"ternary by a layer override"}
    # what the size model says fc1 costs is what replacing it alone adds to the file
    alone = qconvert.kmeans(
        digits,
        bits=8,
        validate=False,
        fold_batchnorm=False,
        exclude=("conv*",),
        overrides=(qconvert.plan.LayerOverride("fc1.weight", method="ternary"),),
    )
    assert abs(alone.report.output_bytes - (digits.stat().st_size - weight.array().nbytes + size)) < 64
