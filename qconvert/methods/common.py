"""What the method steps share: the Step they return, and how they pick and vet weights."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from qconvert.errors import UnsupportedModelError
from qconvert.plan import Plan, layer_setting
from qconvert.report import Histogram, OpsetChange, WeightReport
from qconvert.select import Selection, Skipped, Weight, select_weights

Progress = Callable[[str], None]


@dataclass
class Step:
    """What a method's step did to the model (in place, or a converted copy in `model`)."""

    model: onnx.ModelProto
    opset: OpsetChange
    weights: list[WeightReport]
    skipped: list[Skipped]
    warnings: list[str] = field(default_factory=list)
    details: dict[str, object] = field(default_factory=dict)
    histograms: list[Histogram] = field(default_factory=list)


def select(model: onnx.ModelProto, plan: Plan) -> Selection:
    """The weights to quantize: selection minus those a layer override skips (reported as skipped)."""
    selection = select_weights(model, min_elements=plan.min_elements, exclude=plan.exclude)
    kept = []
    for weight in selection.weights:
        if layer_setting(plan, weight.name).skip:
            selection.skipped.append(Skipped(weight.name, weight.op_types, "skipped by a layer override", weight.shape))
        else:
            kept.append(weight)
    selection.weights = kept
    return selection


def finite(weights: list[Weight], skipped: list[Skipped]) -> list[Weight]:
    """The weights without NaN/Inf; the others join `skipped`."""
    kept = []
    for weight in weights:
        if np.isfinite(weight.array()).all():
            kept.append(weight)
        else:
            skipped.append(Skipped(weight.name, weight.op_types, "contains NaN or Inf", weight.shape))
    return kept


def require_weights(items: Sequence[object], skipped: list[Skipped]) -> None:
    if not items:
        reasons = "; ".join(f"{s.name}: {s.reason}" for s in skipped[:3]) or "no Conv, ConvTranspose, Gemm, MatMul or RNN reads a constant weight"
        raise UnsupportedModelError(f"nothing to quantize ({reasons})")


def readers_note(weight: Weight) -> str | None:
    if not weight.other_readers:
        return None
    return f"also read by {', '.join(sorted(set(weight.other_readers)))}, which sees the quantized values"


def join(*notes: str | None) -> str | None:
    return "; ".join(n for n in notes if n) or None
