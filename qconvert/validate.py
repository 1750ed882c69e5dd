"""Run the float and the converted model on the same inputs under onnxruntime and measure the drift."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from qconvert.metrics import Metric, MetricResult, resolve
from qconvert.plan import ValidationPlan
from qconvert.quant.layout import snr_db
from qconvert.runtime import Feeds, build_feeds, fitted, model_session, run_batches, session


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    mean_abs_error: float
    snr_db: float | None  # None: identical outputs
    cosine_similarity: float
    top1_agreement: float | None  # None: not class scores


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy on labelled data (first class-score output)."""

    output: str
    float_top1: float
    quantized_top1: float

    @property
    def drop_points(self) -> float:
        return 100.0 * (self.float_top1 - self.quantized_top1)


@dataclass(frozen=True)
class ValidationResult:
    source: str  # "random (seed 0)" or the data file
    samples: int
    outputs: list[OutputMetrics]
    accuracy: Accuracy | None
    metric: MetricResult | None = None  # the task metric (--metric) on float and on the converted model


INTERLEAVED_MAX_BYTES = 512 << 20  # models timed side by side up to this size together


@dataclass(frozen=True)
class Reference:
    """The float model's side of a comparison: the feeds, its outputs on them, and the model (for timing)."""

    feeds: Feeds
    names: list[str]
    outputs: list[np.ndarray]
    model: str | bytes  # timed again beside the converted model
    metric: Metric | None = None  # the plan's task metric, and its value on the float model
    metric_value: float = 0.0


def reference(float_model: str | bytes, plan: ValidationPlan) -> Reference:
    """Run the float model on the plan's feeds (and time it when the plan says so); with a task metric,
    measure it on the labels (a metric that fails fails here, before any conversion is judged)."""
    metric = resolve(plan.metric, float_model) if plan.metric is not None else None
    sess = session(float_model, "input model")
    feeds = build_feeds(sess, plan)
    outputs = _run_all(sess, feeds, "input model")
    value = metric(outputs, feeds.labels, outputs) if metric is not None else 0.0
    return Reference(feeds, [o.name for o in sess.get_outputs()], outputs, float_model, metric, value)


def compare(
    float_model: str | bytes | Reference, quantized_model: str | bytes, plan: ValidationPlan, fold: bool = True
) -> tuple[ValidationResult, dict[str, float] | None, Profile | None]:
    """Run both models on the same feeds: per-output drift (and accuracy with labels), and latency.
    The float model may come as its `Reference`, run once for several comparisons.

    One model lives in onnxruntime at a time: a big model and its folded copy would not fit together.
    `fold` False runs the converted model without graph optimizations (see `session`) and without
    timing it: its latency would not be the deployed one.
    """
    ref = float_model if isinstance(float_model, Reference) else reference(float_model, plan)
    feeds = ref.feeds
    candidate = session(quantized_model, "converted model", optimize=fold)
    new_out = _run_all(candidate, feeds, "converted model")
    del candidate
    outputs = [_metrics(name, r, q) for name, r, q in zip(ref.names, ref.outputs, new_out)]
    accuracy = None
    if isinstance(feeds.labels, np.ndarray) and feeds.labels.dtype.kind in "iu":  # class labels
        scores = next((i for i, m in enumerate(outputs) if m.top1_agreement is not None), None)
        if scores is not None:
            labels = feeds.labels.reshape(-1)
            accuracy = Accuracy(
                ref.names[scores],
                float(np.mean(_top1(ref.outputs[scores]) == labels)),
                float(np.mean(_top1(new_out[scores]) == labels)),
            )
    latency, profile = None, None
    if fold and plan.latency_runs:
        side_by_side = _model_bytes(ref.model) + _model_bytes(quantized_model) <= INTERLEAVED_MAX_BYTES
        latency = latency_ms(ref.model, quantized_model, feeds.batches[0], plan.latency_runs, side_by_side)
        profile = time_by_op(ref.model, quantized_model, feeds.batches[0], plan.latency_runs) if side_by_side else None
    metric = None
    if ref.metric is not None:
        metric = MetricResult(ref.metric.name, ref.metric_value, ref.metric(new_out, feeds.labels, ref.outputs))
    return ValidationResult(feeds.source, feeds.samples, outputs, accuracy, metric), latency, profile


def _run_all(sess: ort.InferenceSession, feeds: Feeds, what: str) -> list[np.ndarray]:
    outputs = []
    for per_output in zip(*run_batches(sess, feeds, what)):
        joined = np.concatenate([np.atleast_1d(o) for o in per_output], axis=0)
        outputs.append(joined[: len(joined) - feeds.padded] if feeds.padded else joined)
    return outputs


@np.errstate(all="ignore")  # NaN/Inf outputs give NaN metrics (reported as null), not warnings
def _metrics(name: str, reference: np.ndarray, quantized: np.ndarray) -> OutputMetrics:
    r = reference.astype(np.float64).reshape(-1)
    q = quantized.astype(np.float64).reshape(-1)
    error = np.abs(r - q)
    norms = np.linalg.norm(r) * np.linalg.norm(q)
    cosine = float(r @ q / norms) if norms > 0 else float(np.array_equal(r, q))
    agreement = None
    if _is_class_scores(reference):
        agreement = float(np.mean(_top1(reference) == _top1(quantized)))
    return OutputMetrics(
        name,
        tuple(reference.shape),
        float(error.max(initial=0.0)),
        float(error.mean()) if error.size else 0.0,
        snr_db(r, q),
        cosine,
        agreement,
    )


