"""Multi-process start-up: jax.distributed from the environment, before any device use.

`plan_startup` decides, `initialize_from_env` acts:

| environment                                          | start-up                              |
|------------------------------------------------------|---------------------------------------|
| SASA_NUM_PROCESSES > 1 (+ SASA_COORDINATOR_ADDRESS,   | explicit `jax.distributed.initialize` |
|   SASA_PROCESS_ID; launch/local.sh, any cluster)      |                                       |
| SLURM job step with SLURM_NTASKS > 1                  | jax's SLURM detection; every GPU that |
|                                                       | SLURM gave the task, not only one     |
| GKE TPU: TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES | jax's GKE detection                   |
|   listing several workers                             |                                       |
| Cloud TPU VM (Google TPU chips on the PCI bus) whose  | jax's metadata-server detection       |
|   metadata lists several worker-network-endpoints     |                                       |
| anything else                                         | nothing: one process                  |

SASA_HEARTBEAT_TIMEOUT (seconds, default 100): how soon the others fail when one process dies;
one that raises stops every process within seconds (peer_failure.py). SASA_STARTUP_TIMEOUT
(seconds, default 300, jax's own): how long processes wait for every other to join; when one
never does (its host failed to start it, or cannot reach process 0's), each says so in a
line before jax aborts it.
Check a cluster with `python -m sasa_jax.distributed` on every host: it prints what it decided,
the process index and count, and the local and global devices.
"""
import contextlib
import dataclasses
import glob
import os
import threading
import urllib.error
import urllib.request
from typing import Callable, Mapping

from absl import logging

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips
METADATA_URL = "http://{host}/computeMetadata/v1/instance/attributes/{key}"


@dataclasses.dataclass(frozen=True)
class Startup:
  """How this process joins the run: `kind` and the keyword arguments of initialize()."""
  kind: str       # "single", "explicit", "slurm", "gke_tpu" or "tpu_vm"
  kwargs: dict = dataclasses.field(default_factory=dict)

  @property
  def distributed(self) -> bool:
    return self.kind != "single"


