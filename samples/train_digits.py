"""Train the digits sample: a small CNN on scikit-learn's 8x8 handwritten digits, exported to ONNX.

Regenerate (needs torch and scikit-learn, which qconvert itself never uses):

    pip install torch==2.13.0 scikit-learn onnx
    python samples/train_digits.py samples/

Writes digits_cnn.onnx (opset 13, BatchNorm left unfused as many exporters do) and digits_test.npz
(the held-out 20 %: `input` [N, 1, 8, 8] float32 scaled to [0, 1], `labels` [N] int64).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.fc1, self.fc2 = nn.Linear(64 * 2 * 2, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = torch.max_pool2d(torch.relu(self.bn3(self.conv3(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def train() -> tuple[DigitsCNN, np.ndarray, np.ndarray]:
    torch.manual_seed(SEED)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=SEED, stratify=digits.target
    )
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs, ys = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(40):
        model.train()
        order = torch.randperm(len(xs))
        for start in range(0, len(xs), 64):
            batch = order[start : start + 64]
            loss = nn.functional.cross_entropy(model(xs[batch]), ys[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    return model, x_test, y_test.astype(np.int64)


def to_onnx(model: DigitsCNN) -> onnx.ModelProto:
    """Write the graph by hand: deterministic bytes, no exporter version drift."""
    state = {
        k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items() if v.dtype.is_floating_point
    }
    inits = [numpy_helper.from_array(v, k) for k, v in state.items()]
    nodes = []
    x = "input"
    for i in (1, 2, 3):
        c, b = f"conv{i}", f"bn{i}"
        nodes += [
            helper.make_node(
                "Conv", [x, f"{c}.weight", f"{c}.bias"], [f"{c}.out"], name=c, kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            helper.make_node(
                "BatchNormalization",
                [f"{c}.out", f"{b}.weight", f"{b}.bias", f"{b}.running_mean", f"{b}.running_var"],
                [f"{b}.out"],
                name=b,
                epsilon=1e-5,
            ),
            helper.make_node("Relu", [f"{b}.out"], [f"relu{i}"], name=f"relu{i}"),
        ]
        x = f"relu{i}"
        if i > 1:
            nodes.append(
                helper.make_node("MaxPool", [x], [f"pool{i}"], name=f"pool{i}", kernel_shape=[2, 2], strides=[2, 2])
            )
            x = f"pool{i}"
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc1.weight", "fc1.bias"], ["fc1.out"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1.out"], ["relu4"], name="relu4"),
        helper.make_node("Gemm", ["relu4", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="qconvert-samples")
    onnx_model.ir_version = 7
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "samples")
    model, x_test, y_test = train()
    with torch.no_grad():
        accuracy = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    onnx.save(to_onnx(model), str(out / "digits_cnn.onnx"))
    np.savez_compressed(out / "digits_test.npz", input=x_test, labels=y_test)
    print(f"held-out accuracy (torch): {accuracy:.4f} on {len(y_test)} digits -> {out}/digits_cnn.onnx")


if __name__ == "__main__":
    main()
