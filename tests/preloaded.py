"""`python -m MODULE ARGS` for the tests, in processes that start with the heavy imports done.

Each run is a real process of its own: multiprocessing's fork server, started once per pytest
worker, imports TensorFlow, TFDS, JAX, Flax, Optax, Orbax and clu (about 6 s on a 2-core
machine, before any device or TensorFlow runtime exists) and forks a child per run. The child
takes the run's environment, working directory and argv, runs the module as `python -m` does
(`runpy`, as `__main__`), writes its own stdout and stderr, runs its exit handlers and exits
with the module's status. Its JAX backend, devices, compilation cache, TensorFlow runtime and
flags are created in the child from its own environment.

Variables that those libraries read when imported (JAX_*, TF_*, TFDS_*, the allocator's) are
the fork server's: a run whose environment sets them differently starts a fresh interpreter
instead, as does any run when SASA_TEST_FRESH_PROCESSES=1.
"""
import atexit
import gc
import multiprocessing
from multiprocessing import forkserver
import os
import runpy
import subprocess
import sys
import tempfile
import threading
import traceback

PRELOAD = ["tensorflow", "tensorflow_datasets", "jax", "jax.numpy", "flax.linen", "optax",
           "orbax.checkpoint", "clu.metric_writers", "clu.periodic_actions", "ml_collections",
           "etils.epath", "absl.app"]
# Read by the preloaded libraries at import (JAX's config, TensorFlow's logging, TFDS's
# data_dir) or by the dynamic loader: the fork server's values hold in every child.
_IMPORT_TIME = ("JAX_", "TF_", "TFDS_", "LD_PRELOAD", "MALLOC_CONF", "PYTHONHASHSEED")

_context = None
_server_env = None


def _server():
  global _context, _server_env
  if _context is None:
    _context = multiprocessing.get_context("forkserver")
    _context.set_forkserver_preload(PRELOAD)
    _server_env = dict(os.environ)
    forkserver.ensure_running()  # with this environment
  return _context


def _import_time_env(env):
  return {k: v for k, v in env.items() if k.startswith(_IMPORT_TIME)}


def _child(module, argv, env, cwd, out_path, err_path):
  """Runs in the forked process: `python -m module *argv` with env in cwd."""
  gc.freeze()  # the preloaded heap, out of the garbage collector's reach (tests/conftest.py)
  os.chdir(cwd)
  os.environ.clear()
  os.environ.update(env)
  for fd, path in ((1, out_path), (2, err_path)):
    target = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.dup2(target, fd)
    os.close(target)
  for stream in (sys.stdout, sys.stderr):
    stream.reconfigure(line_buffering=True)
  # As `python -m` starts: the working directory, then PYTHONPATH, then the rest.
  first = [cwd, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
  sys.path[:] = first + [p for p in sys.path if p not in first]
  sys.argv = [module, *argv]  # runpy replaces argv[0] with the module's file
  code = 0
  try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    if e.code is None or isinstance(e.code, int):
      code = e.code or 0
    else:  # sys.exit("message"), as the interpreter does
      print(e.code, file=sys.stderr)
      code = 1
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  # What interpreter exit does, in its order: wait for non-daemon threads, then exit handlers.
  threading._shutdown()  # pylint: disable=protected-access
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # pylint: disable=protected-access


def run_module(module, argv, *, env, cwd, timeout=600):
  """subprocess.run([python, -m, module, *argv], env=env, cwd=cwd, capture_output=True,
  text=True, timeout=timeout), the process forked with the imports done."""
  cmd = [sys.executable, "-m", module, *argv]
  context = _server()
  if (os.environ.get("SASA_TEST_FRESH_PROCESSES") == "1"
      or _import_time_env(env) != _import_time_env(_server_env)):
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)
  with tempfile.TemporaryDirectory() as tmp:
    out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
    for path in (out, err):
      open(path, "w").close()
    proc = context.Process(target=_child, args=(module, list(argv), dict(env), str(cwd), out, err))
    proc.start()
    proc.join(timeout)
    if proc.exitcode is None:
      proc.kill()
      proc.join()
      raise subprocess.TimeoutExpired(cmd, timeout)
    with open(out) as f_out, open(err) as f_err:
      return subprocess.CompletedProcess(cmd, proc.exitcode, f_out.read(), f_err.read())
