# lbr-ray: `make demo` runs LBR end to end on the bundled data; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU torch wheel first, so no dependency pulls a CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0
WORKERS ?= 2

.PHONY: setup demo test test-unit bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; else $(BIN)/pip install -q "$(TORCH_SPEC)"; fi
	# DeepSpeed builds from its sdist against the torch above (no isolated build env that would fetch another torch).
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

demo: setup
	rm -rf runs/demo
	DS_ACCELERATOR=cpu $(BIN)/lbr train --stage all --config configs/demo.yaml --num-workers $(WORKERS) --output runs/demo

test: setup
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -x --durations=15 tests

test-unit: setup
	$(BIN)/python -m pytest -q tests/unit

bench: setup
	$(BIN)/python benchmarks/attention.py
	$(BIN)/python benchmarks/packing.py --out benchmarks/results/packing.json
	DS_ACCELERATOR=cpu $(BIN)/python benchmarks/overhead.py --out benchmarks/results/overhead.json
	$(BIN)/python benchmarks/eval_scaling.py
	$(BIN)/python benchmarks/ann_auto.py --out benchmarks/results/ann_auto.json

clean:
	rm -rf $(VENV) runs .pytest_cache
