"""qconvert linear (full QDQ, per-channel int8) vs onnxruntime's quantize_static on the same data.

    python bench/linear_vs_ort.py [--models DIR] [--calibration-samples 32]

Both get the same calibration inputs (seeded random for the random-weight models, the first 100
held-out digits for the digits CNN); both are scored on other inputs by output SNR vs the float model,
onnxruntime latency (median of 40 rounds, batch 1, the three models timed in turn each round so that
machine noise hits them alike) and file size. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))

from qconvert.pipeline import convert  # noqa: E402
from qconvert.plan import Granularity, LinearPlan  # noqa: E402


def ort_quantize(src: Path, dst: Path, calibration: np.ndarray, name: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter({name: calibration[i : i + 1]} for i in range(len(calibration)))

        def get_next(self) -> dict | None:
            return next(self.items, None)

    quantize_static(
        str(src),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


def sessions(*paths: Path) -> list[ort.InferenceSession]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return [ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for p in paths]


def snr(reference: ort.InferenceSession, session: ort.InferenceSession, inputs: np.ndarray, name: str) -> float:
    want = np.concatenate([reference.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))]).astype(
        np.float64
    )
    got = np.concatenate([session.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))]).astype(
        np.float64
    )
    return float(10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)))


def latencies(runs: list[ort.InferenceSession], feed: dict[str, np.ndarray], rounds: int = 40) -> list[float]:
    """Median ms per session, the sessions timed in turn each round so machine noise hits all alike."""
    times: list[list[float]] = [[] for _ in runs]
    for s in runs:
        s.run(None, feed)
    for _ in range(rounds):
        for i, s in enumerate(runs):
            start = time.perf_counter()
            s.run(None, feed)
            times[i].append(time.perf_counter() - start)
    return [1000 * float(np.median(t)) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "models")
    parser.add_argument("--calibration-samples", type=int, default=32)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    digits = np.load(ROOT / "samples" / "digits_test.npz")["input"]
    cases = {"digits_cnn": (ROOT / "samples" / "digits_cnn.onnx", digits[:100], digits[100:])}
    for name, build in (("resnet50_shaped", "resnet"), ("mobilenetv2_shaped", "mobilenet")):
        path = args.models / f"{name}.onnx"
        if not path.exists():
            import cnn_shapes

            args.models.mkdir(parents=True, exist_ok=True)
            onnx.save(getattr(cnn_shapes, build)(), str(path))
        n = args.calibration_samples
        cases[name] = (
            path,
            rng.standard_normal((n, 3, 224, 224)).astype(np.float32),
            rng.standard_normal((8, 3, 224, 224)).astype(np.float32),
        )
    print(
        "| model | tool | convert s | size % of float | output SNR dB | latency ms (float) | time ratio | SNR diff dB "
        "| latency ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, calibration, evaluation) in cases.items():
            input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
            np.savez(Path(tmp) / "calib.npz", **{input_name: calibration})
            ours, theirs = Path(tmp) / "ours.onnx", Path(tmp) / "ort.onnx"
            start = time.perf_counter()
            ort_quantize(path, theirs, calibration, input_name)
            ort_time = time.perf_counter() - start
            start = time.perf_counter()
            convert(
                path, ours, LinearPlan(granularity=Granularity.PER_CHANNEL, calibration=Path(tmp) / "calib.npz"), None
            )
            our_time = time.perf_counter() - start
            reference, theirs_session, ours_session = sessions(path, theirs, ours)
            ort_snr = snr(reference, theirs_session, evaluation, input_name)
            our_snr = snr(reference, ours_session, evaluation, input_name)
            float_ms, ort_ms, our_ms = latencies(
                [reference, theirs_session, ours_session], {input_name: evaluation[:1]}
            )
            size = path.stat().st_size
            print(
                f"| {name} | quantize_static | {ort_time:.1f} | {100 * theirs.stat().st_size / size:.1f} "
                f"| {ort_snr:.2f} | {ort_ms:.2f} ({float_ms:.2f}) | | | |"
            )
            print(
                f"| {name} | qconvert | {our_time:.1f} | {100 * ours.stat().st_size / size:.1f} | {our_snr:.2f} "
                f"| {our_ms:.2f} ({float_ms:.2f}) | "
                f"{our_time / ort_time:.2f} | {our_snr - ort_snr:+.2f} | {our_ms / ort_ms:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
