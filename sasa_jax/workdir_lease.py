"""One run per workdir: WORKDIR/lease.json names the run that trains there, renewed while it runs.

Two runs on one workdir (a launch command run again in another terminal, on another slice,
by a colleague) save the same checkpoint steps and interleave their metrics: orbax fails
with StepAlreadyExistsError, or one run's checkpoint replaces the other's. So process 0
claims the workdir before it restores anything:

- no lease (none yet, or its holder released it: it ended, was preempted or failed):
  claimed at once;
- a lease whose holder is gone for sure: its process is not running on this host, it
  belongs to an earlier start of this SLURM job (a requeued job: another
  SLURM_RESTART_COUNT), or it was last renewed more than `expire_s` + CLOCK_SKEW_S ago by
  this machine's clock: taken over at once;
- otherwise the lease is watched for `expire_s` seconds. A renewal means a live run: this
  one stops with WorkdirInUseError naming it. None means its holder was killed without
  releasing it (a preempted VM, `kill -9`): this run takes over.

The holder renews the lease every `expire_s` / 6 seconds from a thread, reading it first.
If it names another run (two runs claimed at once and the other's write landed last, or
this run stalled for longer than `expire_s` and was taken over), `check()` raises
WorkdirLeaseLostError and the training loop stops before its next step or checkpoint.
"""
import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

from absl import logging
from etils import epath

LEASE_FILE = "lease.json"
CLOCK_SKEW_S = 120.0  # clocks of two machines may differ this much
RENEWALS_PER_EXPIRY = 6


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir's lease and renews it."""


class WorkdirLeaseLostError(RuntimeError):
  """Another run took over the workdir while this one trained."""


def describe(lease: dict | None) -> str:
  """"run R on host H (pid P, SLURM job J), started T, renewed S s ago" for a lease's dict."""
  if not lease:
    return "no run (the lease file was removed)"
  job = f", SLURM job {lease['slurm_job_id']}" if lease.get("slurm_job_id") else ""
  ago = time.time() - lease.get("renewed", 0.0)
  return (f"run {lease.get('run')} on host {lease.get('host')} (pid {lease.get('pid')}{job}), "
          f"started {lease.get('started')}, renewed {ago:.0f} s ago by this machine's clock")


def read(workdir: epath.PathLike) -> dict | None:
  """The workdir's lease as a dict; None where it has none."""
  path = epath.Path(workdir) / LEASE_FILE
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except json.JSONDecodeError:
    logging.warning("%s is not JSON: treated as no lease", path)
    return None


def _pid_gone(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, TypeError, ValueError):
    return False
  return False


