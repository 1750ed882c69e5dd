"""What a model holds, before converting it: signature, weights, and the size each method would give."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from qconvert import io
from qconvert.opset import default_opset
from qconvert.select import select_weights

KMEANS_BITS = (8, 6, 4, 3, 2, 1)
LINEAR_BITS = (8, 4)


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
    estimates: list[dict[str, Any]] = []
    for bits in KMEANS_BITS:
        stored = sum(-(-w.elements * bits // 8) + (1 << bits) * itemsize[w.name] for w in selection.weights)
        estimates.append({"method": "kmeans", "bits": bits, "granularity": "per-tensor", "bytes": size - float_bytes + stored})
    for bits in LINEAR_BITS:
        for per_channel in (False, True):
            stored = sum(
                -(-w.elements * bits // 8) + (w.shape[w.channel_axis] if per_channel and w.channel_axis is not None else 1) * 5
                for w in selection.weights
            )
            estimates.append({"method": "linear", "bits": bits, "granularity": "per-channel" if per_channel else "per-tensor",
                              "bytes": size - float_bytes + stored})
    for estimate in estimates:
        estimate["ratio"] = estimate["bytes"] / size
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
