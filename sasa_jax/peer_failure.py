"""When one process of a multi-process run fails, every process stops within seconds, saying why.

Left alone, a process that raises waits at exit in jax.distributed's shutdown barrier for
the others while they wait for it in the step's collectives: every process hangs until the
barrier times out (5 minutes), then aborts with a C++ stack. Instead, `stop_all_on_error`
makes a failing process log its traceback, publish one line (host, error) in the
coordination service's key-value store and exit with status 1; `watch` runs a thread in
every process that reads that store every POLL_SECONDS and, when a peer has failed, logs
which process failed, where and with what, and exits with status 1 too. A hung process
(watchdog.py) does the same through `stop_every_process_hung`, and every process exits with
HUNG_STATUS instead. A process that dies outright (killed, out of host memory) publishes
nothing: jax's heartbeat (SASA_HEARTBEAT_TIMEOUT) stops the others then.
"""
import atexit
import contextlib
import os
import socket
import sys
import threading
import time

import jax
from absl import logging

KEY_DIR = "sasa_jax/failed"
POLL_SECONDS = 2.0
# A hung run (sasa_jax/watchdog.py) exits with EX_TEMPFAIL, every process with it: a launcher
# may start it again, where a failure (status 1) would fail the same way.
HUNG = "Hung"
HUNG_STATUS = 75


def _client():
  """The coordination service's client of this process (None with one process), read where
  orbax reads it: jax has no public handle on it."""
  from jax._src import distributed  # noqa: PLC0415
  return getattr(getattr(distributed, "global_state", None), "client", None)


def _exit(status: int) -> None:
  """Exits now, without jax's shutdown barrier (which would wait for the peers)."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def failed_peers(client, me: int) -> list[tuple[int, str]]:
  """(process index, "host: error") of every other process that has published a failure."""
  published = ((int(key.rsplit("/", 1)[-1]), what)
               for key, what in client.key_value_dir_get(KEY_DIR))
  return sorted((index, what) for index, what in published if index != me)


def _status_of(what: str) -> int:
  """The exit status that a peer's published "host: error" calls for."""
  return HUNG_STATUS if what.split(": ", 2)[1:2] == [HUNG] else 1


def _leave(me: int, what: str) -> None:
  """Exits as the failed peer's `what` calls for; process 0 hosts the service, so it waits
  until a failed peer, which reads the service until it exits, is gone."""
  if me == 0:
    time.sleep(2 * POLL_SECONDS + 1)
  _exit(_status_of(what))


def _poll(client, me: int, stop: threading.Event) -> None:
  while not stop.wait(POLL_SECONDS):
    try:
      failed = failed_peers(client, me)
    except Exception:  # noqa: BLE001 - the service is gone: jax's own error handling acts
      return
    if failed:
      logging.error("process %d failed (%s); process %d stops too", *failed[0], me)
      _leave(me, failed[0][1])


def watch() -> None:
  """Starts this process's watch for failed peers (nothing with one process). It stops at
  exit before jax's own shutdown (atexit runs the later registration first)."""
  client = _client()
  if client is None or jax.process_count() == 1:
    return
  stop = threading.Event()
  thread = threading.Thread(target=_poll, args=(client, jax.process_index(), stop),
                            name="peer_failure", daemon=True)
  thread.start()

  def end():
    stop.set()
    thread.join()
  atexit.register(end)


@contextlib.contextmanager
def stop_all_on_error():
  """With several processes: an exception in the block is logged with its traceback,
  published for the others' watch, and ends this process with status 1 (after 2 ×
  POLL_SECONDS, so that the others read it even when this process hosts the service); one
  that follows a peer's failure is logged in a line after it. With one process the
  exception propagates as ever."""
  try:
    yield
  except BaseException as e:
    client = _client()
    if client is None or isinstance(e, SystemExit) and not e.code:
      raise
    line = (str(e).strip().splitlines() or [""])[0]
    _stop_every_process(client, f"{type(e).__name__}: {line}", status=1,
                        log_own=logging.exception, after=f", after {type(e).__name__}: {line}")


def stop_every_process_hung(message: str) -> None:
  """Ends this process, from any thread, with HUNG_STATUS after publishing "Hung: message"
  for the other processes' watch, which end with the same status; with one process, at
  once."""
  client = _client()
  if client is None or jax.process_count() == 1:
    _exit(HUNG_STATUS)
  _stop_every_process(client, f"{HUNG}: {message}", status=HUNG_STATUS)


def _stop_every_process(client, line: str, *, status: int, log_own=None, after: str = ""):
  """Exits, as a peer's failure calls for where one came first (this one follows from it:
  its collectives broke off, say; logged with `after`), else after publishing `line` for the
  others, with `status`. log_own(message, me) logs this process's own failure."""
  me = jax.process_index()
  try:
    failed = failed_peers(client, me)
  except Exception:  # noqa: BLE001 - the service is gone with process 0: nobody to tell
    if log_own:
      log_own("process %d failed", me)
    _exit(status)
  if failed:
    logging.error("process %d failed (%s); process %d stops too%s", *failed[0], me, after)
    _leave(me, failed[0][1])
  if log_own:
    log_own("process %d failed; stopping every process", me)
  client.key_value_set(f"{KEY_DIR}/{me}", f"{socket.gethostname()}: {line}",
                       allow_overwrite=True)
  time.sleep(2 * POLL_SECONDS)  # the others read it, even when this process hosts the service
  _exit(status)
