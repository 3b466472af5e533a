# kvforge: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when missing and install what they need.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvforge-installed

.PHONY: demo test bench-cpu clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml Makefile
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TRITON)" "numpy<2.5"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvforge demo

test: $(STAMP)
	$(PY) -m pytest -q -x -p no:cacheprovider tests

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_alloc.py

clean:
	rm -rf $(VENV) build *.egg-info
