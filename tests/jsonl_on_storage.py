"""`python -m tests.jsonl_on_storage URL`: metrics.jsonl's rows as a reader of URL (a gs://
object) sees them while a JsonlWriter writes, printed as one JSON object, for a test whose
process has no emulator settings in its environment."""
import json
import sys

from etils import epath

from sasa_jax.metric_writers import JsonlWriter


def _rows(path):
  return len(path.read_text().splitlines()) if path.exists() else 0


if __name__ == "__main__":
  path, seen = epath.Path(sys.argv[1]), {}
  writer = JsonlWriter(path, upload_every_secs=3600)
  writer.write_scalars(1, {"train/loss": 2.5})
  writer.write_scalars(2, {"train/loss": 2.0})
  seen["before_upload"] = _rows(path)
  writer.flush()
  seen["after_flush"] = _rows(path)
  writer.close()
  writer = JsonlWriter(path, upload_every_secs=0)  # appends to what is there
  writer.write_scalars(3, {"train/loss": 1.5})
  seen["due_at_once"] = _rows(path)
  writer.close()
  seen["steps"] = [json.loads(line)["step"] for line in path.read_text().splitlines()]
  print(json.dumps(seen))
