# Two entry points, each doing all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nemoq-installed
DEMO   := out/demo
MODEL  := tests/data/nemotron-tiny

.PHONY: demo test mutation venv clean

venv: $(STAMP)

# torch first, pinned: it picks the CPU wheel on this kind of machine instead of a multi-GB CUDA build.
# Then nemoq with every extra (calib: torch, eval: llama-cpp-python, plot) and the test tools.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

RECIPES := Q8_0 Q4_K_M NVFP4 NQ4
CALIB_TOKENS := 16384

# The whole path on the bundled trained model: convert, then quantize with calibration (each
# matrix rounded with error compensation from the calibration text's activations), evaluate.
demo: $(STAMP)
	mkdir -p $(DEMO)
	$(BIN)/nemoq convert $(MODEL) -o $(DEMO)/tiny-F16.gguf --outtype f16 --force
	$(BIN)/nemoq info $(DEMO)/tiny-F16.gguf --max-tensors 12
	for r in $(RECIPES); do \
	  $(BIN)/nemoq quantize $(MODEL) -o $(DEMO)/tiny-$$r.gguf --recipe $$r --calibrate --tokens $(CALIB_TOKENS) \
	    --force || exit 1; \
	done
	$(BIN)/python -c "from tests.fixtures.corpus import load_texts; print('\n\n'.join(load_texts('val')))" > $(DEMO)/held-out.txt
	$(BIN)/nemoq eval --compare $(foreach r,$(RECIPES),$(DEMO)/tiny-$(r).gguf) --base $(DEMO)/tiny-F16.gguf \
	  --data $(DEMO)/held-out.txt --ctx 256 --plot $(DEMO)/bpw-vs-kld.png --force

# The byte-equality tests once more as a CPU without AVX2 / AVX-512 computes them: numpy's SIMD
# dispatch limited to its baseline, the C kernels built without -march=native.
BYTE_TESTS := tests/test_golden_bytes.py tests/test_golden_files.py tests/test_kernels_c.py tests/test_float_casts.py

test: $(STAMP)
	$(BIN)/python -m pytest -q
	NPY_DISABLE_CPU_FEATURES="$$($(BIN)/python -m tests.numpy_dispatch)" NEMOQ_PORTABLE_KERNELS=1 \
	  $(BIN)/python -m pytest -q -p no:cacheprovider $(BYTE_TESTS)

# Mutation testing (mutmut) of the formats, recipes and name mapping in a git worktree of HEAD
# (../nemoq-mutation), never in this checkout; per-module counts and survivors: docs/mutation.md.
mutation: $(STAMP)
	$(BIN)/python -m tests.mutation

clean:
	rm -rf out build *.egg-info
