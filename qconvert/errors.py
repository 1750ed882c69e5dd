"""The error types qconvert raises; each carries the process exit code the CLI turns it into."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Documented process exit codes (README, `qconvert --help`)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it (rerun with --debug for the traceback)
    USAGE = 2  # bad options or arguments (click's own code too)
    INPUT = 3  # model or data file missing, unreadable or not valid ONNX / npz
    UNSUPPORTED = 4  # a valid model qconvert cannot process (nothing to quantize, cannot run)
    GATE = 5  # a quality gate failed: the model was not written (unless --keep-failed)
    OUTPUT = 6  # the output could not be written
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)


class QConvertError(Exception):
    """Base of every error meant for the user: one line of text and an exit code."""

    exit_code = ExitCode.INTERNAL


class UsageError(QConvertError):
    exit_code = ExitCode.USAGE


class InputError(QConvertError):
    exit_code = ExitCode.INPUT


class UnsupportedModelError(QConvertError):
    exit_code = ExitCode.UNSUPPORTED


class OutputError(QConvertError):
    exit_code = ExitCode.OUTPUT


class GateFailed(QConvertError):
    exit_code = ExitCode.GATE


class CannotRunError(UnsupportedModelError):
    """onnxruntime cannot load or run a model; `which` says whether it is the input or the result."""

    def __init__(self, message: str, which: str) -> None:
        super().__init__(message)
        self.which = which


def first_line(e: BaseException) -> str:
    """The first line of an exception's text (library errors can run to pages), for one-line messages."""
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
