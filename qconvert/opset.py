"""Raising a model's default-domain opset (and IR version) with the ONNX version converter."""

from __future__ import annotations

import numpy as np
import onnx
from google.protobuf.message import Message
from onnx import helper, shape_inference, version_converter

from qconvert import io
from qconvert.errors import QConvertError, UnsupportedModelError, first_line

DEFAULT_DOMAINS = ("", "ai.onnx")
STRIP_BYTES = io.LAZY_BYTES  # initializers larger than this stay out of the copy that the converter converts
_STRIPPED = "__qconvert_stripped__"


def default_opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)


def raise_opset(model: onnx.ModelProto, target: int, *, keep_input: bool = True) -> onnx.ModelProto:
    """`model` converted to opset `target`, its IR version raised to what that opset needs.

    `keep_input` True returns a converted copy; False converts `model` itself and returns it (one
    copy of the weights in memory, not two).

    Only bumping `opset_import` would break ops whose signature changed (ReduceMean at 18, ...), so
    the version converter rewrites them. It copies whatever it is given, so it converts a skeleton
    whose large initializers hold no data, and the converted graph is grafted back around the
    weights. Raises UnsupportedModelError when it cannot convert, or when strict shape inference fails
    on the result but not on the input (seen: Reshape rank in a CRNN at 12 -> 21).
    """
    skeleton = without_weights(model)
    try:
        converted = version_converter.convert_version(skeleton, target)
        converted.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(converted.opset_import)))
    except Exception as e:  # the converter raises bare RuntimeError/ConvertError
        raise UnsupportedModelError(f"cannot convert the model to opset {target}: {first_line(e)}") from e
    error = _inference_error(converted)
    if error and not _inference_error(skeleton):
        raise UnsupportedModelError(f"the model converted to opset {target} fails the ONNX checker: {error}")
    # the converter records every tensor's inferred type: 19 KB of a 190 KB palettized direction classifier
    known = {v.name for v in model.graph.value_info}
    inferred = [v for v in converted.graph.value_info if v.name in known]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(inferred)
    if keep_input:
        model = _copy(model)
    _graft(converted, model)
    return model


def without_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose large main-graph initializers carry no data (marked external): what the
    version converter and shape inference need, without a copy of the weights."""
    skeleton = onnx.ModelProto()
    _copy_fields(model, skeleton, skip="graph")
    _copy_fields(model.graph, skeleton.graph, skip="initializer")
    for tensor in model.graph.initializer:
        if io.data_bytes(tensor) > STRIP_BYTES:
            hollow = skeleton.graph.initializer.add(
                name=tensor.name, dims=tensor.dims, data_type=tensor.data_type, data_location=onnx.TensorProto.EXTERNAL
            )
            hollow.external_data.add(key="location", value=_STRIPPED)
        else:
            skeleton.graph.initializer.append(tensor)
    return skeleton


def hole(name: str, array: np.ndarray) -> onnx.TensorProto:
    """An initializer without data, like those of `without_weights`, for an array handed over beside it."""
    tensor = onnx.TensorProto(
        name=name,
        dims=array.shape,
        data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
        data_location=onnx.TensorProto.EXTERNAL,
    )
    tensor.external_data.add(key="location", value=_STRIPPED)
    return tensor


def _graft(converted: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Make `model` the converted skeleton again, keeping its own large tensors where the skeleton had holes."""
    for field in [f for f, _ in model.ListFields() if f.name != "graph"]:
        model.ClearField(field.name)
    _copy_fields(converted, model, skip="graph")
    for field in [f for f, _ in model.graph.ListFields() if f.name != "initializer"]:
        model.graph.ClearField(field.name)
    _copy_fields(converted.graph, model.graph, skip="initializer")
    holes = {t.name for t in converted.graph.initializer if is_hole(t)}
    small = {t.name: t for t in converted.graph.initializer if not is_hole(t)}
    initializers = model.graph.initializer
    for i in reversed(range(len(initializers))):  # in place and in order: the weights are never copied
        tensor = initializers[i]
        if tensor.name in small:
            tensor.CopyFrom(small.pop(tensor.name))
        elif tensor.name not in holes or io.data_bytes(tensor) <= STRIP_BYTES:
            del initializers[i]
    initializers.extend(small.values())  # tensors the converter added


def is_hole(tensor: onnx.TensorProto) -> bool:
    """Whether `without_weights` left this tensor without its data."""
    return any(e.value == _STRIPPED for e in tensor.external_data)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _copy_fields(source: Message, target: Message, skip: str) -> None:
    for field, value in source.ListFields():
        if field.name == skip:
            continue
        if isinstance(value, Message):
            getattr(target, field.name).CopyFrom(value)
        elif isinstance(value, (str, bytes, int, float)):
            setattr(target, field.name, value)
        else:  # a repeated field
            getattr(target, field.name).extend(value)


def _inference_error(model: onnx.ModelProto) -> str | None:
    try:
        shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as e:
        return first_line(e)
    return None


class Reach:
    """Whether the model's opset is, or can be raised to, a target: the version converter fails on some
    models (a CRNN's Reshape at 12 -> 21), and a conversion then stores indices another way, or cannot
    store linear layers at all. Each target is tried once, on a copy without the weights."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.current = default_opset(model)
        self._skeleton = without_weights(model)
        self._growth: dict[int, int | None] = {}  # target -> bytes the conversion adds to the graph (None: fails)

    def reachable(self, target: int) -> bool:
        return self.growth(target) is not None

    def growth(self, target: int) -> int | None:
        """Bytes the model's graph gains when converted to `target` (None: it cannot be)."""
        if target <= self.current:
            return 0
        if target not in self._growth:
            try:
                self._growth[target] = raise_opset(self._skeleton, target).ByteSize() - self._skeleton.ByteSize()
            except QConvertError:
                self._growth[target] = None
        return self._growth[target]
