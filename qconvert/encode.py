"""Graph rewriting: palettized weights become index + codebook tensors and in-graph decode nodes."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from functools import partial

import ml_dtypes
import numpy as np
import onnx

from qconvert.opset import default_opset
from qconvert.quant.kmeans import Palette, reconstruct
from qconvert.quant.layout import from_rows
from qconvert.rewrite import GraphEdit, replace_weights
from qconvert.select import Weight


class IndexStorage(StrEnum):
    """How palette indices are stored in the file."""

    UINT8 = "uint8"  # one byte per index; any opset
    UINT4 = "uint4"  # native 4-bit tensor; opset >= 21
    UINT2 = "uint2"  # native 2-bit tensor; opset >= 25
    PACKED = "packed"  # groups of 8 b-bit indices in b bytes, unpacked by integer ops; opset >= 10

    @property
    def bits(self) -> int | None:
        return {"uint8": 8, "uint4": 4, "uint2": 2}.get(self.value)


NATIVE_MIN_OPSET = {IndexStorage.UINT4: 21, IndexStorage.UINT2: 25}
PACKED_MIN_OPSET = 10  # Mod and Slice-with-inputs
NATIVE_DTYPE = {IndexStorage.UINT8: np.uint8, IndexStorage.UINT4: ml_dtypes.uint4, IndexStorage.UINT2: ml_dtypes.uint2}
# ORT's int64 ReduceSum goes through double: a packed group must fit in 53 bits, so 7-bit indices
# (8 x 7 = 56 bits) are stored as uint8 instead.
PACKABLE_BITS = (1, 2, 3, 4, 5, 6)


def preferred_storage(bits: int) -> IndexStorage:
    """The tightest storage for `bits`-bit indices, ignoring the opset."""
    if bits == 4:
        return IndexStorage.UINT4
    if bits == 2:
        return IndexStorage.UINT2
    if bits in PACKABLE_BITS:
        return IndexStorage.PACKED
    return IndexStorage.UINT8


def fallback_storage(bits: int, opset: int) -> IndexStorage:
    """The tightest storage that needs no opset above `opset`."""
    if bits in PACKABLE_BITS and opset >= PACKED_MIN_OPSET:
        return IndexStorage.PACKED
    return IndexStorage.UINT8


def min_opset(storage: IndexStorage) -> int:
    return NATIVE_MIN_OPSET.get(storage, PACKED_MIN_OPSET if storage is IndexStorage.PACKED else 1)


@dataclass(frozen=True)
class EncodedWeight:
    """A weight with its palette, ready to be written into the graph."""

    weight: Weight
    palette: Palette
    axis: int | None  # channel axis of the codebooks; None for one codebook
    bits: int
    storage: IndexStorage
    shared_codebook: bool = False  # a codebook every weight may hold (an integer grid's): stored once per graph

    def dequantized(self) -> np.ndarray:
        return from_rows(reconstruct(self.palette), self.weight.shape, self.axis)


def index_bytes(count: int, storage: IndexStorage, bits: int) -> int:
    """Bytes that `count` indices of `bits` bits take stored this way."""
    index_bits = storage.bits or bits
    return -(-count // 8) * index_bits if storage is IndexStorage.PACKED else -(-count * index_bits // 8)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Little-endian bit packing: each group of 8 indices becomes `bits` bytes -> [groups, bits] uint8."""
    flat = indices.reshape(-1).astype(np.uint64)
    groups = -(-flat.size // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[: flat.size] = flat
    shifts = np.arange(8, dtype=np.uint64) * np.uint64(bits)
    words = np.bitwise_or.reduce(padded.reshape(groups, 8) << shifts, axis=1)
    return words.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits].copy()


def encode_palettes(model: onnx.ModelProto, items: list[EncodedWeight]) -> onnx.ModelProto:
    """Replace each weight by its palette and decode nodes, in place; returns `model`.

    The palette tensors become initializers of the graph that held the weight (initializer or Constant
    node), and the decode nodes go to the top of that graph. The decoded tensor keeps the weight's
    name, so every consumer reads it unchanged.
    """
    opset = default_opset(model)
    replace_weights(model, [(item.weight, partial(_decode, item=item, opset=opset)) for item in items])
    return model


