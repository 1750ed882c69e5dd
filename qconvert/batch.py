"""Converting many models: one process per core, results in input order, the worst exit code wins."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qconvert import io
from qconvert.errors import ExitCode, QConvertError, UsageError
from qconvert.gates import Gates
from qconvert.pipeline import convert, default_output
from qconvert.plan import AnyPlan, ValidationPlan

WORKERS = 2


@dataclass(frozen=True)
class Job:
    model: Path
    output: Path
    plan: AnyPlan
    validation: ValidationPlan | None
    gates: Gates
    keep_failed: bool


@dataclass(frozen=True)
class Outcome:
    model: Path
    exit_code: int
    message: str  # the error, or "" on success
    report_json: str | None  # None when no report was made (the conversion failed before it)
    input_bytes: int = 0
    output_bytes: int = 0
    snr_db: float | None = None
    passed: bool = True


def expand(models: tuple[Path, ...]) -> list[Path]:
    """Model paths, a directory standing for the .onnx files in it (sorted); each at most once."""
    paths: list[Path] = []
    for model in models:
        found = sorted(model.glob("*.onnx")) if model.is_dir() else [model]
        if model.is_dir() and not found:
            raise UsageError(f"{model}: no .onnx files in this directory")
        paths += [p for p in found if p not in paths]
    return paths


def run_all(jobs: list[Job]) -> list[Outcome]:
    """Convert every job, two at a time; outcomes come back in job order."""
    if len(jobs) == 1:
        return [_run(jobs[0])]
    context = multiprocessing.get_context("spawn")  # no fork after onnxruntime has started threads
    with ProcessPoolExecutor(max_workers=min(WORKERS, len(jobs)), mp_context=context) as pool:
        return list(pool.map(_run, jobs))


def worst(outcomes: list[Outcome]) -> int:
    """The largest exit code of all (0 when every model converted and passed its gates)."""
    return max((o.exit_code for o in outcomes), default=int(ExitCode.OK))


def _run(job: Job) -> Outcome:
    try:
        # one process per model already: no nested pool
        report = convert(
            job.model, job.output, job.plan, job.validation, gates=job.gates, keep_failed=job.keep_failed, workers=1
        ).report
    except QConvertError as e:
        return Outcome(job.model, int(e.exit_code), str(e), None)
    except Exception as e:  # a bug in one model's conversion must not sink the others
        return Outcome(job.model, int(ExitCode.INTERNAL), f"internal error: {type(e).__name__}: {e}", None)
    io.write_atomically(job.output.with_suffix(".report.json"), report.to_json().encode())
    snr = (
        min((o.snr_db for o in report.validation.outputs if o.snr_db is not None), default=None)
        if report.validation
        else None
    )
    code = int(ExitCode.OK if report.passed else ExitCode.GATE)
    message = "" if report.passed else "quality gate failed"
    return Outcome(
        job.model, code, message, report.to_json(), report.input_bytes, report.output_bytes, snr, report.passed
    )


def output_for(model: Path, directory: Path, plan: AnyPlan) -> Path:
    return directory / default_output(model, plan).name
