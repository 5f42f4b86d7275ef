"""Compiling for NVIDIA GPUs on this CPU-only machine with jax's own CUDA plugin (XLA:GPU and
Triton: tools/gpu_compile, tools/step_memory --gpu, preflight --gpu)."""
import json
import os
import re
import subprocess
import sys

from tests import helpers
from tests.conftest import require_compiler


def _plugin():
  from sasa_jax.tools import gpu_compile  # noqa: PLC0415
  require_compiler(gpu_compile)


def _rows(*args):
  out = helpers.run_module("sasa_jax.tools.gpu_compile", [*args, "--format=json"]).stdout
  return json.loads(out)


def test_the_triton_kernels_compile_for_hopper_and_ampere():
  """impl="pallas" (the Triton kernels: fwd, dq, dk/dv) and impl="auto" (the blocked XLA form
  on GPU) compile for an H100 (sm_90a) and an A100 (sm_80), forward and backward, at
  ResNet-50's 56x56x64 stage and, in float32, at 7x7x512."""
  _plugin()
  rows = _rows("--gpu=h100,a100", "--impls=auto,pallas", "--dtypes=bfloat16", "--batch=4",
               "--stages=56x64")
  assert [(r["target"], r["device"], r["impl"], r["compiled"]) for r in rows] == [
      (gpu, name, impl, True)
      for gpu, name in (("h100", "NVIDIA H100 80GB HBM3"), ("a100", "NVIDIA A100-SXM4-80GB"))
      for impl in ("auto", "pallas")], rows
  for r in rows:
    assert r["kernels"] == (3 if r["impl"] == "pallas" else 0), r
    assert r["temp_mib"] > 0, r
  (small,) = _rows("--gpu=h100", "--impls=pallas", "--dtypes=float32", "--batch=4",
                   "--stages=7x512")
  assert small["compiled"] and small["kernels"] == 3, small


