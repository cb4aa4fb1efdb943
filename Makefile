# One command each, from a fresh clone:
#   make train   - create .venv, install, train the tiny preset on the embedded corpus (CPU, a few minutes)
#   make test    - create .venv, install with test extras, run the test suite
#   make test-portable - the numerics-bearing tests under other CPUs' code paths (CI runs it after make test)
#   make lint    - ruff format --check and ruff check (CI runs it first)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE := $(VENV)/.installed-base
TEST := $(VENV)/.installed-test
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup train test test-slow test-portable lint gpu-check gpu-check-smoke bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(BASE): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e .
	touch $@

$(TEST): $(BASE)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	touch $@

setup: $(TEST)

# --resume latest: the first run starts fresh; running it again continues (or, finished, re-evaluates) that run
# instead of being refused for reusing its folder (a run folder belongs to one run).
train: $(BASE)
	$(BIN)/moe-arch train --resume latest $(ARGS)

test: $(TEST)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(TEST)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The formatter and the linter, as CI runs them (ruff format rewrites; this only checks).
lint: $(TEST)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# The numerics-bearing tests again under other CPUs' code paths (MKL_CBWR, ATEN_CPU_CAPABILITY, our kernels' ISA):
# a bitwise assertion between two different computations fails here on any machine, not only on the CPU it differs on.
test-portable: $(TEST)
	$(BIN)/python tools/test_portable.py $(PYTEST_ARGS)

# On a GPU machine, with that machine's own python3 (nothing installed; ~7 minutes on one H200): one table + JSON.
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --json $${OUT:-.}/gpu_check.json $(ARGS)

# The same script at toy sizes on the CPU (Triton under its interpreter); a default-suite test runs it too.
gpu-check-smoke: $(TEST)
	$(BIN)/python bench/gpu_check.py --smoke --json /tmp/gpu_check.json

bench: $(TEST)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .cache runs