def _decode(edit: GraphEdit, *, item: EncodedWeight, opset: int) -> None:
    """Tensors and nodes that rebuild the weight: indices -> (unpack) -> (+ channel offset) -> Gather."""
    weight, palette, axis, bits, storage = item.weight, item.palette, item.axis, item.bits, item.storage
    base, shape = weight.name, weight.shape
    channels, k = palette.codebook.shape
    indices = from_rows(palette.indices, shape, axis)
    offset_dtype: type[np.integer]
    if storage is IndexStorage.PACKED:
        offset_dtype = np.int64
        shared = f"pack{bits}"
        wide = edit.node(
            base,
            "Cast",
            [edit.constant(base, "packed_indices", pack_indices(indices, bits))],
            "packed_i64",
            to=onnx.TensorProto.INT64,
        )
        byte_scale = edit.constant(base, f"{shared}_byte_scale", (256 ** np.arange(bits)).astype(np.int64), share=True)
        scaled = edit.node(base, "Mul", [wide, byte_scale], "bytes_scaled")
        if opset >= 13:
            axis_one = edit.constant(base, "axis1", np.array([1], np.int64), share=True)
            words = edit.node(base, "ReduceSum", [scaled, axis_one], "words", keepdims=1)
        else:
            words = edit.node(base, "ReduceSum", [scaled], "words", axes=[1], keepdims=1)
        field_scale = edit.constant(
            base, f"{shared}_field_scale", (2 ** (bits * np.arange(8))).astype(np.int64), share=True
        )
        fields = edit.node(base, "Div", [words, field_scale], "fields")
        modulus = edit.constant(base, f"{shared}_modulus", np.array(1 << bits, np.int64), share=True)
        padded = edit.node(base, "Mod", [fields, modulus], "indices_padded")
        flat = edit.node(
            base,
            "Reshape",
            [padded, edit.constant(base, "flat_shape", np.array([-1], np.int64), share=True)],
            "indices_flat",
        )
        start = edit.constant(base, "zero", np.array([0], np.int64), share=True)
        stop = edit.constant(base, "count", np.array([indices.size], np.int64), share=True)
        trimmed = edit.node(base, "Slice", [flat, start, stop], "indices_trimmed")
        index = edit.node(
            base, "Reshape", [trimmed, edit.constant(base, "shape", np.array(shape, np.int64), share=True)], "indices"
        )
    else:
        offset_dtype = np.int32
        stored = edit.constant(base, "indices", indices.astype(NATIVE_DTYPE[storage]))
        index = edit.node(base, "Cast", [stored], "indices_i32", to=onnx.TensorProto.INT32)
    if channels > 1:
        index = edit.node(
            base, "Add", [index, _offsets(edit, base, palette, shape, axis, offset_dtype)], "indices_global"
        )
    codebook = edit.constant(base, "codebook", palette.codebook.reshape(-1), share=item.shared_codebook)
    if palette.scale is None:
        edit.node(base, "Gather", [codebook, index], "decode", output=base, axis=0)
        return
    normalised = edit.node(base, "Gather", [codebook, index], "decode_normalised", axis=0)
    scale_shape = [1] * len(shape)
    scale_shape[axis if axis is not None else 0] = palette.scale.size
    scale = edit.constant(base, "scale", palette.scale.astype(palette.codebook.dtype).reshape(scale_shape))
    edit.node(base, "Mul", [normalised, scale], "decode", output=base)


def _offsets(
    edit: GraphEdit, base: str, palette: Palette, shape: tuple[int, ...], axis: int | None, dtype: type[np.integer]
) -> str:
    """Where each channel's codebook starts in the flat codebook tensor, shaped to broadcast along `axis`.
    A grouped palette's are its own, stored as uint16 where they fit and widened by a Cast."""
    offsets_shape = [1] * len(shape)
    offsets_shape[axis if axis is not None else 0] = palette.indices.shape[0]
    k = palette.codebook.shape[1]
    if palette.owner is None:
        offsets = (np.arange(palette.codebook.shape[0], dtype=dtype) * k).reshape(offsets_shape)
        return edit.constant(base, "channel_offsets", offsets, share=True)
    starts = (palette.owner * k).reshape(offsets_shape)
    narrow = edit.constant(base, "group_offsets", starts.astype(_offset_storage(palette)))
    return edit.node(
        base, "Cast", [narrow], "group_offsets_wide", to=onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    )


def _offset_storage(palette: Palette) -> type[np.integer]:
    assert palette.owner is not None
    return np.uint16 if int(palette.owner.max()) * palette.codebook.shape[1] <= np.iinfo(np.uint16).max else np.int32


def offset_bytes(palette: Palette) -> int:
    """Bytes that a grouped palette's per-channel offsets take in the file (other palettes: none of their own)."""
    return 0 if palette.owner is None else palette.owner.size * np.dtype(_offset_storage(palette)).itemsize
