"""Checks on samples the conversion did not learn from: where qconvert auto's --data is also its calibration
data (given twice, or --data standing in for it), the samples are split, the conversions fitted on the first
two thirds and every plan measured on the rest; the model written is the one so measured. Measured on the data
it was fitted to, GPTQ met 25 dB with fewer bits on ddddocr's recognizer and lost 19 points of exact match on
unseen lines. (Refitting the chosen plan on all 16 samples of the PP-OCRv4 recognizer's data measured 22.5 dB
where its held-out check had 26.1: on so few samples, the figure that decided is the one to keep.)"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import QConvertError
from qconvert.plan import AutoPlan, ValidationPlan
from qconvert.runtime import load_labels

HELD_SHARE = 3  # one sample in this many is held out
LABELS = "labels"  # the .npz array of labels, beside the inputs


@dataclass(frozen=True)
class Split:
    """The plans and validation to use, and what to say of them in the report (None: nothing was split)."""

    plan: AutoPlan
    validation: ValidationPlan
    details: dict[str, object] | None = None


@contextlib.contextmanager
def held_out(plan: AutoPlan, validation: ValidationPlan) -> Iterator[Split]:
    """`plan` and `validation` as they are, or (the same data, at least 3 samples, as many labels if any) on
    temp files of its samples: the first two thirds to fit, the rest to measure, their labels with them."""
    found = _samples(plan, validation)
    if found is None:
        yield Split(plan, validation)
        return
    arrays, labels, samples = found
    cut = samples - samples // HELD_SHARE
    with tempfile.TemporaryDirectory(prefix="qconvert-held-out-") as folder:
        fit, check = Path(folder, "fit.npz"), Path(folder, "check.npz")
        for path, part in ((fit, slice(0, cut)), (check, slice(cut, samples))):
            parts: dict[str, Any] = {name: array[part] for name, array in arrays.items()}
            np.savez(path, **parts)
        checked = None if labels is None else _held_labels(labels[cut:], Path(folder))
        named = None if validation.labels is None else str(validation.labels)
        details: dict[str, object] = {
            "data": str(validation.data),
            "labels": named,
            "fitted_on": cut,
            "checked_on": samples - cut,
        }
        yield Split(
            dataclasses.replace(plan, calibration=fit),
            dataclasses.replace(validation, data=check, labels=checked),
            details,
        )


def _samples(plan: AutoPlan, validation: ValidationPlan) -> tuple[dict[str, np.ndarray], Any, int] | None:
    """The validation data's arrays, labels and sample count, where it is the calibration data (the same file,
    or .npz files holding the same inputs) and can be split (None otherwise: what is wrong with unreadable
    data, validation says)."""
    data = validation.data
    calibration = plan.calibration or data
    if data is None or calibration is None or {data.suffix.lower(), calibration.suffix.lower()} != {".npz"}:
        return None
    try:
        arrays = _arrays(data)
        if calibration.resolve() != data.resolve() and not _same_inputs(_arrays(calibration), arrays):
            return None
        labels = None if validation.labels is None else load_labels(validation.labels)
    except (OSError, ValueError, zipfile.BadZipFile, QConvertError):
        return None
    samples = min((len(a) for n, a in arrays.items() if n != LABELS and a.ndim), default=0)
    if samples < HELD_SHARE or (labels is not None and len(labels) != samples):
        return None
    return arrays, labels, samples


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as stored:
        return {name: stored[name] for name in stored.files}


def _same_inputs(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    """The same input arrays (labels aside)."""
    inputs = sorted(set(a) - {LABELS})
    return inputs == sorted(set(b) - {LABELS}) and all(np.array_equal(a[n], b[n]) for n in inputs)


def names(split: Split) -> list[tuple[str, str]]:
    """The temp files' paths, and how the report names them: by what they hold."""
    if split.details is None:
        return []
    data, cut, held = (split.details[k] for k in ("data", "fitted_on", "checked_on"))
    assert isinstance(cut, int) and isinstance(held, int)
    found = [
        (str(split.validation.data), f"{data} (samples {cut + 1}-{cut + held}, held out)"),
        (str(split.plan.calibration), f"{data} (samples 1-{cut})"),
    ]
    labels = split.details["labels"]
    return found + ([(str(split.validation.labels), f"{labels} (samples {cut + 1}-{cut + held})")] if labels else [])


def _held_labels(labels: Any, folder: Path) -> Path:
    """The held-out samples' labels, in a file of the kind they came in."""
    if isinstance(labels, np.ndarray):
        np.save(folder / "check_labels.npy", labels)
        return folder / "check_labels.npy"
    (folder / "check_labels.json").write_text(json.dumps(labels))
    return folder / "check_labels.json"
