"""Loading and atomically saving ONNX models: the only module that touches model files."""

from __future__ import annotations

import mmap
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from stat import S_ISREG

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, helper, numpy_helper

from qconvert.errors import InputError, OutputError, first_line


def load_model(path: Path) -> tuple[onnx.ModelProto, int]:
    """Read a model or raise InputError naming the problem.

    Large initializers stay in the file: they come back lazy (`is_lazy`), and `tensor_array` reads
    one when it is needed, so a conversion holds one weight at a time instead of all of them. So do
    weights in external data files (models over 2 GB). Returns the model and its size on disk: the
    file plus the external data files it names.
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    model, locations = _read(path)
    try:
        onnx.checker.check_model(_checkable(model))
    except Exception as e:  # ValidationError, or a C++ error for odd protobufs
        raise InputError(f"{path}: invalid ONNX model: {first_line(e)}") from e
    size = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
    return model, size


def _checkable(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for the ONNX checker: lazy tensors point at "#" data, which it takes as held in memory
    (it checks their fields, not their bytes; a real path it would want relative, beside the model)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        if is_lazy(tensor):
            next(e for e in tensor.external_data if e.key == "location").value = "#lazy"
    return copy


LAZY_BYTES = 1024  # initializers with more raw data than this are read from the file when needed
_SOURCE = "qconvert_source"  # external_data key of a lazy tensor: the identity of the file it reads


def _read(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """The model with its large initializers lazy, and the external data files it names."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if not S_ISREG(stat.st_mode):  # read more than once (validation reads it again): a pipe would be empty then
                raise InputError(f"{path}: not a regular file; to read a model from a pipe, give - (standard input)")
            if stat.st_size == 0:
                raise InputError(f"{path}: not an ONNX model (the file is empty)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:  # only the pages read are resident
                skeleton, held = _hollow(data)
        model = onnx.ModelProto()
        model.ParseFromString(skeleton)
    except (DecodeError, IndexError) as e:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed)") from e
    except OSError as e:
        raise InputError(f"{path}: cannot read model: {e.strerror or e}") from e
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    locations = set()
    for i, tensor in enumerate(model.graph.initializer):
        if i in held:
            _make_lazy(tensor, path.resolve(), _identity(stat), *held[i])
        elif tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            location = info.get("location", "")
            if not location or Path(location).is_absolute() or ".." in Path(location).parts:
                raise InputError(f"{path}: the external data of {tensor.name} must be a file in the model's folder")
            locations.add(location)
            file = (path.parent / location).resolve()
            if not file.is_relative_to(
                path.parent.resolve()
            ):  # a symbolic link out of the folder: refused, as onnxruntime does
                raise InputError(
                    f"{path}: the external data of {tensor.name} leads outside the model's folder ({location})"
                )
            try:
                offset = int(info.get("offset", 0))
                stat = file.stat()
                length = int(info["length"]) if "length" in info else stat.st_size - offset
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: cannot read the external data of {tensor.name}: {e}") from e
            _make_lazy(tensor, file, _identity(stat), offset, length)
    return model, locations


def _make_lazy(tensor: onnx.TensorProto, file: Path, identity: str, offset: int, length: int) -> None:
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type) if tensor.data_type in _PLAIN_TYPES else None
    if dtype is not None and length != dtype.itemsize * int(np.prod(tensor.dims, dtype=np.int64)):
        raise InputError(
            f"{file}: tensor {tensor.name} holds {length} bytes, not the {list(tensor.dims)} {dtype} it declares"
        )
    tensor.ClearField("external_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", str(file)), ("offset", offset), ("length", length), (_SOURCE, identity)):
        tensor.external_data.add(key=key, value=str(value))


def _identity(stat: os.stat_result) -> str:
    return f"{stat.st_dev}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"


def is_lazy(tensor: onnx.TensorProto) -> bool:
    """Whether the tensor's data is still in the input file (see `load_model`)."""
    return tensor.data_location == onnx.TensorProto.EXTERNAL and any(e.key == _SOURCE for e in tensor.external_data)


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of raw data a tensor holds, in memory or (lazy) in its file."""
    if is_lazy(tensor):
        return int(next(e.value for e in tensor.external_data if e.key == "length"))
    return len(tensor.raw_data)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    """The tensor's values, read from its file when it is lazy (`onnx.numpy_helper.to_array` otherwise)."""
    if not is_lazy(tensor):
        return numpy_helper.to_array(tensor)
    data = _lazy_bytes(tensor)
    if tensor.data_type in _PLAIN_TYPES and sys.byteorder == "little":
        return np.frombuffer(data, helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tensor.dims)
    return numpy_helper.to_array(
        onnx.TensorProto(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type, raw_data=data)
    )


