"""A stand-in for `gcloud compute tpus tpu-vm` that runs a slice's workers on this machine.

Every call is appended to $FAKE_GCLOUD_ROOT/calls.jsonl. A slice is a directory
$FAKE_GCLOUD_ROOT/NAME with one home directory per worker ($FAKE_GCLOUD_WORKERS of them);
`scp` copies into those homes, `ssh --command=C` runs C with bash in each (HOME set, all
workers at once for --worker=all), with what the TPU metadata server would tell jax on a
real slice given as SASA_COORDINATOR_ADDRESS / SASA_NUM_PROCESSES / SASA_PROCESS_ID.
"""
import json
import os
import shutil
import socket
import subprocess
import sys


def _option(args, name, default=None):
  for a in args:
    if a.startswith(f"--{name}="):
      return a.split("=", 1)[1]
  return default


def _workers(root, name, which):
  count = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
  homes = [os.path.join(root, name, f"worker_{i}") for i in range(count)]
  if not os.path.isdir(homes[0]):
    sys.exit(f"ERROR: (gcloud.compute.tpus.tpu-vm) NOT_FOUND: TPU {name} does not exist")
  return list(enumerate(homes)) if which == "all" else [(int(which), homes[int(which)])]


def _port(root, name):
  path = os.path.join(root, name, "coordinator_port")
  if not os.path.exists(path):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    with open(path, "w") as f:
      f.write(str(port))
  with open(path) as f:
    return f.read()


def main(argv):
  root = os.environ["FAKE_GCLOUD_ROOT"]
  with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\n")
  if argv[:3] != ["compute", "tpus", "tpu-vm"] or len(argv) < 5:
    sys.exit(f"fake gcloud: unsupported call {argv}")
  verb, name, rest = argv[3], argv[4], argv[5:]
  if verb == "create":
    for i in range(int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))):
      os.makedirs(os.path.join(root, name, f"worker_{i}"), exist_ok=True)
    return 0
  if verb == "scp":  # scp SRC NAME:DEST --worker=...
    src, target = argv[4], argv[5]
    name, dest = target.split(":", 1)
    for _, home in _workers(root, name, _option(argv, "worker", "0")):
      shutil.copy(src, os.path.join(home, dest))
    return 0
  if verb == "ssh":
    command = _option(rest, "command")
    workers = _workers(root, name, _option(rest, "worker", "0"))
    procs = []
    for i, home in workers:
      env = dict(os.environ, HOME=home, SASA_COORDINATOR_ADDRESS=f"127.0.0.1:{_port(root, name)}",
                 SASA_NUM_PROCESSES=str(len(_workers(root, name, "all"))),
                 SASA_PROCESS_ID=str(i))
      # A login on a TPU VM does not carry the caller's PYTHONDONTWRITEBYTECODE: its Python
      # writes bytecode, so a worker's second start imports its venv from .pyc files.
      env.pop("PYTHONDONTWRITEBYTECODE", None)
      procs.append(subprocess.Popen(["bash", "-c", command], cwd=home, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    status = 0
    for (i, _), proc in zip(workers, procs):
      out, _ = proc.communicate()
      for line in out.splitlines():
        print(f"[worker {i}] {line}")
      status = status or proc.returncode
    return status
  if verb == "describe":
    print(len(_workers(root, name, "all")))
    return 0
  sys.exit(f"fake gcloud: unsupported verb {verb}")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
