"""Conversion time, peak memory, size, fidelity and latency: qconvert's modes vs onnxruntime's quantizers.

    python bench/perf.py [--model build/models/resnet50_shaped.onnx] [--json build/bench/perf.json]

Every conversion runs alone in a fresh process, each mode `--rounds` times in turn (the fastest time and
the largest peak memory count); qconvert's run as its command line does (`--no-validate`). Time is from
loading the model to the written file (imports excluded), peak memory that of the process and any
children. The peers are
what a user would run instead: onnxruntime's `quantize_static` (QDQ, int8 per channel, 8 or 32
calibration samples) and `quantize_dynamic` (int8 per channel). Every result is then scored on 8 other
seeded inputs: output SNR vs the float model and onnxruntime latency (batch 1, median of 30 rounds, all
models timed in turn each round so machine noise hits them alike). Prints a Markdown table with the
issue's targets (time as a ratio to the peer measured in the same run; peak memory as a multiple of the
float file) and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))

# name: (what it is, peer whose time it is compared with, time target as a multiple of the peer's)
MODES = {
    "quantize_static-8": ("onnxruntime quantize_static, QDQ int8 per channel, 8 calibration samples", None, None),
    "quantize_static-32": ("onnxruntime quantize_static, QDQ int8 per channel, 32 calibration samples", None, None),
    "quantize_dynamic": ("onnxruntime quantize_dynamic, int8 per channel", None, None),
    "kmeans4-per-tensor": ("qconvert kmeans --bits 4 --per-tensor", "quantize_static-8", 0.7),
    "kmeans4-per-channel": ("qconvert kmeans --bits 4 --per-channel", "quantize_static-8", 1.2),
    "kmeans4": ("qconvert kmeans --bits 4 (granularity auto, the default)", "quantize_static-8", 1.2),
    "int8-weights": ("qconvert linear (int8 per channel, weights only)", "quantize_static-8", 0.5),
    "int8-qdq-32": ("qconvert linear --calibration (full QDQ, 32 samples)", "quantize_static-32", 1.5),
    "int8-qdq-32-minmax": (
        "the same with --calibration-method minmax --no-data-aware --no-bias-correction (like quantize_static)",
        "quantize_static-32",
        1.5,
    ),
}
MEMORY_TARGET = 2.5  # peak resident memory as a multiple of the float model's file size


def convert(mode: str, model: Path, output: Path, calibration: Path) -> None:
    """One conversion, as a user would run it (in a child process of `measure`)."""
    if mode == "imports":
        return
    if mode.startswith("quantize_"):
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        if mode == "quantize_dynamic":
            quantize_dynamic(str(model), str(output), per_channel=True, weight_type=QuantType.QInt8)
            return
        samples = int(mode.rsplit("-", 1)[1])
        arrays = np.load(calibration)
        name = onnx.load(str(model), load_external_data=False).graph.input[0].name

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.items = iter({name: arrays[name][i : i + 1]} for i in range(samples))

            def get_next(self) -> dict | None:
                return next(self.items, None)

        quantize_static(
            str(model),
            str(output),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        return
    from qconvert.cli import cli

    command = {
        "kmeans4-per-tensor": ["kmeans", "--bits", "4", "--per-tensor"],
        "kmeans4-per-channel": ["kmeans", "--bits", "4", "--per-channel"],
        "kmeans4": ["kmeans", "--bits", "4"],
        "int8-weights": ["linear"],
        "int8-qdq-32": ["linear", "--calibration", str(calibration)],
        "int8-qdq-32-minmax": [
            "linear",
            "--calibration",
            str(calibration),
            "--calibration-method",
            "minmax",
            "--no-data-aware",
            "--no-bias-correction",
        ],
    }[mode]
    cli.main([command[0], str(model), *command[1:], "--no-validate", "-q", "-o", str(output)], standalone_mode=False)


def measure(mode: str, model: Path, output: Path, calibration: Path) -> dict[str, float]:
    """Run one conversion in a fresh process: its own time, and peak memory: the larger of the process's
    VmHWM and the proportional set size of it and its child processes together, sampled every 20 ms.
    (Not ru_maxrss: Linux carries the forking parent's size over into it.)"""
    child = subprocess.Popen(
        [sys.executable, __file__, "--job", mode, str(model), str(output), str(calibration)],
        stdout=subprocess.PIPE,
        text=True,
    )
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak[0] = max(peak[0], tree_pss(child.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    assert child.stdout is not None
    out = child.stdout.read()
    status = child.wait()
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(f"{mode} failed (status {status})")
    result = json.loads(out)
    return {"seconds": result["seconds"], "peak_bytes": max(result["hwm_bytes"], peak[0])}


def tree_pss(pid: int) -> int:
    """Bytes of proportional set size of a process and all its descendants (shared pages counted once)."""
    total, pending = 0, [pid]
    while pending:
        p = pending.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += 1024 * next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    pending += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def score(
    model: Path, outputs: dict[str, Path], evaluation: dict[str, np.ndarray], rounds: int = 30
) -> dict[str, dict[str, float]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    runs = {
        name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for name, path in {"float": model, **outputs}.items()
    }
    batches = [{k: v[i : i + 1] for k, v in evaluation.items()} for i in range(len(next(iter(evaluation.values()))))]
    results = {
        name: np.concatenate([s.run(None, b)[0] for b in batches]).astype(np.float64) for name, s in runs.items()
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, s in runs.items():
            start = time.perf_counter()
            s.run(None, batches[0])
            times[name].append(time.perf_counter() - start)
    want = results["float"]
    return {
        name: {
            "snr_db": float(10 * np.log10(np.sum(want**2) / np.sum((want - got) ** 2)))
            if name != "float"
            else float("inf"),
            "latency_ms": 1000 * float(np.median(times[name])),
        }
        for name, got in results.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "build" / "models" / "resnet50_shaped.onnx")
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "perf.json")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--rounds", type=int, default=2, help="conversions per mode; the fastest time and the largest peak count"
    )
    args = parser.parse_args()
    import onnx

    if not args.model.exists():
        import cnn_shapes

        args.model.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(cnn_shapes.resnet(), str(args.model))

    graph_input = onnx.load(str(args.model), load_external_data=False).graph.input[0]
    shape = [d.dim_value or 1 for d in graph_input.type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    calibration = {graph_input.name: rng.standard_normal((32, *shape[1:])).astype(np.float32)}
    evaluation = {graph_input.name: rng.standard_normal((8, *shape[1:])).astype(np.float32)}
    file_bytes = args.model.stat().st_size
    modes = args.modes.split(",")
    rows: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "calibration.npz", **calibration)
        floor = measure("imports", args.model, Path(tmp) / "none", Path(tmp))["peak_bytes"]
        outputs = {mode: Path(tmp) / f"{mode}.onnx" for mode in modes}
        for round_ in range(args.rounds):  # all modes in turn each round: machine noise hits them alike
            for mode in modes:
                print(f"converting ({round_ + 1}/{args.rounds}): {mode}", file=sys.stderr, flush=True)
                run = measure(mode, args.model, outputs[mode], Path(tmp) / "calibration.npz")
                row = rows.setdefault(
                    mode,
                    {
                        "what": MODES[mode][0],
                        "seconds": run["seconds"],
                        "peak_bytes": run["peak_bytes"],
                        "bytes": outputs[mode].stat().st_size,
                    },
                )
                row["seconds"] = min(row["seconds"], run["seconds"])  # type: ignore[type-var]
                row["peak_bytes"] = max(row["peak_bytes"], run["peak_bytes"])  # type: ignore[type-var]
        print("scoring", file=sys.stderr, flush=True)
        scores = score(args.model, outputs, evaluation)
    for mode, row in rows.items():
        row.update(scores[mode])
        peer, target = MODES[mode][1:]
        row["memory_ratio"] = row["peak_bytes"] / file_bytes
        row["memory_ratio_above_imports"] = (row["peak_bytes"] - floor) / file_bytes  # type: ignore[operator]
        if peer in rows:
            row["time_ratio"] = row["seconds"] / rows[peer]["seconds"]  # type: ignore[operator]
            row["time_target"] = target
    print(
        f"{args.model.name}: {file_bytes / 1e6:.1f} MB, float latency {scores['float']['latency_ms']:.1f} ms; "
        f"a process that only imports numpy, onnx, onnxruntime and qconvert peaks at {floor / 1e6:.0f} MB\n"
    )
    print(
        "| mode | convert s | time ratio (target) | peak MB | peak / file (≤ 2.5) | above imports / file | size % "
        "| output SNR dB | latency ms |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, row in rows.items():
        ratio = (
            f"{row['time_ratio']:.2f} (≤ {row['time_target']}) "
            f"{'met' if row['time_ratio'] <= row['time_target'] else 'MISSED'}"
            if "time_ratio" in row
            else ""
        )  # type: ignore[operator]
        memory = f"{row['memory_ratio']:.2f} {'met' if row['memory_ratio'] <= MEMORY_TARGET else 'MISSED'}"  # type: ignore[operator]
        print(
            f"| {mode} | {row['seconds']:.1f} | {ratio} | {row['peak_bytes'] / 1e6:.0f} | {memory} "  # type: ignore[operator]
            f"| {row['memory_ratio_above_imports']:.2f} | "
            f"{100 * row['bytes'] / file_bytes:.1f} | {row['snr_db']:.2f} | {row['latency_ms']:.1f} |"
        )  # type: ignore[operator]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "model": str(args.model),
                "file_bytes": file_bytes,
                "float_latency_ms": scores["float"]["latency_ms"],
                "imports_peak_bytes": floor,
                "cores": os.cpu_count(),
                "modes": rows,
            },
            indent=2,
        )
    )
    print(f"\nJSON: {args.json}")


def job(mode: str, model: str, output: str, calibration: str) -> None:
    import onnxruntime.quantization  # noqa: F401  imports are not conversion time

    import qconvert.cli  # noqa: F401

    start = time.perf_counter()
    convert(mode, Path(model), Path(output), Path(calibration))
    seconds = time.perf_counter() - start
    with open("/proc/self/status") as f:
        hwm = 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "hwm_bytes": hwm}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--job"]:
        job(*sys.argv[2:6])
    else:
        main()
