"""Input second moments H = Σ x xᵀ of a layer, over the columns its weight multiplies (what GPTQ needs).

A Gemm's or MatMul's columns are its input features; a Conv's are the Cin/G·kh·kw values of one input
patch, per group (im2col, cut in row chunks so memory stays bounded). The weight is seen as [G, R, C]:
groups, output rows, columns, in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from onnx import helper

if TYPE_CHECKING:
    from qconvert.fidelity.statistics import Layer

MAX_BYTES = 512 << 20  # the moments of all layers, held at once (float64); layers beyond go without
CHUNK = 1 << 22  # im2col values made at once
_EXPLICIT = (b"NOTSET", b"VALID")  # pads as written (SAME_* pads depend on the input size: left out)


def wanted(layers: dict[str, Layer]) -> dict[str, np.ndarray]:
    """Zeroed H for the layers that take one, in graph order until MAX_BYTES."""
    out, total = {}, 0
    for name, layer in layers.items():
        if (size := shape(layer)) is not None and total + 8 * size[0] * size[1] ** 2 <= MAX_BYTES:
            out[name] = np.zeros((size[0], size[1], size[1]))
            total += out[name].nbytes
    return out


def shape(layer: Layer) -> tuple[int, int] | None:
    """(groups, columns) of the layer's H, or None: a layout this module does not take (Conv beyond 2-D)."""
    if layer.op_type == "Conv":
        if len(layer.weight_shape) not in (3, 4) or _attributes(layer).get("auto_pad", b"NOTSET") not in _EXPLICIT:
            return None
        return layer.groups, int(np.prod(layer.weight_shape[1:]))
    return 1, layer.weight_shape[layer.in_axis]


def matrix(layer: Layer, array: np.ndarray) -> np.ndarray:
    """The weight as [G, R, C]."""
    if layer.op_type == "Conv":
        return array.reshape(layer.groups, array.shape[0] // layer.groups, -1)
    return (array if layer.in_axis == 1 else array.T)[None]


def from_matrix(layer: Layer, rows: np.ndarray) -> np.ndarray:
    """The inverse of `matrix`."""
    if layer.op_type == "Conv":
        return rows.reshape(layer.weight_shape)
    return rows[0] if layer.in_axis == 1 else rows[0].T


def accumulate(layer: Layer, x: np.ndarray, into: np.ndarray) -> None:
    """Add one batch of the layer's input to its H ([G, C, C], float64)."""
    if layer.op_type != "Conv":
        rows = np.moveaxis(x, layer.x_axis, -1).reshape(-1, x.shape[layer.x_axis]).astype(np.float32)
        into[0] += rows.T @ rows  # float32 products of one batch, summed in float64
        return
    for patches in _patches(layer, x):  # [G, M, C]
        into += np.swapaxes(patches, 1, 2) @ patches


def _attributes(layer: Layer) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in layer.node.attribute}


def _patches(layer: Layer, x: np.ndarray) -> Iterator[np.ndarray]:
    """im2col of a 1-D or 2-D convolution's input: [G, M, Cin/G·kh·kw] per chunk of output positions."""
    attributes: dict[str, Any] = _attributes(layer)
    spatial = len(layer.weight_shape) - 2
    lead = [1] * (2 - spatial)  # a 1-D convolution as 2-D of height 1
    x = x.reshape(*x.shape[:2], *lead, *x.shape[2:])
    kernel = lead + list(layer.weight_shape[2:])
    strides = lead + list(attributes.get("strides", [1] * spatial))
    dilations = lead + list(attributes.get("dilations", [1] * spatial))
    pads = list(attributes.get("pads", [0] * 2 * spatial))
    begin, end = [0] * len(lead) + pads[:spatial], [0] * len(lead) + pads[spatial:]
    padded = np.pad(x, [(0, 0), (0, 0), *zip(begin, end)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=(2, 3))
    windows = windows[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]  # [N, Cin, Ho, Wo, kh, kw]
    _, channels, height, width = windows.shape[:4]
    per_position = channels * kernel[0] * kernel[1]
    step = max(1, CHUNK // max(per_position * width, 1))
    for top in range(0, height, step):
        part = windows[:, :, top : top + step]  # [N, Cin, h, Wo, kh, kw]
        part = part.reshape(part.shape[0], layer.groups, -1, *part.shape[2:]).transpose(1, 0, 3, 4, 2, 5, 6)
        yield np.ascontiguousarray(part.reshape(layer.groups, -1, per_position // layer.groups), np.float32)
