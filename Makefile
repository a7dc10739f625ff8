# One command sets up and runs each job on a fresh machine:
#   make bench      venv + install + build, then the CPU benchmark harness (quick suite)
#   make test       venv + install + build, then the whole test suite
#   make bench-gpu  the GPU suite (needs a CUDA machine)
# The C++ extension is rebuilt only when csrc/ or setup.py change (ninja keeps objects in build/).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
INSTALL_STAMP := $(VENV)/.attnops-installed
EXT_SOURCES := setup.py $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
EXT_STAMP := build/.ext-built
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: all test bench bench-gpu build clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

$(INSTALL_STAMP): $(DEPS_STAMP)
	ATTNOPS_SKIP_EXTENSION=1 $(PY) -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
	touch $@

$(EXT_STAMP): $(INSTALL_STAMP) $(EXT_SOURCES)
	MAX_JOBS=2 $(PY) setup.py -q build_ext --inplace
	@mkdir -p build && touch $@

build: $(EXT_STAMP)

# pytest exits 5 when it collects no tests (e.g. a -k filter that matches nothing): not a failure.
# -n auto: the Triton interpreter tests are single-threaded Python; one torch thread per worker.
test: build
	$(PY) -m pytest tests -n auto $(PYTEST_ARGS) || [ $$? -eq 5 ]

bench: build
	$(PY) -m attnops.bench --suite quick --device cpu $(BENCH_ARGS)

# On a CUDA machine: the correctness suite on CUDA tensors (the triton-cuda cases), then the GPU suite.
bench-gpu: build
	$(PY) -m pytest tests -k cuda $(PYTEST_ARGS)
	$(PY) -m attnops.bench --suite gpu --device cuda $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) attnops/_C*.so *.egg-info
