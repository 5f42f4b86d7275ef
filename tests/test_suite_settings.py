"""The suite's own settings (pytest.ini): a hanging test fails, named, with every thread's stack."""
import os
import subprocess
import sys
import time

from tests import helpers


def test_a_hanging_test_fails_named_with_its_stack(tmp_path):
  """pytest.ini's faulthandler settings under pytest-xdist as `make test` runs it, with the
  timeout shortened to 3 s: the worker writes the hanging test's stack and stops, and the
  run fails naming the test in seconds, not after the test's 10 minutes."""
  (tmp_path / "test_probe.py").write_text(
      "import time\n\n\ndef test_waits_forever():\n  time.sleep(600)\n")
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "no:cacheprovider",
       "-c", os.path.join(helpers.ROOT, "pytest.ini"), "--rootdir", str(tmp_path),
       "-o", "faulthandler_timeout=3", str(tmp_path / "test_probe.py")],
      cwd=tmp_path, capture_output=True, text=True, timeout=300)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 1, out
  assert time.monotonic() - start < 120, out
  assert 'test_probe.py", line 5 in test_waits_forever' in out, out
  assert "crashed while running 'test_probe.py::test_waits_forever'" in out, out
