"""Multi-process start-up: jax.distributed from the environment, before any device use.

Explicit (any cluster, and launch/local.sh on loopback):
  SASA_COORDINATOR_ADDRESS=host:port SASA_NUM_PROCESSES=N SASA_PROCESS_ID=i
  [SASA_HEARTBEAT_TIMEOUT=seconds: how soon the others fail when one process dies]
Automatic (jax's cluster detection): SLURM with more than one task, or a multi-worker
TPU VM slice. A single process needs nothing.
"""
import os

import jax
from absl import logging


def _cluster_env() -> bool:
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_from_env() -> None:
  """Calls jax.distributed.initialize when the environment describes several processes."""
  num = int(os.environ.get("SASA_NUM_PROCESSES", "1"))
  if num > 1:
    address = os.environ.get("SASA_COORDINATOR_ADDRESS")
    if not address or "SASA_PROCESS_ID" not in os.environ:
      raise ValueError("SASA_NUM_PROCESSES>1 needs SASA_COORDINATOR_ADDRESS (host:port) and "
                       "SASA_PROCESS_ID (0..N-1) in the environment")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        address, num_processes=num, process_id=int(os.environ["SASA_PROCESS_ID"]),
        heartbeat_timeout_seconds=int(os.environ.get("SASA_HEARTBEAT_TIMEOUT", "100")))
  elif _cluster_env():
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
