"""A folder of images as one model input: decode, resize, lay out and normalize as the user documents."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qconvert.errors import InputError, UsageError, first_line

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the model's input: x = ((pixel · scale) − mean) / std, per channel."""

    size: tuple[int, int] | None = None  # (height, width); None: the model's fixed input size
    layout: str | None = None  # "nchw" or "nhwc"; None: guessed from the input shape
    channel_order: str = "rgb"
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.layout not in (None, "nchw", "nhwc"):
            raise UsageError(f"--layout must be nchw or nhwc, got {self.layout!r}")
        if self.channel_order not in ("rgb", "bgr"):
            raise UsageError(f"--channel-order must be rgb or bgr, got {self.channel_order!r}")
        if any(s == 0 for s in self.std):
            raise UsageError("--std values must not be 0")


def load_images(folder: Path, shape: list[int | str | None], prep: Preprocessing) -> np.ndarray:
    """Every image in `folder` (sorted by name) as one float32 array [N, ...] for an input of `shape`."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError("reading a folder of images needs Pillow: pip install 'qconvert[images]'") from None
    if len(shape) != 4:
        raise InputError(f"{folder}: a folder of images needs a 4-D image input, the model's has shape {shape}")
    layout = prep.layout or ("nhwc" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "nchw")
    dims = (shape[1], shape[2], shape[3]) if layout == "nchw" else (shape[3], shape[1], shape[2])
    if prep.size:
        dims = (dims[0], *prep.size)
    if not all(isinstance(d, int) and d > 0 for d in dims):
        raise UsageError(f"the model's image size is not fixed ({shape}); give it with --image-size HxW")
    channels, height, width = (int(d) for d in dims)  # type: ignore[arg-type]
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(channels)
    if mode is None:
        raise InputError(f"{folder}: cannot make {channels}-channel images")
    batch: np.ndarray = np.empty((len(files), height, width, channels), np.float32)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert(mode).resize((width, height), Image.Resampling.BILINEAR), np.float32)
        except Exception as e:  # Pillow raises many types for bad files
            raise InputError(f"{path}: cannot read image: {first_line(e)}") from e
        batch[i] = pixels.reshape(height, width, channels)
    if prep.channel_order == "bgr" and channels == 3:
        batch = batch[..., ::-1]
    batch = (batch * prep.scale - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return np.ascontiguousarray(batch.transpose(0, 3, 1, 2) if layout == "nchw" else batch, dtype=np.float32)
