# sasa_jax: set-up and everyday commands. Everything runs on the CPU unless JAX sees an accelerator.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: install test test-deps demo tables bench model-table gpu-check data clean

install: $(STAMP) data

# Re-runs only when setup.py changes; `make install` is a no-op afterwards.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Real Fashion-MNIST from Debian's dataset-fashion-mnist, where missing and apt works.
data: $(FMNIST)
$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) || \
	  echo "warning: could not apt-get install dataset-fashion-mnist; tests that need it will fail"; \
	else echo "warning: no apt-get; install dataset-fashion-mnist (or let TFDS download it)"; fi

# What the cluster tests run for real: a single-node SLURM (slurm-wlm, munge) and openssl for
# the GCS emulator's certificate. Installed where apt works (as root); elsewhere those tests
# skip, saying why (CI, through .ci/run, fails them instead).
TEST_DEBS := slurm-wlm munge openssl
test-deps:
	@missing=""; for c in slurmctld slurmd munged openssl; do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  (apt-get install -y -qq $(TEST_DEBS) >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(TEST_DEBS) >/dev/null 2>&1)) || \
	  echo "warning: could not apt-get install $(TEST_DEBS); the SLURM tests will skip"; \
	fi

test: install test-deps
	JAX_PLATFORMS=cpu $(PY) -m pytest -q -n 2 --durations=15 tests

# The main job: a SASA ResNet learns real Fashion-MNIST on the CPU (FRESH=1 starts over).
demo: install
	$(PY) -m sasa_jax.tools.demo --workdir=runs/demo $(if $(FRESH),--fresh,)

# The paper's Tables 1, 4, 5 at small scale: runs/tables/report.md and plots (FRESH=1 retrains).
tables: install
	$(PY) -m sasa_jax.tools.tables --outdir=runs/tables $(if $(FRESH),--fresh,)

# Speed and memory of the attention op and of training steps against convolution.
bench: install
	$(PY) -m sasa_jax.tools.bench

# On an accelerator machine, from a checkout, with that machine's own jax (no install):
# correctness and speed of the Pallas kernels (sasa_jax/tools/gpu_check.py). Results in
# $(GPU_CHECK_OUT); CPU_SMOKE=1 runs tiny shapes anywhere.
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m sasa_jax.tools.gpu_check --out=$(GPU_CHECK_OUT) $(if $(CPU_SMOKE),--cpu-smoke,)

model-table: install
	$(PY) -m sasa_jax.tools.model_table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
