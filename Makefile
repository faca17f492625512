# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nemoq-installed
DEMO   := out/demo
MODEL  := tests/data/nemotron-tiny

.PHONY: demo test venv clean

venv: $(STAMP)

# torch first, pinned: it picks the CPU wheel on this kind of machine instead of a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/nemoq convert $(MODEL) -o $(DEMO)/nemotron-tiny-bf16.gguf --outtype bf16 --force
	$(BIN)/nemoq info $(DEMO)/nemotron-tiny-bf16.gguf

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf out build *.egg-info