class WorkdirLease:
  """The lease of one run on `workdir`; `active=False` (processes other than 0, or
  expire_s = 0) holds nothing and checks nothing."""

  def __init__(self, workdir: epath.PathLike, expire_s: float, active: bool = True,
               poll_s: float = 1.0):
    workdir = epath.Path(workdir)
    self.path = workdir / LEASE_FILE
    self.expire_s = float(expire_s)
    self.active = active and self.expire_s > 0
    self.poll_s = min(poll_s, self.expire_s / RENEWALS_PER_EXPIRY) if self.active else poll_s
    self.mine = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(),
                 "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "slurm_restart_count": os.environ.get("SLURM_RESTART_COUNT", "0"),
                 "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                     timespec="seconds"), "renewed": time.time(), "renewals": 0}
    self.lost: dict | None = None  # what the lease file held when this run saw it lost
    self._confirmed = threading.Event()  # the renewal thread read this run's claim back
    self._stop = threading.Event()
    self._thread = None

  @property
  def run(self) -> str | None:
    """This run's id in the lease (None where it holds none)."""
    return self.mine["run"] if self.active else None

  def _read(self) -> dict | None:
    return read(self.path.parent)

  def _write(self) -> None:
    # whole or not at all for readers: a new file, renamed over the lease
    tmp = self.path.parent / f".{LEASE_FILE}.{self.mine['run']}"
    tmp.write_text(json.dumps(self.mine))
    tmp.replace(self.path)

  def _gone(self, held: dict) -> str | None:
    """Why the lease's holder is surely not running, or None."""
    same_host = held.get("host") == self.mine["host"]
    if same_host and (held.get("pid") == self.mine["pid"] or _pid_gone(held.get("pid"))):
      return f"its process {held.get('pid')} is not running on this host"
    if (held.get("slurm_job_id") and held["slurm_job_id"] == self.mine["slurm_job_id"]
        and held.get("slurm_restart_count") != self.mine["slurm_restart_count"]):
      return (f"it belongs to start {held.get('slurm_restart_count')} of this SLURM job "
              f"({held['slurm_job_id']}), requeued since")
    age = time.time() - held.get("renewed", 0.0)
    if age > self.expire_s + CLOCK_SKEW_S:
      return f"it was last renewed {age:.0f} s ago"
    return None

  def claim(self) -> None:
    """Claims the workdir (see the module's docstring), or raises WorkdirInUseError."""
    if not self.active:
      self._confirmed.set()
      return
    held = self._read()
    gone = held and self._gone(held)
    if gone:
      logging.warning("taking over %s from %s: %s", self.path, describe(held), gone)
    elif held:
      logging.warning("%s names %s; watching it for %.0f s (config.workdir_lease_s) for a "
                      "renewal", self.path, describe(held), self.expire_s)
      deadline = time.monotonic() + self.expire_s
      while time.monotonic() < deadline:
        time.sleep(self.poll_s)
        now = self._read()
        if now is None:
          break  # released
        if now.get("run") != held.get("run") or now.get("renewals") != held.get("renewals"):
          raise WorkdirInUseError(
              f"the workdir {self.path.parent} is in use by {describe(now)}. Two runs on one "
              "workdir overwrite each other's checkpoints and metrics: stop that run first "
              "(it saves a checkpoint on SIGTERM and then releases the workdir), or give "
              "this one another --workdir")
      else:
        logging.warning("%s was not renewed for %.0f s: its run is gone; taking over",
                        self.path, self.expire_s)
    self._write()
    self._thread = threading.Thread(target=self._renew, name="workdir_lease", daemon=True)
    self._thread.start()

  def _renew(self) -> None:
    wait = min(1.0, self.expire_s / RENEWALS_PER_EXPIRY)  # the first read-back comes soon
    while not self._stop.wait(wait):
      wait = self.expire_s / RENEWALS_PER_EXPIRY
      try:
        now = self._read()
        if not now or now.get("run") != self.mine["run"]:
          self.lost = now or {}
          logging.error("%s now names %s: another run took over this workdir", self.path,
                        describe(now))
          return
        self.mine.update(renewed=time.time(), renewals=self.mine["renewals"] + 1)
        self._write()
      except OSError as e:  # storage briefly unreachable: the next renewal tries again
        logging.warning("could not renew %s: %s", self.path, e)
      finally:
        self._confirmed.set()

  def confirm(self) -> None:
    """Waits until this run's claim has been read back once, then check()s: of two runs that
    claimed at once, the one whose write landed first raises here."""
    self._confirmed.wait(timeout=max(self.expire_s, 10.0))
    self.check()

  def check(self) -> None:
    """Raises WorkdirLeaseLostError once another run holds the lease."""
    if self.lost is not None:
      raise WorkdirLeaseLostError(
          f"{self.path} now names {describe(self.lost)}: another run has taken over the "
          f"workdir {self.path.parent}, so this one stops without writing to it again")

  def release(self) -> None:
    """Stops renewing and removes the lease if it is still this run's."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    try:
      if (self._read() or {}).get("run") == self.mine["run"]:
        self.path.unlink()
    except OSError as e:
      logging.warning("could not release %s: %s", self.path, e)


@contextlib.contextmanager
def held(workdir: epath.PathLike, expire_s: float, active: bool = True):
  """The claimed WorkdirLease of this run, released on the way out, however it goes."""
  lease = WorkdirLease(workdir, expire_s, active)
  lease.claim()
  try:
    yield lease
  finally:
    lease.release()
