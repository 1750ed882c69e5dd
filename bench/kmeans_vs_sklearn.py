"""qconvert's 1-D k-means vs scikit-learn's KMeans on real-shaped weights: time and MSE per tensor.

    python bench/kmeans_vs_sklearn.py [--bits 4] [--models DIR] [--exact-limit 600000]

For one weight of each shape of the ResNet-50-shaped model (built into DIR when missing), per tensor: time
and MSE of qconvert.palettize and of sklearn KMeans(n_clusters=2**bits, n_init=1, seeded) on the same
values, and for tensors up to --exact-limit values the exact optimum: the dynamic programme over every
value (palettize with one run per value; tests check it against a textbook O(k n²) DP). scikit-learn is
a bench extra only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "samples"))

from qconvert.quant.kmeans import palettize, reconstruct  # noqa: E402
from qconvert.select import select_weights  # noqa: E402


def main() -> None:
    from sklearn.cluster import KMeans

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--models", type=Path, default=ROOT / "build" / "models")
    parser.add_argument("--exact-limit", type=int, default=600_000)
    args = parser.parse_args()
    path = args.models / "resnet50_shaped.onnx"
    if not path.exists():
        import cnn_shapes

        args.models.mkdir(parents=True, exist_ok=True)
        onnx.save(cnn_shapes.resnet(), str(path))
    shapes = {w.shape: w for w in select_weights(onnx.load(str(path))).weights}  # one weight per shape
    weights = sorted(shapes.values(), key=lambda w: -w.elements)
    k = 1 << args.bits
    print(
        "| weight | elements | qconvert s | sklearn s | time ratio | MSE ratio (qconvert / sklearn) "
        "| MSE / exact optimum (≤ 1.005) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    totals = [0.0, 0.0]
    for w in weights:
        values = w.array().reshape(1, -1)
        start = time.perf_counter()
        palette = palettize(values, bits=args.bits)
        ours = time.perf_counter() - start
        ours_mse = float(np.mean((reconstruct(palette).astype(np.float64) - values) ** 2))
        start = time.perf_counter()
        km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(values.reshape(-1, 1).astype(np.float64))
        theirs = time.perf_counter() - start
        theirs_mse = float(km.inertia_) / values.size
        totals[0] += ours
        totals[1] += theirs
        exact = "-"
        if values.size <= args.exact_limit:
            optimum = float(
                np.mean(
                    (reconstruct(palettize(values, bits=args.bits, max_points=values.size)).astype(np.float64) - values)
                    ** 2
                )
            )
            exact = f"{ours_mse / optimum:.5f}"
        print(
            f"| {w.name} | {w.elements:,} | {ours:.3f} | {theirs:.3f} | {ours / theirs:.3f} "
            f"| {ours_mse / theirs_mse:.4f} | {exact} |",
            flush=True,
        )
    print(f"| total | | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.3f} | | |")


if __name__ == "__main__":
    main()
