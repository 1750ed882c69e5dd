"""qconvert: shrink ONNX CNNs by palettizing or linearly quantizing their weights, then validate."""

__version__ = "0.1.0"
