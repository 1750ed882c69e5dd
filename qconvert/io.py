"""Loading and atomically saving ONNX models: the only module that touches model files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from qconvert.errors import InputError, OutputError, first_line


def load_model(path: Path) -> onnx.ModelProto:
    """Read a model (and its external data) or raise InputError naming the problem."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(path))
    except DecodeError as e:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed)") from e
    except (OSError, ValueError) as e:  # unreadable file, missing external data file
        raise InputError(f"{path}: cannot read model: {first_line(e)}") from e
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    return model


def save_model(model: onnx.ModelProto, path: Path) -> int:
    """Write `model` to `path` atomically (temp file + rename); returns the size in bytes."""
    directory = path.parent
    if not directory.is_dir():
        raise OutputError(f"{directory}: output directory does not exist")
    data = model.SerializeToString()
    return write_atomically(path, data)


def write_atomically(path: Path, data: bytes) -> int:
    """Write bytes to a temp file beside `path`, fsync, rename: readers never see half a file."""
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
