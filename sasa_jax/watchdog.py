"""Stops a run that has stopped making progress, saying where each thread was.

A step that never finishes raises nothing: a GPU that stopped answering, a collective
waiting for a peer that is stuck but alive (its heartbeat goes on, so jax.distributed does
not stop it), a read from a hung network filesystem. Left alone, every process waits until
the job's time limit, on every device of the run. So the training loop runs inside a
`Watchdog` and calls `progress(what)` after each step, evaluation batch and checkpoint save
(host-side: a hung device stops them within `log_every_steps` steps, where the loop waits
for the metrics), and a thread checks every few seconds. After `timeout_s` seconds without
progress it logs what came last and how long ago, writes every thread's Python stack to
stderr (faulthandler), tells the other processes, which stop too, and exits with status 75
(EX_TEMPFAIL, `peer_failure.HUNG_STATUS`, every process alike): a launcher that starts the
run again resumes from the last checkpoint.

The clock runs from the start (restoring, reading the first batch) except while the training
step compiles (`paused`); the first step's execution is timed (on a GPU cluster NCCL sets up
its communicators there), and so is an evaluation's first batch, compilation included.
"""
import contextlib
import faulthandler
import sys
import threading
import time

from absl import logging

from sasa_jax import peer_failure


class Watchdog:
  """`with Watchdog(timeout_s) as watchdog:` around a run, `watchdog.progress(what)` from its
  loop. timeout_s = 0: does nothing."""

  def __init__(self, timeout_s: float, field: str = "config.hang_timeout_s"):
    self.timeout_s = float(timeout_s)
    self._field = field
    self._last = (time.monotonic(), "start-up")  # the latest progress: when, what
    self._paused = False
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    self.progress("start-up")
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
      self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def progress(self, what: str) -> None:
    self._last = (time.monotonic(), what)

  @contextlib.contextmanager
  def paused(self, what: str):
    """Not timed within the block (a compilation); `what` is progress at its end."""
    self._paused = True
    try:
      yield
    finally:
      self._paused = False
      self.progress(what)

  def _watch(self) -> None:
    while not self._stop.wait(min(5.0, self.timeout_s / 4)):
      at, what = self._last
      idle = time.monotonic() - at
      if idle >= self.timeout_s and not self._paused:
        self._fire(what, idle)

  def _fire(self, what: str, idle: float) -> None:
    message = (f"no progress for {idle:.0f} s since {what} ({self._field}="
               f"{self.timeout_s:g}): the run is hung")
    logging.error("%s; every thread's stack follows, then this process exits with status %d "
                  "(a restart resumes from the last checkpoint)", message,
                  peer_failure.HUNG_STATUS)
    logging.flush()
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    peer_failure.stop_every_process_hung(message)
