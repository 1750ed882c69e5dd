"""qconvert auto vs uniform k-means per channel, as a Markdown table.

    python bench/auto_table.py [--models digits,mobilenetv2_shaped,resnet50_shaped]

For each model: uniform 4-bit and 8-bit k-means (per channel where the codebooks cost at most one bit
per weight), then `qconvert auto --target-snr` set to the 4-bit model's output SNR. Digits are
validated on their 360 held-out labelled digits; the CNN-shaped models (random weights,
`samples/cnn_shapes.py`) on 8 seeded random inputs. The goal: auto at equal or better SNR, smaller.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))

from qconvert.api import convert_auto  # noqa: E402
from qconvert.pipeline import convert  # noqa: E402
from qconvert.plan import AutoPlan, Granularity, KMeansPlan, ValidationPlan  # noqa: E402

BUILDERS = {"mobilenetv2_shaped": "mobilenet", "resnet50_shaped": "resnet"}  # in samples/cnn_shapes.py


def model_path(name: str) -> tuple[Path, ValidationPlan]:
    if name == "digits":
        return ROOT / "samples" / "digits_cnn.onnx", ValidationPlan(data=ROOT / "samples" / "digits_test.npz")
    path = ROOT / "build" / "models" / f"{name}.onnx"
    if not path.exists():
        import onnx

        import cnn_shapes

        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(getattr(cnn_shapes, BUILDERS[name])(), str(path))
    return path, ValidationPlan()


def row(name: str, label: str, report: object, elapsed: float) -> float:
    """Print one table row; returns the output SNR."""
    snr = min(o.snr_db for o in report.validation.outputs)  # type: ignore[attr-defined]
    acc = report.validation.accuracy  # type: ignore[attr-defined]
    accuracy = f"{100 * acc.quantized_top1:.2f} %" if acc else "-"
    print(f"| {name} | {label} | {100 * report.size_ratio:.1f} | {snr:.2f} | {accuracy} | {elapsed:.1f} |", flush=True)  # type: ignore[attr-defined]
    return snr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="digits,mobilenetv2_shaped,resnet50_shaped")
    args = parser.parse_args()
    print("| model | plan | size % | output SNR dB | accuracy | time s |")
    print("|---|---|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            path, validation = model_path(name)
            snrs = {}
            for bits in (4, 8):
                start = time.perf_counter()
                report = convert(
                    path,
                    Path(folder) / "u.onnx",
                    KMeansPlan(bits=bits, granularity=Granularity.PER_CHANNEL),
                    validation,
                ).report
                snrs[bits] = row(name, f"uniform k-means {bits}-bit per channel", report, time.perf_counter() - start)
            target = round(snrs[4], 2)
            start = time.perf_counter()
            report = convert_auto(path, Path(folder) / "a.onnx", AutoPlan(target_snr=target), validation).report
            row(name, f"auto --target-snr {target}", report, time.perf_counter() - start)


if __name__ == "__main__":
    main()
