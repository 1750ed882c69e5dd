"""Loading and atomically saving ONNX models: the only module that touches model files."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from qconvert.errors import InputError, OutputError, first_line


def load_model(path: Path) -> tuple[onnx.ModelProto, int]:
    """Read a model (and its external data) or raise InputError naming the problem.

    Returns the model and its size on disk: the file plus the external data files it names (a model
    over 2 GB keeps its weights there).
    """
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file")
    try:  # checked before it is loaded: the checker's own copy beside ours would double the peak memory
        onnx.checker.check_model(str(path))  # by path: works past protobuf's 2 GB and checks external data
    except Exception as e:  # ValidationError, or a C++ error for odd protobufs
        _read(path)  # a file that is not a model at all gets that said
        raise InputError(f"{path}: invalid ONNX model: {first_line(e)}") from e
    model, locations = _read(path)
    size = path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)
    return model, size


def _read(path: Path) -> tuple[onnx.ModelProto, set[str]]:
    """The model with its external data loaded, and the data files it names."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
        onnx.load_external_data_for_model(model, str(path.parent))
    except DecodeError as e:
        raise InputError(f"{path}: not an ONNX model (protobuf parse failed)") from e
    except (OSError, ValueError, onnx.checker.ValidationError) as e:  # unreadable, external data missing
        raise InputError(f"{path}: cannot read model: {first_line(e)}") from e
    if not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes)")
    return model, locations


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
        onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_name(path), size_threshold=EXTERNAL_THRESHOLD)
        for file in (staged, stage / external_name(path)):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from e
        raise
    return staged


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
