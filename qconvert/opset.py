"""Raising a model's default-domain opset (and IR version) with the ONNX version converter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx
from onnx import helper, shape_inference, version_converter

from qconvert.errors import UnsupportedModelError, first_line

DEFAULT_DOMAINS = ("", "ai.onnx")
STRIP_BYTES = 1024  # initializers larger than this leave the model while the converter copies it
_STRIPPED = "__qconvert_stripped__"


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def raise_opset(model: onnx.ModelProto, target: int, *, keep_input: bool = True) -> onnx.ModelProto:
    """A copy of `model` converted to opset `target`, its IR version raised to what that opset needs.

    `keep_input` False: on success the large tensors move to the result and `model` is left without
    them (a caller that drops it then holds one copy of the weights, not two).

    Only bumping `opset_import` would break ops whose signature changed (ReduceMean at 18, ...), so
    the version converter rewrites them. The converter copies the whole model, so large tensors are
    lifted out first and put back after (the peak stays near one model, not two). Raises
    UnsupportedModelError when it cannot convert, or when strict shape inference fails on the result
    but not on the input (seen: Reshape rank in a CRNN at 12 -> 21).
    """
    with _without_tensor_data(model, restore_on_success=keep_input) as data:
        try:
            converted = version_converter.convert_version(model, target)
            converted.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(converted.opset_import)))
        except Exception as e:  # the converter raises bare RuntimeError/ConvertError
            raise UnsupportedModelError(f"cannot convert the model to opset {target}: {first_line(e)}") from e
        error = _inference_error(converted)
        if error and not _inference_error(model):
            raise UnsupportedModelError(f"the model converted to opset {target} fails the ONNX checker: {error}")
        _restore(converted, data, consume=not keep_input)  # moving frees each lifted tensor as it goes
    return converted


def _inference_error(model: onnx.ModelProto) -> str | None:
    try:
        shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        return first_line(e)
    return None


@contextmanager
def _without_tensor_data(model: onnx.ModelProto, *, restore_on_success: bool = True) -> Iterator[dict[str, bytes]]:
    """Lift the raw data of large main-graph initializers out of `model`, and put it back on exit
    (on success only if `restore_on_success`)."""
    data: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if len(tensor.raw_data) > STRIP_BYTES:
            data[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value=_STRIPPED)
    try:
        yield data
    except BaseException:
        _restore(model, data)
        raise
    if restore_on_success:
        _restore(model, data)


def _restore(model: onnx.ModelProto, data: dict[str, bytes], consume: bool = False) -> None:
    for tensor in model.graph.initializer:
        if tensor.name in data and tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.ClearField("data_location")  # as it was: absent, not an explicit DEFAULT
            tensor.raw_data = data.pop(tensor.name) if consume else data[tensor.name]