def test_the_loops_step_on_two_gpu_hosts_keeps_batch_norm_groups_within_a_host():
  """The loop's own step (train.jit_train_step on its 1-D mesh over jax's device order)
  compiled for 2 hosts of 8 H100s: BatchNorm over groups of 16 images, pairs of GPUs on one
  host (NVLink, not the network), beside the gradients' all-reduce over the 16 GPUs; and as 2
  microbatches with groups of 4 within each GPU's microbatch (only the gradients' all-reduce
  over all 16)."""
  _plugin()
  result = helpers.mesh_step("gpu", "h100", "2x8")
  hosts = {int(i): d[0] for i, d in result["devices"].items()}
  assert hosts == {i: i // 8 for i in range(16)}, result
  everyone = "{{" + ",".join(map(str, range(16))) + "}}"
  pairs = "{" + ",".join("{%d,%d}" % (i, i + 1) for i in range(0, 16, 2)) + "}"
  assert result["16/1"] == [everyone, pairs], result
  assert all(hosts[int(a)] == hosts[int(b)] for a, b in
             (p.split(",") for p in pairs.strip("{}").split("},{")))
  assert result["4/2"] == [everyone], result


# step_memory's plan of the loop's step for one H100, for the tests' model on Fashion-MNIST
STEP_MEMORY = [f"--config=configs/fashion_mnist.py:{helpers.TINY_MODEL}", "--devices=1",
               "--gpu=h100", "--microbatches=1"]


def _step_memory(*args, environ=None):
  return helpers.run_module("sasa_jax.tools.step_memory", [*STEP_MEMORY, "--format=json", *args],
                            environ=environ, check=False)


def test_step_memory_plans_an_h100_against_what_jax_takes_of_it():
  """step_memory --gpu=h100: the loop's step (the tests' attention ResNet on the Fashion-MNIST
  config) compiled for an H100, against the 75% of its 84,929,347,584 bytes that jax's
  allocator takes; XLA_PYTHON_CLIENT_MEM_FRACTION changes that share, and a batch whose
  activations outgrow it does not fit."""
  _plugin()
  fits = _step_memory("--config.batch_size=128")
  assert fits.returncode == 0, fits.stderr[-3000:]
  (row,) = json.loads(fits.stdout)
  assert row["fits"] and round(row["device_mib"]) == 60746 and 0 < row["temp_mib"] < 1024, row
  half = _step_memory("--config.batch_size=262144",
                      environ=helpers.env(XLA_PYTHON_CLIENT_MEM_FRACTION="0.5"))
  (row,) = json.loads(half.stdout)
  assert round(row["device_mib"]) == 40497 and not row["fits"], row
  assert row["total_mib"] > 60746, row  # too large for the whole 75% too


def test_xla_gpu_0_10_crashes_on_the_resnets_backward_unless_triton_gemm_is_off():
  """jaxlib 0.10's XLA:GPU aborts compiling the loop's step (openxla/xla#47381); importing
  sasa_jax turns Triton GEMM fusions off there (sasa_jax/xla_gpu.py), and the step compiles
  (test_step_memory_plans_an_h100_against_what_jax_takes_of_it compiles it so). A user's own
  setting of the flag is left as it is."""
  _plugin()
  from jaxlib import version  # noqa: PLC0415
  plain = {k: v for k, v in helpers.env().items() if k != "XLA_FLAGS"}
  env = dict(plain, XLA_FLAGS="")
  probe = subprocess.run(
      [sys.executable, "-c", "import os, sasa_jax; print(os.environ['XLA_FLAGS'])"],
      env=env, cwd=helpers.ROOT, capture_output=True, text=True, check=True)
  if version.__version_info__[:2] != (0, 10):
    assert probe.stdout.strip() == ""
    return
  assert probe.stdout.strip() == "--xla_gpu_enable_triton_gemm=false"
  crash = subprocess.run(
      [sys.executable, "-m", "sasa_jax.tools.step_memory", *STEP_MEMORY],
      env=dict(plain, XLA_FLAGS="--xla_gpu_enable_triton_gemm=true"), cwd=helpers.ROOT,
      capture_output=True, text=True, timeout=600)
  assert crash.returncode != 0 and "triton_tiling_propagation.cc" in crash.stderr, (
      crash.returncode, crash.stderr[-2000:])


def test_preflight_plans_the_step_on_a_gpu_of_the_runs_kind(fmnist_dir, tmp_path):
  """preflight --gpu=h100 (launch/gpu_slurm.sh's GPU_TYPE): the memory line names the GPU and
  the share jax takes of it; a step that outgrows it fails the check (status 3) with the
  microbatch advice; an unknown GPU is named and not planned; --tpu beside it is refused."""
  _plugin()
  base = [f"--config=configs/fashion_mnist.py:{helpers.TINY_MODEL}",
          f"--config.dataset.data_dir={fmnist_dir}", f"--workdir={tmp_path / 'run'}"]
  ok = helpers.run_module("sasa_jax.tools.preflight", [*base, "--devices=2", "--gpu=h100"])
  assert re.search(r"\n  memory: [\d,]+ MiB per NVIDIA H100 80GB HBM3 of the 60,746 MiB that "
                   r"jax's allocator takes on it \(state ", ok.stdout), ok.stdout
  big = helpers.run_module("sasa_jax.tools.preflight",
                           [*base, "--devices=1", "--gpu=a100", "--config.batch_size=60000",
                            "--config.model.width_multiplier=1"], check=False)
  assert big.returncode == 3, big.stdout + big.stderr[-3000:]
  assert "preflight: FAILED: the step does not fit" in big.stderr
  assert "--config.num_microbatches=" in big.stderr, big.stderr
  other = helpers.run_module("sasa_jax.tools.preflight", [*base, "--devices=2", "--gpu=v100"])
  assert "memory: not planned for GPU v100 (tools/gpu_compile knows h100, h200, a100)" in \
      other.stdout
  both = helpers.run_module("sasa_jax.tools.preflight",
                            [*base, "--devices=2", "--gpu=h100", "--tpu=v5e"], check=False)
  assert both.returncode == 3 and "--tpu and --gpu: one device to plan for, not both" in \
      both.stderr, both.stderr[-2000:]
  assert not os.path.exists(tmp_path / "run")
