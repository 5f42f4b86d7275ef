"""What each start of a run ran on: one JSON row per start in WORKDIR/starts.jsonl (code
version, packages, devices, processes), so that a resumed run says where each part of it ran."""
import datetime
import importlib.metadata
import json
import platform
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "clu", "tensorflow",
            "tensorflow_datasets", "numpy")  # modules (tensorflow may be tensorflow-cpu's)
ROOT = Path(__file__).resolve().parent.parent  # the checkout, when sasa_jax runs from one
HOST_BYTES = 64  # a host name's longest DNS label is 63 bytes


def _git(*args: str) -> str:
  return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                        timeout=30, check=True).stdout.strip()


def code_version() -> dict:
  """{"commit": the git commit of the sasa_jax checkout that runs, "uncommitted_changes":
  whether files git tracks differ from it}; {} where sasa_jax does not run from a git
  checkout of its own (an installed package) or git is missing."""
  try:
    if Path(_git("rev-parse", "--show-toplevel")).resolve() != ROOT:
      return {}  # an installed copy inside some other repository
    return {"commit": _git("rev-parse", "HEAD"),
            "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no"))}
  except (OSError, subprocess.SubprocessError):
    return {}


def _version(module: str) -> str | None:
  """The module's __version__, else its distribution's (named as the module); None if it
  is not installed."""
  try:
    return importlib.import_module(module).__version__
  except ImportError:
    return None
  except AttributeError:
    try:
      return importlib.metadata.version(module.replace(".", "-"))
    except importlib.metadata.PackageNotFoundError:
      return None


def process_hosts() -> list[str]:
  """Every process's host name, by process index (a collective: every process calls it)."""
  host = socket.gethostname()
  if jax.process_count() == 1:
    return [host]
  names = multihost_utils.process_allgather(  # [processes, HOST_BYTES]
      np.frombuffer(host.encode()[:HOST_BYTES].ljust(HOST_BYTES), np.uint8))
  return [bytes(row).rstrip(b" ").decode(errors="replace") for row in np.asarray(names)]


def describe(start_step: int, hosts: list[str]) -> dict:
  """A start at `start_step` (0: a fresh run) as this process sees it, with every
  process's host."""
  return {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "start_step": start_step, "argv": sys.argv, "hosts": hosts,
          "python": platform.python_version(), "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(),
          "processes": jax.process_count(),
          "packages": {name: _version(name) for name in PACKAGES}, "code": code_version()}


def record_start(workdir: epath.PathLike, start_step: int, config_changes: list[str] = (),
                 num_train_steps: int | None = None, run: str | None = None) -> dict | None:
  """Every process calls it: process 0 appends describe(start_step, every process's host),
  `config_changes` (the config fields this start changed, "field: old there, new here"),
  the step the run trains to and its id in the workdir's lease to workdir/starts.jsonl
  (local or gs://) and returns it; the others return None."""
  hosts = process_hosts()
  if jax.process_index() != 0:
    return None
  row = {**describe(start_step, hosts), "config_changes": list(config_changes),
         "num_train_steps": num_train_steps, "run": run}
  with (epath.Path(workdir) / "starts.jsonl").open("a") as f:
    f.write(json.dumps(row) + "\n")
  return row
