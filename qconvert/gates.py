"""Quality gates: limits on the validation metrics that decide whether a converted model may ship."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qconvert.errors import UsageError
from qconvert.validate import ValidationResult


@dataclass(frozen=True)
class Gates:
    """Limits; None leaves a gate off."""

    min_snr_db: float | None = None  # every output
    max_abs_error: float | None = None  # every output
    min_top1: float | None = None  # fraction, every class-score output
    max_accuracy_drop: float | None = None  # percentage points, needs labels
    max_metric_drop: float | None = None  # the task metric's drop from float, in its own units (needs --metric)

    @property
    def any(self) -> bool:
        return any(v is not None for v in dataclasses.astuple(self))


@dataclass(frozen=True)
class GateResult:
    gate: str  # the option's name, e.g. "--min-snr"
    subject: str  # the output it measured, or "accuracy"
    value: float | None  # None: not finite (NaN outputs)
    limit: float
    passed: bool

    def __post_init__(self) -> None:  # plain Python types (numpy scalars do not serialize to JSON)
        object.__setattr__(self, "passed", bool(self.passed))
        object.__setattr__(self, "value", None if self.value is None else float(self.value))


def evaluate(gates: Gates, result: ValidationResult) -> list[GateResult]:
    """Every gate against every output it applies to; a gate with nothing to measure is a usage error."""
    checks: list[GateResult] = []
    for output in result.outputs:
        if gates.min_snr_db is not None:
            snr = float("inf") if output.snr_db is None else output.snr_db
            checks.append(GateResult("--min-snr", output.name, _finite(snr), gates.min_snr_db, snr >= gates.min_snr_db))
        if gates.max_abs_error is not None:
            err = output.max_abs_error
            checks.append(
                GateResult(
                    "--max-abs-error", output.name, _finite(err), gates.max_abs_error, err <= gates.max_abs_error
                )
            )
        if gates.min_top1 is not None and output.top1_agreement is not None:
            checks.append(
                GateResult(
                    "--min-top1",
                    output.name,
                    output.top1_agreement,
                    gates.min_top1,
                    output.top1_agreement >= gates.min_top1,
                )
            )
    if gates.min_top1 is not None and not any(c.gate == "--min-top1" for c in checks):
        raise UsageError("--min-top1: no output holds class scores ([N, C] floats) to compare")
    if gates.max_accuracy_drop is not None:
        if result.accuracy is None:
            raise UsageError("--max-accuracy-drop needs labels: a `labels` array in --data, or --labels FILE")
        drop = result.accuracy.drop_points
        checks.append(
            GateResult(
                "--max-accuracy-drop", "accuracy", drop, gates.max_accuracy_drop, drop <= gates.max_accuracy_drop
            )
        )
    if gates.max_metric_drop is not None:
        if result.metric is None:
            raise UsageError("--max-metric-drop needs a task metric: --metric NAME (and its labels)")
        drop = result.metric.drop
        checks.append(
            GateResult(
                "--max-metric-drop", result.metric.name, drop, gates.max_metric_drop, drop <= gates.max_metric_drop
            )
        )
    return checks


def _finite(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None
