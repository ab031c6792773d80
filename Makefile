# Two commands for a newcomer: `make demo` and `make test`. Each creates or reuses .venv (Python 3.12)
# and installs the project into it, editable, with what that command needs.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test bench gate clean

$(VENV)/.installed-%: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"jaxmoe needs Python >= 3.12, found {sys.version.split()[0]} at {sys.executable}; set PYTHON=..."'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

demo: $(VENV)/.installed-test
	$(PY) -m jaxmoe.demo

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n 2 --durations=10 $(PYTEST_ARGS)

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.moe $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
