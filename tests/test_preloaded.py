"""tests/preloaded.py: a forked run behaves as `python -m` in a fresh interpreter does."""
import subprocess
import sys

from tests import helpers, preloaded

MODULE = '''
import atexit, os, sys, threading, time
def late():  # a non-daemon thread: interpreter exit waits for it
  time.sleep(0.5)
  print("thread done", flush=True)
threading.Thread(target=late).start()
atexit.register(lambda: print("exit handler", flush=True))
print(sys.argv[1:], os.getcwd(), os.environ["PROBE"], __name__, flush=True)
print("tensorflow" in sys.modules, file=sys.stderr)  # imported before the fork, or not
sys.exit(int(sys.argv[1]) if sys.argv[1].isdigit() else sys.argv[1])
'''


def test_forked_run_matches_a_fresh_interpreter(tmp_path, monkeypatch):
  monkeypatch.delenv("SASA_TEST_FRESH_PROCESSES", raising=False)  # this test is of the fork
  (tmp_path / "probe_module.py").write_text(MODULE)
  env = helpers.env(PROBE="seen")
  env["PYTHONPATH"] = f"{tmp_path}:{env['PYTHONPATH']}"
  for arg in ("0", "3", "a message"):
    fresh = subprocess.run([sys.executable, "-m", "probe_module", arg], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=120)
    forked = preloaded.run_module("probe_module", [arg], env=env, cwd=tmp_path)
    assert forked.returncode == fresh.returncode == (0 if arg == "0" else int(arg) if
                                                     arg.isdigit() else 1)
    assert forked.stdout == fresh.stdout
    assert forked.stdout.splitlines() == [f"['{arg}'] {tmp_path} seen __main__", "thread done",
                                          "exit handler"]
    assert forked.stderr.splitlines()[0] == "True" and fresh.stderr.splitlines()[0] == "False"
    assert forked.stderr.splitlines()[1:] == fresh.stderr.splitlines()[1:]
  # A run that changes what the preloaded libraries read at import gets a fresh interpreter.
  env["JAX_ENABLE_X64"] = "1"
  assert preloaded.run_module("probe_module", ["0"], env=env, cwd=tmp_path).stderr == "False\n"
