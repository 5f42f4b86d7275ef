"""Whether all processes of a run see one workdir, checked before anything is trained.

Orbax writes each checkpoint from every process into the same directory, process 0 commits
it. A workdir on each host's own disk (`/tmp/run` on every node of a SLURM job) trains until
its first checkpoint, then waits 10 minutes for directories that other hosts never see and
fails: no checkpoint is ever committed. Process 0 writes a file with a fresh name into the
workdir, every process looks for it, and all fail at once if one cannot see it.
"""
import os
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sasa_jax import run_info

TOKEN_PREFIX = ".shared_check_"


def _sees(path: epath.Path, text: str, wait_s: float) -> bool:
  """Whether `path` holds `text` within `wait_s` seconds (a shared filesystem's attribute
  cache may show a new file late)."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      if path.exists() and path.read_text() == text:
        return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.5)


def check(workdir: epath.PathLike, wait_s: float = 10.0) -> None:
  """Every process calls it (a collective; nothing to do in a one-process run). Raises
  ValueError on every process, naming the processes and hosts that do not see the file
  process 0 wrote into `workdir`."""
  if jax.process_count() == 1:
    return
  token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint8))
  name = bytes(np.asarray(token, np.uint8)).hex()
  path = epath.Path(workdir) / (TOKEN_PREFIX + name)
  if jax.process_index() == 0:
    path.write_text(name)
  multihost_utils.sync_global_devices(f"{path} written")
  seen = np.asarray(multihost_utils.process_allgather(np.int32(_sees(path, name, wait_s))))
  if jax.process_index() == 0:
    path.unlink(missing_ok=True)
  blind = [int(i) for i in np.flatnonzero(seen == 0)]
  if blind:
    hosts = run_info.process_hosts()
    raise ValueError(
        f"the workdir {workdir} is not one directory for all {jax.process_count()} "
        f"processes: process(es) {blind} (host(s) {sorted({hosts[i] for i in blind})}) do not "
        f"see the file process 0 ({hosts[0]}) wrote there. Checkpoints need a directory "
        "that every host reads and writes: a shared filesystem (NFS, Lustre, GPFS) mounted "
        "at the same path on every host, or gs://.")
