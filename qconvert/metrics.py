"""Task metrics for validation, gates and `qconvert auto`: what the model is for, measured on labelled data.

Built-ins (higher is better, in percent): `top1` and `top5` (class scores against class labels),
`ctc-exact` and `ctc-char` (CTC text recognizers: greedy decoding with the model's own character list,
PaddleOCR's `character` metadata, against label strings, spaces ignored), `iou@T` (the first output above T
against a label mask, or against the float model's own map without labels). Any Python callable
`function(outputs, labels) -> float` works too, named `module:function` or `path/to/file.py:function` on
the command line: `outputs` is the list of the model's outputs (samples on axis 0), `labels` what the
labels file holds (an array, or any JSON).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qconvert.errors import UsageError, first_line

UserMetric = Callable[[list[np.ndarray], Any], float]


class MetricError(UsageError):
    """A --metric that cannot be imported, raises, or gives no number (exit 2, nothing written)."""


@dataclass(frozen=True)
class Metric:
    """A metric ready to measure: (outputs, labels, the float model's outputs) -> a number."""

    name: str
    measure: Callable[[list[np.ndarray], Any, list[np.ndarray]], float]

    def __call__(self, outputs: list[np.ndarray], labels: Any, reference: list[np.ndarray]) -> float:
        try:
            value = self.measure(outputs, labels, reference)
        except MetricError:
            raise
        except Exception as e:
            raise MetricError(f"metric {self.name}: {type(e).__name__}: {first_line(e)}") from e
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise MetricError(f"metric {self.name}: returned {type(value).__name__}, not a number")
        if not math.isfinite(float(value)):
            raise MetricError(f"metric {self.name}: returned {value}, not a finite number")
        return float(value)


@dataclass(frozen=True)
class MetricResult:
    """The metric on the float and on the converted model's outputs."""

    name: str
    float_value: float
    converted_value: float

    @property
    def drop(self) -> float:
        return self.float_value - self.converted_value


def resolve(spec: str | UserMetric, model: str | bytes | None = None) -> Metric:
    """The metric a --metric value names (a built-in, `module:function`, `file.py:function`) or a callable;
    `model` (a path or bytes) gives CTC metrics their character list."""
    if callable(spec):
        name = getattr(spec, "__name__", "metric")
        return Metric(name, lambda outputs, labels, _: spec(outputs, labels))
    if spec in ("top1", "top5"):
        k = int(spec[3:])
        return Metric(spec, lambda outputs, labels, _: _top_k(outputs, _labelled(spec, labels), k))
    if spec in ("ctc-exact", "ctc-char"):
        characters = _characters(spec, model)
        exact = spec == "ctc-exact"
        return Metric(spec, lambda outputs, labels, _: _ctc(outputs, _labelled(spec, labels), characters, exact))
    if spec.startswith("iou@"):
        try:
            threshold = float(spec[4:])
        except ValueError:
            raise MetricError(f"metric {spec}: iou@T takes a number, e.g. iou@0.3") from None
        return Metric(spec, lambda outputs, labels, reference: _iou(outputs, labels, reference, threshold))
    function = _imported(spec)
    return Metric(spec, lambda outputs, labels, _: function(outputs, labels))


def _labelled(spec: str, labels: Any) -> Any:
    if labels is None:
        raise MetricError(f"metric {spec}: needs labels (a `labels` array in --data, or --labels FILE)")
    return labels


def _imported(spec: str) -> UserMetric:
    where, sep, attribute = spec.rpartition(":")
    if not sep or not where or not attribute:
        raise MetricError(f"metric {spec}: not a built-in (top1, top5, ctc-exact, ctc-char, iou@T) nor module:function")
    try:
        if where.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loaded is None or loaded.loader is None:
                raise ImportError(f"cannot load {where}")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            if "" not in sys.path:  # a module in the working folder, as `python -m` would find it
                sys.path.insert(0, "")
            module = importlib.import_module(where)
        function = getattr(module, attribute)
    except Exception as e:  # ImportError, SyntaxError, AttributeError, whatever the module raises
        raise MetricError(f"metric {spec}: cannot import it: {type(e).__name__}: {first_line(e)}") from e
    if not callable(function):
        raise MetricError(f"metric {spec}: {attribute} is not callable")
    return function  # type: ignore[no-any-return]


def _scores(outputs: list[np.ndarray]) -> np.ndarray:
    """The first output of class scores: [N, C] (or [N, C, 1, 1 ...])."""
    for output in outputs:
        squeezed = output.reshape(output.shape[0], -1) if output.ndim >= 2 else output
        if squeezed.ndim == 2 and squeezed.shape[1] > 1 and output.size == squeezed.size:
            return squeezed
    raise MetricError("top-k metrics need an output of class scores ([N, C])")


def _top_k(outputs: list[np.ndarray], labels: Any, k: int) -> float:
    scores, truth = _scores(outputs), np.asarray(labels).reshape(-1)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return 100.0 * float(np.mean([t in row for t, row in zip(truth, best)]))


def _characters(spec: str, model: str | bytes | None) -> list[str]:
    """The CTC classes: blank, the model's character list (PaddleOCR's `character` metadata), a space."""
    proto = None
    if isinstance(model, bytes):
        proto = onnx.load_model_from_string(model)
    elif model is not None:
        proto = onnx.load(model, load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props} if proto is not None else {}
    if "character" not in meta:
        raise MetricError(f"metric {spec}: the model carries no character list (metadata `character`)")
    return ["blank", *meta["character"].splitlines(), " "]


def _ctc(outputs: list[np.ndarray], labels: Any, characters: list[str], exact: bool) -> float:
    """Greedy CTC decoding of the first output ([N, T, C]): best class per step, repeats collapsed, blanks
    dropped; compared with the label strings, spaces ignored (PaddleOCR's RecMetric)."""
    best = outputs[0].argmax(axis=-1)
    found = ["".join(characters[c] for i, c in enumerate(row) if c and (i == 0 or c != row[i - 1])) for row in best]
    pairs = [(f.replace(" ", ""), str(w).replace(" ", "")) for f, w in zip(found, labels)]
    if exact:
        return 100.0 * float(np.mean([f == w for f, w in pairs]))
    return 100.0 * float(np.mean([1 - _edits(f, w) / max(len(f), len(w), 1) for f, w in pairs]))


def _edits(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def _iou(outputs: list[np.ndarray], labels: Any, reference: list[np.ndarray], threshold: float) -> float:
    """IoU of the first output's map above the threshold with the label mask (or float's own map)."""
    ours = outputs[0] > threshold
    truth = np.asarray(labels).astype(bool) if labels is not None else reference[0] > threshold
    if truth.shape != ours.shape:
        raise MetricError(f"iou@{threshold:g}: labels of shape {truth.shape} for outputs of shape {ours.shape}")
    union = np.sum(ours | truth)
    return 100.0 * float(np.sum(ours & truth) / union) if union else 100.0
