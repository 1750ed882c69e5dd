"""The conversion report: its data, and its versioned JSON form (renderings in `qconvert.render`)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime

from qconvert.gates import GateResult
from qconvert.select import Skipped
from qconvert.validate import ValidationResult
from qconvert.version import __version__

SCHEMA_VERSION = 10  # 3: validation.metric (the task metric); 4: held-out calibration checks (in-sample beside);
# 5: options.group_size and options.equalize, granularity "grouped", details.equalized, details.auto.held_out,
# latency_ms at 2 threads too (float_2t, converted_2t), time_by_op; 6: method "float16", options.float16,
# details.float16, options.block_size, granularity "blocked"; 7: details.calibration.sequential, technique "sequential",
# options.sequential; 8: details.calibration.sequential.last_layer (its bias shift measured with and without);
# 9: options.small_weights (k-means: weights under --min-elements take int8); 10: sequential.last_layer always,
# with plain_model_snr_db (and plain_shifted_model_snr_db) and rounded_again


@dataclass(frozen=True)
class WeightReport:
    name: str
    source: str  # initializer | constant
    graph: str
    consumers: list[str]
    shape: list[int]
    elements: int
    dtype: str
    bits: int
    granularity: str
    channel_axis: int | None
    groups: int  # codebooks (kmeans) or scales (linear)
    float_bytes: int
    stored_bytes: int
    snr_db: float | None  # None: represented exactly
    note: str | None = None
    techniques: list[str] = field(
        default_factory=list
    )  # batchnorm-folded, data-aware, error-compensated, bias-corrected
    layer_snr_db: float | None = (
        None  # the layer's output vs float on the calibration data (None: not measured or exact)
    )


@dataclass(frozen=True)
class Histogram:
    """A weight's value distribution and the levels it was mapped to (for the HTML report only)."""

    name: str
    counts: list[int]
    edges: list[float]
    levels: list[float]  # centroids or grid values (of one channel when per channel)
    levels_of: str = ""  # "" for the whole tensor, else which channel's levels are drawn

    @staticmethod
    def of(name: str, array: Any, levels: Any, rows: int = 1, bins: int = 60) -> Histogram:
        """`levels` is [rows, L]; with several rows (channels) the widest one is drawn."""
        counts, edges = np.histogram(np.asarray(array, np.float64).ravel(), bins=bins)
        per_row = np.asarray(levels, np.float64).reshape(rows, -1)
        widest = int(np.argmax(per_row.max(axis=1) - per_row.min(axis=1)))
        shown = np.unique(per_row[widest])
        return Histogram(
            name, counts.tolist(), edges.tolist(), shown.tolist(), f"channel {widest}, the widest" if rows > 1 else ""
        )


@dataclass(frozen=True)
class OpsetChange:
    before: int
    after: int
    storage: str  # how the integers are stored: uint4, packed, int8 ...
    note: str | None = None


@dataclass
class Report:
    method: str
    options: dict[str, Any]
    input_path: str
    input_bytes: int
    output_path: str | None
    output_bytes: int  # the model file plus its external data file, if any
    opset: OpsetChange
    weights: list[WeightReport]
    skipped: list[Skipped]
    validation: ValidationResult | None
    latency_ms: dict[str, float] | None = None  # median onnxruntime run time, float vs converted
    time_by_op: dict[str, Any] | None = None  # where the time goes (`validate.Profile.as_dict`)
    gates: list[GateResult] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)  # HTML only, not in the JSON
    details: dict[str, Any] = field(default_factory=dict)  # method-specific facts
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    output_data: str | None = None  # the external data file written beside the output (models over 2 GB ...)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> list[GateResult]:
        return [g for g in self.gates if not g.passed]

    @property
    def size_ratio(self) -> float:
        return self.output_bytes / self.input_bytes if self.input_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        float_bytes = sum(w.float_bytes for w in self.weights)
        stored = sum(w.stored_bytes for w in self.weights)
        return _jsonable(
            {
                "schema_version": SCHEMA_VERSION,
                "tool": versions(),
                "method": self.method,
                "options": self.options,
                "input": {"path": self.input_path, "bytes": self.input_bytes},
                "output": {"path": self.output_path, "bytes": self.output_bytes, "data": self.output_data},
                "size_ratio": self.size_ratio,
                "opset": dataclasses.asdict(self.opset),
                "weights": {
                    "quantized": len(self.weights),
                    "skipped": len(self.skipped),
                    "float_bytes": float_bytes,
                    "stored_bytes": stored,
                    "ratio": stored / float_bytes if float_bytes else 0.0,
                },
                "per_weight": [dataclasses.asdict(w) for w in self.weights],
                "skipped": [dataclasses.asdict(s) for s in self.skipped],
                "validation": dataclasses.asdict(self.validation) if self.validation else None,
                "latency_ms": self.latency_ms,
                "time_by_op": self.time_by_op,
                "gates": {"passed": self.passed, "checks": [dataclasses.asdict(g) for g in self.gates]},
                "details": self.details,
                "warnings": self.warnings,
                "timings_s": self.timings,
            }
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def to_markdown(self) -> str:
        """A Markdown summary that fits a CI job summary (`render.markdown`)."""
        from qconvert.render.markdown import markdown  # renderers build on this module, not it on them

        return markdown(self)

    def to_html(self) -> str:
        """One self-contained HTML page with pictures: inline SVG, no scripts (`render.html`)."""
        from qconvert.render.html import render

        return render(self)


def versions() -> dict[str, str]:
    return {
        "name": "qconvert",
        "version": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _jsonable(value: Any) -> Any:
    """Tuples to lists, non-finite floats to None (JSON has no Infinity)."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
