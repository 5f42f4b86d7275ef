"""make gpu-check's script in its CPU smoke mode, with the libraries an accelerator image
lacks (TensorFlow, TFDS, clu, ml_collections) made unimportable."""
import json
import subprocess
import sys

from tests import helpers

BLOCK = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets', 'clu', 'ml_collections'):
      raise ImportError(f'{name} is not on the accelerator image')
sys.meta_path.insert(0, Block())
from sasa_jax.tools import gpu_check
sys.exit(gpu_check.main(sys.argv[1:]))
"""


def test_cpu_smoke_writes_results(tmp_path):
  proc = subprocess.run([sys.executable, "-c", BLOCK, "--cpu-smoke", f"--out={tmp_path}"],
                        cwd=helpers.ROOT, env=helpers.env(), capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((tmp_path / "results.json").read_text())
  kinds = [r["kind"] for r in report["rows"]]
  assert kinds.count("correctness") == 4 and all(
      r["ok"] for r in report["rows"] if r["kind"] == "correctness")
  assert kinds.count("op") == 4 and kinds.count("train_step") == 2 and "torch" in kinds
  ops = [r for r in report["rows"] if r["kind"] == "op"]
  assert all(r["pallas_ms"] > 0 and r["xla_ms"] > 0 and r["conv_ms"] > 0 for r in ops)
  markdown = (tmp_path / "results.md").read_text()
  assert "## correctness" in markdown and "## train_step" in markdown
