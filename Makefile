# Two commands on a fresh clone: `make demo` and `make test`. Each builds the virtual environment first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
QC := $(VENV)/bin/qconvert
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# Palettize the bundled digits CNN and compare accuracy on its held-out digits.
demo: $(STAMP)
	@mkdir -p build
	$(QC) kmeans samples/digits_cnn.onnx --bits 4 --data samples/digits_test.npz -o build/digits.kmeans4.onnx
	$(QC) kmeans samples/digits_cnn.onnx --bits 2 --per-channel --data samples/digits_test.npz -o build/digits.kmeans2pc.onnx

test: $(STAMP)
	$(PY) -m pytest

# 120 columns, complexity 15 (C901), the formatter's layout, mypy; CI runs it too (.ci/run). The tools are
# pinned: the formatter's layout changes between releases.
lint: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check ruff==0.17.6 mypy==2.4.1
	$(PY) -m ruff check qconvert tests bench samples
	$(PY) -m ruff format --check qconvert tests bench samples
	$(PY) -m mypy qconvert

# Real models judged by their task, time/memory/size vs onnxruntime's quantizers, the > 2 GB model, tables of
# size/accuracy/time, data-aware techniques, auto (tens of minutes).
bench: $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[bench]'
	$(PY) bench/tasks.py
	$(PY) bench/perf.py
	$(PY) -m pytest -m slow -s tests/test_big.py
	$(PY) bench/kmeans_vs_sklearn.py
	$(PY) bench/kmeans_table.py
	$(PY) bench/linear_vs_ort.py
	$(PY) bench/fidelity_table.py
	$(PY) bench/auto_table.py

# ResNet-50- and MobileNetV2-shaped models with random weights (about 115 MB) for size and speed checks.
models: $(STAMP)
	$(PY) samples/cnn_shapes.py build/models

clean:
	rm -rf build $(VENV) .pytest_cache