def materialize(model: onnx.ModelProto) -> None:
    """Read every lazy initializer into the model, which then stands alone (to be serialized)."""
    for tensor in model.graph.initializer:
        if is_lazy(tensor):
            data = _lazy_bytes(tensor)
            tensor.ClearField("external_data")
            tensor.ClearField("data_location")
            tensor.raw_data = data


def read_in_place(pairs: list[tuple[onnx.TensorProto, onnx.TensorProto]]) -> Path | None:
    """Point each (data-less tensor, lazy tensor) pair's first at the second's bytes in the input files, as
    external data relative to the folder returned (None: no pairs), so that onnxruntime reads the weights
    itself: it then holds one copy, not ours and the one it optimizes."""
    if not pairs:
        return None
    sources = [{e.key: e.value for e in lazy.external_data} for _, lazy in pairs]
    for file, identity in {info["location"]: info[_SOURCE] for info in sources}.items():
        try:
            same = _identity(os.stat(file)) == identity
        except OSError as e:
            raise InputError(f"{file}: cannot read: {e.strerror or e}") from e
        if not same:
            raise InputError(f"{file}: the model file changed while qconvert was reading it")
    folder = Path(os.path.commonpath([os.path.dirname(info["location"]) for info in sources]))
    for (tensor, _), info in zip(pairs, sources):
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key in ("offset", "length"):
            tensor.external_data.add(key=key, value=info[key])
        tensor.external_data.add(key="location", value=os.path.relpath(info["location"], folder))
    return folder


def _lazy_bytes(tensor: onnx.TensorProto) -> bytes:
    info = {e.key: e.value for e in tensor.external_data}
    file, length = info["location"], int(info["length"])
    try:
        with open(file, "rb") as f:
            if _identity(os.fstat(f.fileno())) != info[_SOURCE]:
                raise InputError(f"{file}: the model file changed while qconvert was reading it")
            f.seek(int(info["offset"]))
            data = f.read(length)
    except OSError as e:
        raise InputError(f"{file}: cannot read {tensor.name}: {e.strerror or e}") from e
    if len(data) != length:
        raise InputError(f"{file}: cannot read {tensor.name}: the file ends early")
    return data


_PLAIN_TYPES = {  # stored as numpy stores them: raw data -> array with no conversion
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT64,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.BOOL,
}

# Protobuf wire format, for `_hollow`: field numbers of ModelProto.graph, GraphProto.initializer and
# TensorProto.raw_data, and the wire types.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


def _hollow(data: mmap.mmap) -> tuple[bytes, dict[int, tuple[int, int]]]:
    """The serialized model without the raw data of its large main-graph initializers, and where that data
    is: {index among the initializers: (file offset, length)}. Reads only the bytes around the weights."""
    held: dict[int, tuple[int, int]] = {}
    count = 0

    def tensor(start: int, end: int) -> bytes:
        nonlocal count
        index, count = count, count + 1
        fields = list(_fields(data, start, end))
        raw = [(s, e) for number, wire, s, e, _ in fields if number == _TENSOR_RAW_DATA and wire == _LENGTH_DELIMITED]
        if len(raw) != 1 or raw[0][1] - raw[0][0] <= LAZY_BYTES:
            return data[start:end]
        held[index] = raw[0][0], raw[0][1] - raw[0][0]
        return b"".join(data[at:e] for number, _, _, e, at in fields if number != _TENSOR_RAW_DATA)

    def graph(start: int, end: int) -> bytes:
        return _rebuilt(data, start, end, _GRAPH_INITIALIZER, tensor)

    return _rebuilt(data, 0, len(data), _MODEL_GRAPH, graph), held


def _rebuilt(data: mmap.mmap, start: int, end: int, number: int, rebuild: Callable[[int, int], bytes]) -> bytes:
    """The message in data[start:end] with each length-delimited field `number` replaced by `rebuild(value span)`."""
    out = bytearray()
    for field, wire, s, e, at in _fields(data, start, end):
        if field == number and wire == _LENGTH_DELIMITED:
            value = rebuild(s, e)
            out += _varint(number << 3 | _LENGTH_DELIMITED) + _varint(len(value)) + value
        else:
            out += data[at:e]
    return bytes(out)


