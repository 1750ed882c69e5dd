"""Build ResNet- and MobileNet-shaped ONNX models with random weights, for size and speed checks.

    python samples/cnn_shapes.py OUT_DIR            # resnet50-shaped (25.5M weights) and mobilenetv2-shaped
    python samples/cnn_shapes.py OUT_DIR --small    # the same architectures, narrow (for tests)

Weights are seeded He-normal; BatchNorm is taken as folded into the convolution biases.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 13


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, relu: bool = True) -> str:
        n = self.name("conv")
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        b = (self.rng.standard_normal(cout) * 0.01).astype(np.float32)
        self.inits += [numpy_helper.from_array(w, f"{n}.weight"), numpy_helper.from_array(b, f"{n}.bias")]
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{n}.weight", f"{n}.bias"],
                [f"{n}.out"],
                name=n,
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[k // 2] * 4,
                group=group,
            )
        )
        out = f"{n}.out"
        if relu:
            self.nodes.append(helper.make_node("Relu", [out], [f"{n}.relu"], name=f"{n}_relu"))
            out = f"{n}.relu"
        return out

    def add(self, a: str, b: str, relu: bool) -> str:
        n = self.name("add")
        self.nodes.append(helper.make_node("Add", [a, b], [f"{n}.out"], name=n))
        if not relu:
            return f"{n}.out"
        self.nodes.append(helper.make_node("Relu", [f"{n}.out"], [f"{n}.relu"], name=f"{n}_relu"))
        return f"{n}.relu"

    def head(self, x: str, cin: int, classes: int) -> str:
        self.nodes += [
            helper.make_node("GlobalAveragePool", [x], ["pooled"], name="pool"),
            helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        ]
        w = (self.rng.standard_normal((classes, cin)) * np.sqrt(1.0 / cin)).astype(np.float32)
        self.inits += [
            numpy_helper.from_array(w, "fc.weight"),
            numpy_helper.from_array(np.zeros(classes, np.float32), "fc.bias"),
        ]
        self.nodes.append(
            helper.make_node("Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)
        )
        return "logits"

    def model(self, name: str, size: int, classes: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
            self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qconvert-samples"
        )
        model.ir_version = 7
        return model


def resnet(
    width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), classes: int = 1000, size: int = 224, seed: int = 0
) -> onnx.ModelProto:
    """ResNet-50 layout (bottleneck blocks, expansion 4); width 64 gives 25.5M weights."""
    b = _Builder(seed)
    x = b.conv("input", 3, width, 7, stride=2)
    cin = width
    for stage, count in enumerate(blocks):
        mid = width * 2**stage
        cout = mid * 4
        for i in range(count):
            stride = 2 if i == 0 and stage > 0 else 1
            y = b.conv(x, cin, mid, 1)
            y = b.conv(y, mid, mid, 3, stride=stride)
            y = b.conv(y, mid, cout, 1, relu=False)
            shortcut = b.conv(x, cin, cout, 1, stride=stride, relu=False) if i == 0 else x
            x = b.add(y, shortcut, relu=True)
            cin = cout
    b.head(x, cin, classes)
    return b.model("resnet_shaped", size, classes)


def mobilenet(width: float = 1.0, classes: int = 1000, size: int = 224, seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 layout: inverted residuals with depthwise 3x3 convolutions; width 1.0 gives 3.5M weights."""
    b = _Builder(seed)

    def ch(c: int) -> int:
        return max(8, int(c * width + 4) // 8 * 8)

    x = b.conv("input", 3, ch(32), 3, stride=2)
    cin = ch(32)
    settings = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    for expand, c, repeat, first_stride in settings:
        cout = ch(c)
        for i in range(repeat):
            stride = first_stride if i == 0 else 1
            hidden = cin * expand
            y = b.conv(x, cin, hidden, 1) if expand != 1 else x
            y = b.conv(y, hidden, hidden, 3, stride=stride, group=hidden)
            y = b.conv(y, hidden, cout, 1, relu=False)
            x = b.add(y, x, relu=False) if stride == 1 and cin == cout else y
            cin = cout
    last = ch(1280) if width > 1.0 else 1280
    x = b.conv(x, cin, last, 1)
    b.head(x, last, classes)
    return b.model("mobilenet_shaped", size, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--small", action="store_true", help="narrow variants for quick checks")
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.small:
        models = {
            "resnet_small.onnx": resnet(width=8, blocks=(1, 1, 1, 1), classes=10, size=32),
            "mobilenet_small.onnx": mobilenet(width=0.25, classes=10, size=32),
        }
    else:
        models = {"resnet50_shaped.onnx": resnet(), "mobilenetv2_shaped.onnx": mobilenet()}
    for name, model in models.items():
        onnx.checker.check_model(model)
        onnx.save(model, str(args.out_dir / name))
        weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        print(f"{args.out_dir / name}: {weights:,} weights")


if __name__ == "__main__":
    main()
