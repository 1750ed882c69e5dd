"""Size, accuracy and time of k-means palettization on the samples, as a Markdown table.

    python bench/kmeans_table.py [--models DIR]

Digits: accuracy on its 360 held-out labelled digits. ResNet-50/MobileNetV2-shaped (random weights,
from `samples/cnn_shapes.py`, built into DIR when missing): output SNR on 8 seeded random inputs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))

import onnx  # noqa: E402

from qconvert.pipeline import convert  # noqa: E402
from qconvert.plan import Granularity, KMeansPlan, ValidationPlan  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "models")
    parser.add_argument("--bits", default="8,4,2")
    args = parser.parse_args()
    models = {
        "digits_cnn": (ROOT / "samples" / "digits_cnn.onnx", ValidationPlan(data=ROOT / "samples" / "digits_test.npz"))
    }
    for name, build in (("resnet50_shaped", "resnet"), ("mobilenetv2_shaped", "mobilenet")):
        path = args.models / f"{name}.onnx"
        if not path.exists():
            import cnn_shapes

            args.models.mkdir(parents=True, exist_ok=True)
            onnx.save(getattr(cnn_shapes, build)(), str(path))
        models[name] = (path, ValidationPlan())
    print(
        "| model | bits | granularity | size (% of float) | output SNR dB | top-1 agreement "
        "| accuracy float -> quantized | time s |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, validation) in models.items():
            for bits in map(int, args.bits.split(",")):
                for granularity, overhead in (
                    (Granularity.PER_TENSOR, 1.0),
                    (Granularity.PER_CHANNEL, 1.0),
                    (Granularity.PER_CHANNEL, float("inf")),
                ):
                    plan = KMeansPlan(bits=bits, granularity=granularity, max_codebook_overhead=overhead)
                    start = time.perf_counter()
                    report = convert(path, Path(tmp) / "out.onnx", plan, validation).report
                    elapsed = time.perf_counter() - start
                    out = report.validation.outputs[0]
                    acc = report.validation.accuracy
                    accuracy = f"{100 * acc.float_top1:.2f} -> {100 * acc.quantized_top1:.2f} %" if acc else "-"
                    agreement = "-" if out.top1_agreement is None else f"{100 * out.top1_agreement:.1f} %"
                    label = granularity.value + (" (forced)" if overhead == float("inf") else "")
                    print(
                        f"| {name} | {bits} | {label} | {100 * report.size_ratio:.1f} | {out.snr_db:.2f} | "
                        f"{agreement} | {accuracy} | {elapsed:.1f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