def _fields(data: mmap.mmap, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, value start, value end, field start) of each field in data[start:end]."""
    at = start
    while at < end:
        key, s = _read_varint(data, at)
        wire = key & 7
        if wire == _VARINT:
            e = _read_varint(data, s)[1]
        elif wire == _FIXED64:
            e = s + 8
        elif wire == _LENGTH_DELIMITED:
            length, s = _read_varint(data, s)
            e = s + length
        elif wire == _FIXED32:
            e = s + 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        if e > end:
            raise DecodeError("truncated message")
        yield key >> 3, wire, s, e, at
        at = e


def _read_varint(data: mmap.mmap, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def verify_written(path: Path, data: bytes) -> None:
    """Read a written model back: it must be exactly the bytes that were checked and validated.

    A mismatch (a disk or filesystem fault) removes the file.
    """
    if is_special(path):
        return
    try:
        same = path.read_bytes() == data
    except OSError as e:
        raise OutputError(f"{path}: cannot read the written model back: {e.strerror or e}") from e
    if not same:
        path.unlink(missing_ok=True)
        raise OutputError(f"{path}: the written model does not read back as written; removed it")


def save_model(data: bytes, path: Path) -> int:
    """Write a serialized model to `path` atomically (temp file + rename); returns the size in bytes."""
    directory = path.parent
    if not directory.is_dir():
        raise OutputError(f"{directory}: output directory does not exist")
    return write_atomically(path, data)


def is_special(path: Path) -> bool:
    """A device, FIFO or socket (/dev/null, /dev/stdout ...): written in place, never replaced."""
    return path.exists() and not path.is_file() and not path.is_dir()


def write_atomically(path: Path, data: bytes) -> int:
    """Write bytes to a temp file beside `path`, fsync, rename: readers never see half a file.

    A special file (/dev/null, a FIFO) is written directly: renaming over it would replace the device.
    """
    if is_special(path):
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
        return len(data)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return len(data)


PROTOBUF_LIMIT = (1 << 31) - 1  # bytes: a larger model must keep its weights in an external data file
EXTERNAL_THRESHOLD = 1024  # bytes: smaller tensors stay in the model file


def stage_external(model: onnx.ModelProto, path: Path) -> Path:
    """Write `model` as `path.name` plus its weights in `path.name + ".data"`, inside a fresh hidden folder
    beside `path` (the same file system, so `publish` is two renames). Returns the staged model file.

    The model's tensors are moved out as they are written: it is not usable afterwards.
    """
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
    staged = stage / path.name
    try:
        onnx.save_model(
            model,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=external_name(path),
            size_threshold=EXTERNAL_THRESHOLD,
        )
        _settle(staged, stage / external_name(path))
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return staged


def stage_copy(staged: Path, path: Path) -> Path:
    """A staged model and its data file copied into a fresh stage beside `path`, named after it (the model's
    tensors then name the new data file). Returns the new staged model file."""
    model = onnx.load(str(staged), load_external_data=False)
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            next(e for e in tensor.external_data if e.key == "location").value = external_name(path)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
    try:
        shutil.copyfile(staged.parent / external_name(staged), stage / external_name(path))
        (stage / path.name).write_bytes(model.SerializeToString())
        _settle(stage / path.name, stage / external_name(path))
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return stage / path.name


def _settle(*files: Path) -> None:
    """Usual permissions (onnx creates data files 0600) and on disk."""
    for file in files:
        os.chmod(file, 0o666 & ~_umask())
        with open(file, "rb+") as f:
            os.fsync(f.fileno())


def external_name(path: Path) -> str:
    """The data file of a model written with external data: named after it, next to it."""
    return f"{path.name}.data"


def staged_bytes(staged: Path) -> int:
    return staged.stat().st_size + (staged.parent / external_name(staged)).stat().st_size


def publish(staged: Path, path: Path) -> None:
    """Move a staged model and its data file into place (data first: the model never names missing data).
    The caller `discard`s the staging folder either way."""
    try:
        os.replace(staged.parent / external_name(staged), path.parent / external_name(path))
        os.replace(staged, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e


def discard(staged: Path) -> None:
    shutil.rmtree(staged.parent, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
