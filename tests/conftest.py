"""Tests run on the CPU only. Real Fashion-MNIST is prepared once per session."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402


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
