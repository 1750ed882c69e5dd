"""qconvert: shrink ONNX CNNs by palettizing or linearly quantizing their weights, then validate.

import qconvert
result = qconvert.kmeans("model.onnx", bits=4, data="val.npz", min_snr=20)
result.save("model.kmeans4.onnx")
print(result.report.to_markdown())
"""

__version__ = "0.1.0"

from qconvert.api import Conversion, auto, compare, inspect, kmeans, linear, run  # noqa: E402
from qconvert.errors import (  # noqa: E402
    CannotRunError,
    GateFailed,
    InputError,
    OutputError,
    QConvertError,
    UnsupportedModelError,
    UsageError,
)

__all__ = [
    "CannotRunError",
    "Conversion",
    "GateFailed",
    "InputError",
    "OutputError",
    "QConvertError",
    "UnsupportedModelError",
    "UsageError",
    "auto",
    "compare",
    "inspect",
    "kmeans",
    "linear",
    "run",
]
