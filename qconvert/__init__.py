"""qconvert: shrink ONNX CNNs by palettizing or linearly quantizing their weights, then validate.

import qconvert
result = qconvert.kmeans("model.onnx", bits=4, data="val.npz", min_snr=20)
result.save("model.kmeans4.onnx")
print(result.report.to_markdown())
"""

from qconvert.api import Conversion, auto, compare, debug, float16, inspect, kmeans, linear, run
from qconvert.errors import (
    CannotRunError,
    GateFailed,
    InputError,
    OutputError,
    QConvertError,
    UnsupportedModelError,
    UsageError,
)
from qconvert.version import __version__

__all__ = [
    "__version__",
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
    "debug",
    "float16",
    "inspect",
    "kmeans",
    "linear",
    "run",
]
