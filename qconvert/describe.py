"""What a model holds, before converting it: signature, weights, and the size each method would give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from qconvert import io
from qconvert.methods import METHODS
from qconvert.methods.base import Context, file_bytes, opset_for
from qconvert.opset import Reach, default_opset
from qconvert.plan import Granularity, LayerSetting
from qconvert.select import Weight, select_weights

ROWS = [(METHODS["kmeans"], bits, Granularity.PER_TENSOR) for bits in (8, 6, 4, 3, 2, 1)] + [
    (METHODS["linear"], bits, granularity)
    for bits in (8, 4)
    for granularity in (Granularity.PER_TENSOR, Granularity.PER_CHANNEL)
]


def inspect_model(path: Path, *, min_elements: int) -> dict[str, Any]:
    """A JSON-able description of the model at `path` (nothing is written)."""
    model, size = io.load_model(path)
    selection = select_weights(model, min_elements=min_elements)
    weights = [
        {
            "name": w.name,
            "consumers": sorted({c.op_type for c in w.consumers}),
            "shape": list(w.shape),
            "elements": w.elements,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(w.tensor.data_type).name,
            "location": w.source if w.graph_path == "main" else f"{w.source} in {w.graph_path}",
            "channel_axis": w.channel_axis,
            "depthwise": w.depthwise,
        }
        for w in selection.weights
    ]
    itemsize = {w.name: onnx.helper.tensor_dtype_to_np_dtype(w.tensor.data_type).itemsize for w in selection.weights}
    float_bytes = sum(w.elements * itemsize[w.name] for w in selection.weights)
    estimates = _estimates(model, selection.weights, size, float_bytes)
    return {
        "path": str(path),
        "bytes": size,
        "ir_version": model.ir_version,
        "opset": default_opset(model),
        "opset_imports": {o.domain or "ai.onnx": o.version for o in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": [_value(v) for v in model.graph.input if v.name not in {t.name for t in model.graph.initializer}],
        "outputs": [_value(v) for v in model.graph.output],
        "weights": weights,
        "weight_bytes": float_bytes,
        "skipped": [{"name": s.name, "op_type": s.op_type, "reason": s.reason} for s in selection.skipped],
        "estimates": estimates,
    }


def _value(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
    return {"name": value.name, "dtype": dtype, "shape": dims}


def _estimates(model: onnx.ModelProto, weights: list[Weight], size: int, float_bytes: int) -> list[dict[str, Any]]:
    """The file size per method, bits and granularity: the size model of the conversions themselves
    (`methods.base.file_bytes`: data plus decode nodes, at the opset the model can reach), plus the rest."""
    reach = Reach(model)
    context = Context(opset=reach.current)
    estimates = []
    for method, bits, granularity in ROWS:
        total, highest = size - float_bytes, reach.current
        for weight in weights:
            setting = LayerSetting(method.name, bits, granularity, False)
            axis = method.axes(weight, setting, context)[0][-1]
            opset = opset_for(reach, method.need(weight, setting, axis))
            total += file_bytes(method, weight, bits, axis, opset) if opset is not None else weight.array().nbytes
            highest = max(highest, opset or highest)
        total += reach.growth(highest) or 0  # what converting the rest of the graph to that opset adds
        estimates.append(
            {
                "method": method.name,
                "bits": bits,
                "granularity": granularity.value,
                "bytes": total,
                "ratio": total / size,
            }
        )
    return estimates
