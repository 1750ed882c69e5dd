"""Raising a model's default-domain opset (and IR version) with the ONNX version converter."""

from __future__ import annotations

import onnx
from onnx import helper, version_converter

from qconvert.errors import UnsupportedModelError, first_line

DEFAULT_DOMAINS = ("", "ai.onnx")


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def raise_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """A copy of `model` converted to opset `target`, its IR version raised to what that opset needs.

    Only bumping `opset_import` would break ops whose signature changed (ReduceMean at 18, ...), so
    the version converter rewrites them. Raises UnsupportedModelError when it cannot.
    """
    try:
        converted = version_converter.convert_version(model, target)
        converted.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(converted.opset_import)))
    except Exception as e:  # the converter raises bare RuntimeError/ConvertError
        raise UnsupportedModelError(f"cannot convert the model to opset {target}: {first_line(e)}") from e
    try:
        onnx.checker.check_model(converted, full_check=True)
    except Exception as e:
        if _passes_full_check(model):  # the conversion broke it (seen: Reshape rank in a CRNN at 12 -> 21)
            raise UnsupportedModelError(f"the model converted to opset {target} fails the ONNX checker: {first_line(e)}") from e
    return converted


def _passes_full_check(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception:
        return False
    return True
