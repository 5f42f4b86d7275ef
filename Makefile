# sasa_jax: set-up and everyday commands. Everything runs on the CPU unless JAX sees an accelerator.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# TFDS's data_dir (its default unless TFDS_DATA_DIR is set): the demo and the tests read it.
TFDS_DIR := $(or $(TFDS_DATA_DIR),$(HOME)/tensorflow_datasets)
FMNIST_TFDS := $(TFDS_DIR)/fashion_mnist/3.0.1/dataset_info.json
DETECT_TFDS := $(TFDS_DIR)/fashion_mnist_detection/1.0.0/dataset_info.json
export TF_CPP_MIN_LOG_LEVEL ?= 3
# Quietly apt-installs $(1), refreshing the package lists only if the first try fails.
apt_install = (apt-get install -y -qq $(1) >/dev/null 2>&1 || \
  (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(1) >/dev/null 2>&1))

.PHONY: install kernel test test-deps tpu-compiler gpu-compiler demo detect-demo tables bench model-table gpu-check data allocator clean

install: $(STAMP) data allocator kernel

# Re-runs only when setup.py changes; `make install` is a no-op afterwards.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# The CPU attention kernel (sasa_jax/ops/local_attention_cpu.cc), compiled once per machine
# into ~/.cache/sasa_jax (a few seconds; impl="auto" would otherwise build it on first use).
kernel: | $(STAMP)
	@$(PY) -c "from sasa_jax.ops import local_attention_cpu as k; k.build()" || \
	  echo "warning: the CPU attention kernel did not build; the CPU uses the blocked XLA form"

# Real Fashion-MNIST from Debian's dataset-fashion-mnist (where missing and apt works),
# prepared once in TFDS format (about 35 s; TFDS downloads it where the Debian files are absent),
# and the detection set made of its items (fashion_mnist_detection, about 20 s).
data: $(FMNIST_TFDS) $(DETECT_TFDS)
$(FMNIST_TFDS): | $(STAMP) $(FMNIST)
	$(PY) -c "from sasa_jax.data import fashion_mnist; fashion_mnist.prepare('$(TFDS_DIR)')"
$(DETECT_TFDS): | $(FMNIST_TFDS)
	$(PY) -c "from sasa_jax.data import fashion_mnist_detection as d; d.prepare('$(TFDS_DIR)')"
$(FMNIST):
	@if command -v apt-get >/dev/null 2>&1; then \
	  $(call apt_install,dataset-fashion-mnist) || \
	  echo "warning: could not apt-get install dataset-fashion-mnist; tests that need it will fail"; \
	else echo "warning: no apt-get; install dataset-fashion-mnist (or let TFDS download it)"; fi

# jemalloc with its oversize arena off (MALLOC_CONF=oversize_threshold:0): XLA:CPU allocates
# every step's temporaries anew (one ~100 MB buffer for the demo model), and glibc maps and
# zero-fills them each time (~25k page faults per step, a fifth of the demo's step time).
# Used by the targets below where installed (Debian: libjemalloc2, installed here where apt
# works as root); docs/performance.md has the measurements.
allocator:
	@if ! ls /usr/lib/*/libjemalloc.so.2 >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  $(call apt_install,libjemalloc2) || \
	  echo "warning: could not apt-get install libjemalloc2; CPU steps run 16-27% slower"; \
	fi
WITH_JEMALLOC = lib=$$(ls /usr/lib/*/libjemalloc.so.2 2>/dev/null | head -n 1); \
	if [ -n "$$lib" ]; then export LD_PRELOAD="$$lib" MALLOC_CONF=oversize_threshold:0; fi;

# What the cluster tests run for real: a single-node SLURM (slurm-wlm, munge) and openssl for
# the GCS emulator's certificate. Installed where apt works (as root); elsewhere those tests
# skip, saying why (CI, through .ci/run, fails them instead).
TEST_DEBS := slurm-wlm munge openssl
test-deps: tpu-compiler gpu-compiler | $(STAMP)
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q -e ".[census]"
	@missing=""; for c in slurmctld slurmd munged openssl; do command -v $$c >/dev/null 2>&1 || missing=1; done; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  $(call apt_install,$(TEST_DEBS)) || \
	  echo "warning: could not apt-get install $(TEST_DEBS); the SLURM tests will skip"; \
	fi