def _is_class_scores(output: np.ndarray) -> bool:
    """[N, C] (or [N, C, 1, 1]) with C > 1 and a float type."""
    squeezed = output.reshape(output.shape[:2]) if output.ndim > 2 and all(d == 1 for d in output.shape[2:]) else output
    return squeezed.ndim == 2 and squeezed.shape[1] > 1 and np.issubdtype(output.dtype, np.floating)


def _top1(output: np.ndarray) -> np.ndarray:
    return np.argmax(output.reshape(output.shape[0], -1), axis=1)


def latency_ms(
    float_model: str | bytes, converted: str | bytes, feed: dict[str, np.ndarray], runs: int, side_by_side: bool
) -> dict[str, float]:
    """Median onnxruntime run times (ms) of both models on one batch at 1 and 2 threads ("float",
    "converted"; "float_2t", "converted_2t"), after a warm-up run each. The runs alternate between the models,
    so that a busy machine slows both alike. Not `side_by_side` (past INTERLEAVED_MAX_BYTES of models): one
    session at a time, at 1 thread only (each session loads the model again)."""
    timed: dict[str, float] = {"runs": float(runs)}
    if not side_by_side:
        for key, model in (("float", float_model), ("converted", converted)):
            timed.update(medians({key: session(model, "model to time", threads=1)}, feed, runs))
        return timed
    for threads, suffix in ((1, ""), (2, "_2t")):
        models = {f"float{suffix}": float_model, f"converted{suffix}": converted}
        timed.update(medians({k: session(m, "model to time", threads=threads) for k, m in models.items()}, feed, runs))
    return timed


TRANSITIONS = ("QuantizeLinear", "DequantizeLinear")


def time_by_op(float_model: str | bytes, converted: str | bytes, feed: dict[str, np.ndarray], runs: int) -> Profile:
    """Where the time goes, from onnxruntime's profiler at 1 thread (`Profile`)."""
    found = {}
    with tempfile.TemporaryDirectory(prefix="qconvert-profile-") as folder:
        for key, model in (("float", float_model), ("converted", converted)):
            sess = session(model, "model to profile", threads=1, profile=Path(folder, key))
            fed = fitted(sess, feed)
            for _ in range(runs + 1):  # the first run warms up and is not counted
                sess.run(None, fed)
            found[key] = _kernel_times(Path(sess.end_profiling()), runs)
    return Profile(found["float"][0], *found["converted"])


@dataclass(frozen=True)
class Profile:
    """Mean ms per run spent in each op type as onnxruntime runs it (fused and converted kernels under their
    own names), per model, and the Quantize/DequantizeLinear kernels the converted model runs per run."""

    float_ms: dict[str, float]
    converted_ms: dict[str, float]
    transitions: int

    def as_dict(self) -> dict[str, object]:
        """For the report: per model a list of {"op", "ms"}, costliest first."""
        listed = {
            k: [{"op": op, "ms": ms} for op, ms in t.items()]
            for k, t in (("float", self.float_ms), ("converted", self.converted_ms))
        }
        return {**listed, "transitions_per_run": self.transitions}


def _kernel_times(trace: Path, runs: int) -> tuple[dict[str, float], int]:
    """Mean ms per run of each op type's kernels in a profiler trace, costliest first, the first model run
    left out; and the Quantize/DequantizeLinear kernels per run."""
    events = json.loads(trace.read_text())
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted_from = starts[1] if len(starts) > 1 else 0
    times: dict[str, float] = {}
    transitions = 0
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time") or event["ts"] < counted_from:
            continue
        op = event["args"]["op_name"]
        times[op] = round(times.get(op, 0.0) + event["dur"] / 1000 / runs, 6)
        transitions += op in TRANSITIONS
    return dict(sorted(times.items(), key=lambda item: -item[1])), round(transitions / runs)


def _model_bytes(model: str | bytes) -> int:
    """A model's size with its external data files."""
    if isinstance(model, bytes):
        return len(model)
    proto = onnx.load(model, load_external_data=False)
    files = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    folder = os.path.dirname(model)
    return os.path.getsize(model) + sum(os.path.getsize(os.path.join(folder, f)) for f in files)


def worst_snr(model: onnx.ModelProto, feeds: Feeds, reference: list[np.ndarray], what: str) -> float | None:
    """The worst output SNR of an in-memory model on these feeds against the float outputs on them (None: exact)."""
    outputs = [np.concatenate(o) for o in zip(*run_batches(model_session(model, what), feeds, what))]
    snrs = [snr_db(r, o) for r, o in zip(reference, outputs)]
    return None if all(v is None for v in snrs) else min(v for v in snrs if v is not None)


def medians(sessions: dict[str, ort.InferenceSession], feed: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median ms per run of each session on `feed`, after a warm-up run each; the sessions take turns every
    round, so that a busy machine slows them alike."""
    times: dict[str, list[float]] = {key: [] for key in sessions}
    feeds = {key: fitted(sess, feed) for key, sess in sessions.items()}
    for key, sess in sessions.items():
        sess.run(None, feeds[key])
    for _ in range(runs):
        for key, sess in sessions.items():
            start = time.perf_counter()
            sess.run(None, feeds[key])
            times[key].append(time.perf_counter() - start)
    return {key: 1000 * float(np.median(t)) for key, t in times.items()}
