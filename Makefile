# Two commands for a newcomer: `make demo` and `make test`. Each creates or reuses .venv (Python 3.12)
# and installs the project into it, editable, with what that command needs.
#
# `make test` runs the suite twice: in .venv on the newest releases, and in .venv-gpu-image on the GPU
# machine's stack, pinned in .ci/gpu-image.txt (which pyproject's floors equal), so a change cannot
# pass CI and break on the GPU. `make test-newest` and `make test-gpu-image` run one of them.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
GPU_IMAGE := .ci/gpu-image.txt
GPU_VENV := .venv-gpu-image
PYTEST := -m pytest -q -n 2 --durations=10 $(PYTEST_ARGS)

.PHONY: demo test test-newest test-gpu-image bench gate clean

# $(1): the venv; $(2): the extra; $(3): more pip options
define install
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"jaxmoe needs Python >= 3.12, found {sys.version.split()[0]} at {sys.executable}; set PYTHON=..."'
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(3) -e ".[$(2)]"
	$(if $(filter test,$(2)),$(call cuda_plugin,$(1),$(3)))
	@touch $(1)/.installed-$(2)
endef

# The test venvs get jaxlib's CUDA plugin without the CUDA libraries (--no-deps: 8 MB, no GPU needed):
# tests/test_lowering.py lowers the "triton" path for NVIDIA GPUs on the CPU with it. It must be
# jaxlib's own version, known only once pip has resolved jax, so no extra can name it. Its wheels are
# Linux-only; elsewhere the test skips, while here `make test` tells it to fail if the plugin is missing.
ifeq ($(shell uname -s),Linux)
define cuda_plugin
$(1)/bin/python -m pip install -q --no-deps $(2) "jax-cuda13-plugin==$$($(1)/bin/python -c 'import jaxlib; print(jaxlib.__version__)')"
endef
LOWERING_GATE := JAXMOE_REQUIRE_CUDA_LOWERING=1
else
cuda_plugin = @echo "no jax-cuda13-plugin on $(shell uname -s): tests/test_lowering.py skips"
LOWERING_GATE :=
endif

$(VENV)/.installed-%: pyproject.toml
	$(call install,$(VENV),$*,)

# The test venvs also depend on this file, which installs the CUDA plugin into them.
$(VENV)/.installed-test: pyproject.toml Makefile
	$(call install,$(VENV),test,)

$(GPU_VENV)/.installed-test: pyproject.toml $(GPU_IMAGE) Makefile
	$(call install,$(GPU_VENV),test,-c $(GPU_IMAGE))

demo: $(VENV)/.installed-test
	$(PY) -m jaxmoe.demo

test: test-newest test-gpu-image

test-newest: $(VENV)/.installed-test
	@echo "== the test suite on the newest releases ($(VENV))"
	$(LOWERING_GATE) $(PY) $(PYTEST)

# Two cuts keep both suites within CI's time (about 15 minutes on 2 cores), each covered elsewhere:
# - the portability gate compiles for sm_90 alone here, the GPU machine's target (the newest stack
#   compiles every target);
# - the tests parametrized with impl="xla" are left out (about 300 CPU-seconds): that path is pure jax.lax,
#   which the newest stack runs through them, and which this stack still runs in tests/test_reference.py
#   and in the "interpret" cases of the same tests (the same transforms, meshes and layers around the
#   kernels); on the GPU, tests/test_gpu.py holds "triton" against it on this very stack.
test-gpu-image: $(GPU_VENV)/.installed-test
	@echo "== the test suite on the GPU image's stack ($(GPU_VENV), $(GPU_IMAGE))"
	$(LOWERING_GATE) $(GPU_VENV)/bin/python $(PYTEST) --skip-impl xla -k "not (test_compiles and (sm_80 or gfx942))"

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.moe $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(GPU_VENV) build *.egg-info
