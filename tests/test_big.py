"""A model over protobuf's 2 GB limit converts, validates and is written with external data, within the
memory bound. Slow (minutes, 2.3 GB of disk): `make bench` runs it (`pytest -m slow`); `make test` does not."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from perf import tree_pss  # noqa: E402  the bench's measure of peak memory: the process and its workers

pytestmark = pytest.mark.slow

LAYERS, WIDTH = 34, 4096  # 34 MatMuls of 4096 x 4096 float32: 2.28 GB of weights
MEMORY_BOUND = 2.5  # peak resident memory (the process and its workers) over the model's size on disk


def build(path: Path) -> None:
    """Chained MatMuls whose weights go straight to the external data file, one at a time."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    data = path.with_name(path.name + ".data")
    with open(data, "wb") as f:
        for i in range(LAYERS):
            weight = rng.standard_normal((WIDTH, WIDTH), dtype=np.float32) * np.float32(1 / np.sqrt(WIDTH))
            tensor = TensorProto(
                name=f"w{i}", data_type=TensorProto.FLOAT, dims=weight.shape, data_location=TensorProto.EXTERNAL
            )
            for key, value in (("location", data.name), ("offset", str(f.tell())), ("length", str(weight.nbytes))):
                tensor.external_data.add(key=key, value=value)
            f.write(weight.tobytes())
            inits.append(tensor)
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
            x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, WIDTH])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, WIDTH])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())


def test_a_model_over_2gb_converts_validates_and_is_written_with_external_data(tmp_path: Path) -> None:
    source = tmp_path / "big.onnx"
    build(source)
    size = source.stat().st_size + source.with_name("big.onnx.data").stat().st_size
    assert size > 2**31
    out = tmp_path / "big.k4.onnx"
    child = subprocess.Popen(
        [sys.executable, "-m", "qconvert", "kmeans", str(source), "--bits", "4", "-o", str(out), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], tree_pss(child.pid))

    sampler = threading.Thread(target=sample)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    assert child.returncode == 0, stderr
    report = json.loads(stdout)
    print(
        f"\n{size / 1e9:.2f} GB model: {report['timings_s']['total']:.0f} s, peak {peak[0] / 1e9:.2f} GB "
        f"({peak[0] / size:.2f}x), output {report['output']['bytes'] / 1e6:.0f} MB, "
        f"SNR {report['validation']['outputs'][0]['snr_db']:.2f} dB"
    )
    assert peak[0] <= MEMORY_BOUND * size
    assert report["output"]["data"] == str(tmp_path / "big.k4.onnx.data")
    assert report["validation"]["outputs"][0]["snr_db"] > 3  # 34 chained 4-bit layers of noise-like weights
    assert onnx.load(str(out), load_external_data=False).graph.initializer[0].external_data
    onnx.checker.check_model(str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "big.k4.onnx",
        "big.k4.onnx.data",
        "big.k4.report.json",
        "big.onnx",
        "big.onnx.data",
    ]
