# kvforge: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv when missing and install what they need.
# TORCH and TRITON are honoured on every run: the install stamp records them,
# and a run with other values installs those (make test TORCH=torch==2.11.0).
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
TRITON ?= triton==3.6.0
PY     := $(VENV)/bin/python
# what was installed: rewritten only when TORCH or TRITON differ from the last run
SPEC   := $(VENV)/.kvforge-spec
STAMP  := $(VENV)/.kvforge-installed

.PHONY: demo test docs docs-check bench-cpu wheel clean redis-server FORCE

# the remote tier's tests run a real redis-server: Debian's package, installed when missing
export PATH := $(PATH):/usr/local/bin:/usr/bin:/usr/sbin
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(SPEC): FORCE | $(PY)
	@echo '$(TORCH) $(TRITON)' | cmp -s - $@ || echo '$(TORCH) $(TRITON)' > $@

$(STAMP): $(SPEC) pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q "$(TRITON)" "numpy<2.5"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvforge demo

redis-server:
	@command -v redis-server >/dev/null || { export DEBIAN_FRONTEND=noninteractive; \
	  $(SUDO) apt-get install -y -qq redis-server >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server >/dev/null; }; }

test: $(STAMP) redis-server
	$(PY) -m pytest -q -x -p no:cacheprovider tests

# rewrite the sample outputs in README.md and docs/ from what the commands print now
docs: $(STAMP)
	$(PY) scripts/make_docs.py

docs-check: $(STAMP)
	$(PY) scripts/make_docs.py --check

bench-cpu: $(STAMP)
	$(PY) benchmarks/bench_alloc.py

wheel: $(STAMP)
	rm -rf build  # no stale files from an earlier build in the wheel
	$(PY) -m build --wheel --no-isolation --outdir dist

clean:
	rm -rf $(VENV) build dist *.egg-info
