"""Whether all processes of a run share one writable workdir, checked before anything trains.

Orbax writes each checkpoint from every process into the same directory, and process 0
commits it. A workdir on each host's own disk (`/tmp/run` on every node of a SLURM job)
trains until its first checkpoint, then waits 10 minutes for directories that other hosts
never see and fails: no checkpoint is ever committed. A host that cannot write there (a
read-only mount, credentials without write access) fails at the same point. So at start
every process writes a file with a fresh name into the workdir, process 0 lists them, every
process reads process 0's, and all fail at once, naming the processes and hosts, if one
file is missing.
"""
import os
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from sasa_jax import run_info

TOKEN_PREFIX = ".shared_check_"


def _retry(seen, wait_s: float):
  """seen() -> bool, retried for `wait_s` seconds (a shared filesystem's attribute cache may
  show another host's new file late)."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      if seen():
        return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.5)


def check(workdir: epath.PathLike, wait_s: float = 10.0) -> None:
  """Every process calls it (a collective; nothing to do in a one-process run). Raises
  ValueError on every process, naming the processes and hosts whose file process 0 does not
  see, and those that do not see process 0's."""
  n = jax.process_count()
  if n == 1:
    return
  token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(8), np.uint8))
  name = TOKEN_PREFIX + bytes(np.asarray(token, np.uint8)).hex()
  workdir = epath.Path(workdir)
  file_of = lambda i: workdir / f"{name}_{i}"  # noqa: E731
  try:
    file_of(jax.process_index()).write_text(name)
  except OSError:
    pass  # process 0 will not list it
  multihost_utils.sync_global_devices(f"{name} written")
  reads = _retry(lambda: file_of(0).read_text() == name, wait_s)
  listed = np.zeros(n, np.int32)  # process 0: whose files it sees
  if jax.process_index() == 0:
    def all_listed():
      listed[[int(p.name.rsplit("_", 1)[1]) for p in workdir.glob(f"{name}_*")]] = 1
      return listed.all()
    _retry(all_listed, wait_s)
  listed = np.asarray(multihost_utils.broadcast_one_to_all(listed))
  sees_0 = np.asarray(multihost_utils.process_allgather(np.int32(reads)))
  try:
    file_of(jax.process_index()).unlink(missing_ok=True)
  except OSError:
    pass
  unseen = [int(i) for i in np.flatnonzero(listed == 0)]
  blind = [int(i) for i in np.flatnonzero(sees_0 == 0)]
  if unseen or blind:
    hosts = run_info.process_hosts()

    def named(ids):
      return f"process(es) {ids} (host(s) {sorted({hosts[i] for i in ids})})"
    raise ValueError(
        f"the workdir {workdir} is not one writable directory for all {n} processes: "
        + "; ".join(
            ([f"{named(unseen)} wrote no file there that process 0 ({hosts[0]}) sees"]
             if unseen else [])
            + ([f"{named(blind)} do not see the file process 0 wrote"] if blind else []))
        + ". Checkpoints need a directory that every host reads and writes: a shared "
        "filesystem (NFS, Lustre, GPFS) mounted read-write at the same path on every host, "
        "or gs://.")