def tpu_vm_metadata(key: str, environ: Mapping[str, str] = os.environ,
                    timeout: float = 5.0) -> str | None:
  """An attribute of this VM from the GCE metadata server (GCE_METADATA_IP overrides its
  address, as in jax), or None when there is no such server or attribute."""
  host = environ.get("GCE_METADATA_IP", "metadata.google.internal")
  request = urllib.request.Request(METADATA_URL.format(host=host, key=key),
                                   headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.read().decode()
  except (urllib.error.URLError, OSError):
    return None


def has_tpu_chips(sysfs: str = "/sys/bus/pci/devices") -> bool:
  """Whether a Google TPU chip is on this host's PCI bus (what jax itself looks for)."""
  for path in glob.glob(os.path.join(sysfs, "*", "vendor")):
    with open(path) as f:
      if f.read().strip() == GOOGLE_PCI_VENDOR:
        return True
  return False


def _slurm_local_device_ids(environ) -> list[int] | None:
  """Every GPU SLURM gave this task. jax's own SLURM detection passes [SLURM_LOCALID], which
  with one task per node leaves all GPUs but the first idle."""
  visible = environ.get("CUDA_VISIBLE_DEVICES") or environ.get("SLURM_STEP_GPUS")
  count = len(visible.split(",")) if visible else int(environ.get("SLURM_GPUS_ON_NODE", "0"))
  if count <= 0:
    return None
  per_node = environ.get("SLURM_NTASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", "1")
  if int(per_node.split("(")[0].split(",")[0]) > 1:  # --per-gpu: one GPU each
    return [0] if count == 1 else [int(environ.get("SLURM_LOCALID", "0"))]
  return list(range(count))


def plan_startup(environ: Mapping[str, str] = os.environ,
                 metadata: Callable[[str], str | None] = tpu_vm_metadata,
                 tpu_chips: Callable[[], bool] = has_tpu_chips) -> Startup:
  """Decides how this process starts from its environment (pure apart from the callables)."""
  timeouts = dict(heartbeat_timeout_seconds=int(environ.get("SASA_HEARTBEAT_TIMEOUT", "100")),
                  initialization_timeout=int(environ.get("SASA_STARTUP_TIMEOUT", "300")))
  num = int(environ.get("SASA_NUM_PROCESSES", "1"))
  if num > 1:
    address = environ.get("SASA_COORDINATOR_ADDRESS")
    if not address or "SASA_PROCESS_ID" not in environ:
      missing = [v for v in ("SASA_COORDINATOR_ADDRESS", "SASA_PROCESS_ID") if v not in environ]
      raise ValueError(f"SASA_NUM_PROCESSES={num} needs {' and '.join(missing)} in the "
                       "environment (host:port of process 0, and this process's index 0..N-1)")
    return Startup("explicit", dict(coordinator_address=address, num_processes=num,
                                    process_id=int(environ["SASA_PROCESS_ID"]), **timeouts))
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    kwargs = dict(timeouts)
    ids = _slurm_local_device_ids(environ)
    if ids is not None:
      kwargs["local_device_ids"] = ids
    return Startup("slurm", kwargs)
  hosts = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  if "," in hosts:
    return Startup("gke_tpu", dict(timeouts))
  if tpu_chips():
    endpoints = metadata("worker-network-endpoints") or ""
    if "," in endpoints:
      return Startup("tpu_vm", dict(timeouts))
  return Startup("single")


def _rehearse_gpus_on_cpu(environ=os.environ) -> None:
  """A CPU rehearsal of a GPU job (JAX_PLATFORMS=cpu inside a SLURM job that was given GPUs):
  one CPU device per GPU of the task, so that device counts match the real run."""
  if environ.get("JAX_PLATFORMS") != "cpu" or "SLURM_JOB_ID" not in environ:
    return
  ids = _slurm_local_device_ids(environ)
  flags = environ.get("XLA_FLAGS", "")
  if ids and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={len(ids)}"


@contextlib.contextmanager
def _said_if_not_joined(startup: Startup):
  """Logs an error a few seconds before jax's start-up timeout, if the block is still
  waiting then: jax itself aborts with a C++ stack and "DEADLINE_EXCEEDED ... RegisterTask"."""
  timeout = startup.kwargs["initialization_timeout"]
  joined = threading.Event()

  def say():
    if not joined.wait(max(timeout - 3, 1)):
      where = startup.kwargs.get("coordinator_address", "process 0's host")
      logging.error(
          "start-up %s: not every process joined the run's coordinator (%s) within %d s "
          "(SASA_STARTUP_TIMEOUT): a process never started (a host that failed, or the "
          "launcher did not start it there: the hosts without a 'start-up %s: process i of N' "
          "line in their log) or cannot reach it (firewall, proxy). jax aborts every "
          "process now.", startup.kind, where, timeout, startup.kind)
      logging.flush()

  threading.Thread(target=say, name="startup_timeout", daemon=True).start()
  try:
    yield
  finally:
    joined.set()


def initialize_from_env() -> Startup:
  """Calls jax.distributed.initialize when the environment describes several processes."""
  import jax  # noqa: PLC0415 - keeps `plan_startup` importable without touching jax
  startup = plan_startup()
  _rehearse_gpus_on_cpu()
  if startup.distributed:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # The coordination service is gRPC between the run's own hosts: an https_proxy set for
    # the internet (object storage, downloads) would send it to a proxy and start-up would
    # hang. gRPC reads grpc_proxy before https_proxy and takes an empty one as "no proxy";
    # HTTP clients (TensorFlow's GCS, tensorstore, google-cloud-storage) ignore it.
    os.environ.setdefault("grpc_proxy", "")
    with _said_if_not_joined(startup):
      jax.distributed.initialize(**startup.kwargs)
    from sasa_jax import peer_failure  # noqa: PLC0415
    peer_failure.watch()
  logging.info("start-up %s: process %d of %d (pid %d), %d local / %d global devices",
               startup.kind, jax.process_index(), jax.process_count(), os.getpid(),
               jax.local_device_count(), jax.device_count())
  return startup


def main():
  startup = initialize_from_env()
  import jax  # noqa: PLC0415
  print(f"start-up: {startup.kind} {startup.kwargs}")
  print(f"process {jax.process_index()} of {jax.process_count()}: "
        f"{jax.local_device_count()} local devices {jax.local_devices()}, "
        f"{jax.device_count()} global", flush=True)


if __name__ == "__main__":
  main()