# libtpu, the Cloud TPU runtime with its XLA:TPU compiler, at the version jax's [tpu] extra
# pins, into its own directory (not on the environment's path: jax would look for a TPU at
# every start). tools/tpu_compile and tools/step_memory --tpu compile for TPUs with it.
LIBTPU_DIR := $(VENV)/tpu_compiler
tpu-compiler: | $(STAMP)
	@test -d $(LIBTPU_DIR)/libtpu || $(PY) -m pip install -q --no-deps --target $(LIBTPU_DIR) \
	  "$$($(PY) -c 'import importlib.metadata as m; print(next(r.split(";")[0].strip() for r in m.requires("jax") if r.startswith("libtpu")))')" || \
	  echo "warning: could not install libtpu (Linux x86-64 only); the TPU compile tests will skip"

# jax's CUDA plugin (XLA:GPU and Triton, about 480 MB) at jaxlib's own version, without the
# CUDA libraries, into its own directory: tools/gpu_compile and tools/step_memory --gpu
# compile for NVIDIA GPUs with it, on a machine without one.
GPU_COMPILER_DIR := $(VENV)/gpu_compiler
gpu-compiler: | $(STAMP)
	@test -d $(GPU_COMPILER_DIR)/jax_plugins || { v=$$($(PY) -c 'import jaxlib.version as v; print(v.__version__)') && \
	  $(PY) -m pip install -q --no-deps --target $(GPU_COMPILER_DIR) "jax-cuda12-plugin==$$v" "jax-cuda12-pjrt==$$v"; } || \
	  echo "warning: could not install jax's CUDA plugin (Linux x86-64 only); the GPU compile tests will skip"

# Three pytest workers on the 2-core machines measured: the multi-process tests wait on gloo
# round trips and process start-up, and a third worker fills those waits; an idle worker
# takes half of the busiest one's queue (worksteal), so no worker ends alone (docs/testing.md).
TEST_WORKERS ?= 3
test: install test-deps
	$(WITH_JEMALLOC) SASA_TEST_TFDS_DIR=$(TFDS_DIR) JAX_PLATFORMS=cpu $(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=20 tests

# The main job: a SASA ResNet learns real Fashion-MNIST on the CPU (FRESH=1 starts over).
demo: install
	$(WITH_JEMALLOC) $(PY) -m sasa_jax.tools.demo --workdir=runs/demo $(if $(FRESH),--fresh,)

# Detection: a small attention RetinaNet finds Fashion-MNIST items on canvases; COCO mAP through
# pycocotools and runs/detect/detections.png (FRESH=1 starts over).
detect-demo: install
	$(WITH_JEMALLOC) $(PY) -m sasa_jax.tools.detect_demo --workdir=runs/detect $(if $(FRESH),--fresh,)

# The paper's Tables 1 and 3-7 at small scale: runs/tables/report.md and plots (FRESH=1 retrains).
tables: install
	$(WITH_JEMALLOC) $(PY) -m sasa_jax.tools.tables --outdir=runs/tables $(if $(FRESH),--fresh,)

# Speed and memory of the attention op and of training steps against convolution.
bench: install
	$(WITH_JEMALLOC) $(PY) -m sasa_jax.tools.bench

# On an accelerator machine, from a checkout, with that machine's own jax (no install):
# correctness and speed of the Pallas kernels (sasa_jax/tools/gpu_check.py, docs/gpu.md).
# Results in $(GPU_CHECK_OUT); CPU_SMOKE=1 runs tiny shapes anywhere; more options in
# GPU_CHECK_ARGS (e.g. "--tune --budget-s 400").
GPU_CHECK_OUT ?= runs/gpu_check
gpu-check:
	PYTHONPATH=. $(if $(wildcard $(PY)),$(PY),$(PYTHON)) -m sasa_jax.tools.gpu_check --out=$(GPU_CHECK_OUT) $(if $(CPU_SMOKE),--cpu-smoke,) $(GPU_CHECK_ARGS)

model-table: install
	$(PY) -m sasa_jax.tools.model_table

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
