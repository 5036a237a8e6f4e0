# `make demo` and `make test` each set up .venv first (once), then run.
# `make test` leaves out the tests marked slow (minutes each: CI stays under 20 minutes); `make test-all` runs them too.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without a GPU, install the CPU build of torch first so that pip does not pull a multi-GB CUDA build.
# On a GPU machine, a torch already importable by $(PYTHON) with CUDA is reused through --system-site-packages.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv demo test test-all test-cpus clean
PYTEST_ARGS ?= -m "not slow"

$(BIN)/.installed: pyproject.toml
	@bash scripts/libaio.sh  # NVMe offload's system library: installed when root, else the command to run
	@if [ ! -x $(BIN)/python ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	    echo "Using the CUDA torch of $(PYTHON)"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON) -m venv $(VENV); fi; fi
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,slurm]"
	@touch $@

venv: $(BIN)/.installed

demo: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/deepspeed launch/train.py task=qa

test: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: venv
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

# The numerical tests (slow ones included) under this CPU's own kernels, then under another CPU's order of sums:
# torch's AVX2 kernels; torch's portable kernels with MKL's reproducible path (docs/testing.md).
CPU_PROFILES := "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2" \
	"ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE"
test-cpus: venv
	@set -e; for profile in "" $(CPU_PROFILES); do \
	  echo "== numerical tests under $${profile:-this CPU's own kernels}"; \
	  env $$profile PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m numerics; done

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
