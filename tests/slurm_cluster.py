"""A real single-node SLURM cluster on this machine: munged, slurmctld and slurmd from
Debian's slurm-wlm and munge, one node (this host) with two fake GPUs.

slurm 22.05 drops a GPU whose device file is missing, so the GPUs are character devices
(/dev/fakegpu0, /dev/fakegpu1, copies of /dev/null) named by File= in gres.conf.
proctrack/linuxproc and task/none need no cgroups. Needs root (daemons as root, mknod).
Every daemon runs in the foreground as a child of the fixture and is stopped by its PID.
"""
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import time

from tests.helpers import free_port

GPUS = 2
DAEMONS = ("munged", "slurmctld", "slurmd")


def unavailable_reason() -> str | None:
  """Why this machine cannot run the cluster, or None."""
  if os.geteuid() != 0:
    return "needs root (slurm daemons and GPU device nodes)"
  missing = [d for d in (*DAEMONS, "sbatch", "srun", "scontrol", "mungekey")
             if shutil.which(d) is None]
  if missing:
    return (f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge "
            "(`make test` does this where apt works)")
  return None


@dataclasses.dataclass
class Cluster:
  root: str
  env: dict            # SLURM_CONF for clients
  pids: dict           # daemon name -> pid

  def run(self, *cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), env=dict(os.environ, **self.env), capture_output=True,
                          text=True, check=kwargs.pop("check", True), **kwargs)

  def job(self, job_id: str) -> dict:
    """scontrol's fields of a job ({} once it has left slurmctld's memory)."""
    out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)

  def wait_for(self, job_id: str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
               timeout=600) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
      info = self.job(job_id)
      if info.get("JobState") in states:
        return info
      time.sleep(1)
    raise TimeoutError(f"job {job_id} not in {states} after {timeout} s: {self.job(job_id)}")

  def stop(self):
    """Cancels every job (slurmstepd outlives slurmd otherwise), then stops the daemons."""
    jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
      self.run("scancel", "--full", *jobs, check=False)
      deadline = time.time() + 60
      while self.run("squeue", "-h", check=False).stdout.strip() and time.time() < deadline:
        time.sleep(0.5)
    for name in reversed(DAEMONS):
      pid = self.pids.get(name)
      if pid:
        try:
          os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
          pass
    for name in reversed(DAEMONS):
      pid = self.pids.get(name)
      deadline = time.time() + 15
      while pid and time.time() < deadline:
        try:
          os.kill(pid, 0)
          os.waitpid(pid, os.WNOHANG)
        except (ProcessLookupError, ChildProcessError):
          break
        time.sleep(0.1)


def _conf(root, host, cpus, memory_mb):
  munge_socket = os.path.join(root, "munge.socket")
  ctld_port = free_port()
  # jax's SLURM detection derives the coordinator port from the job id: clusters of
  # parallel test workers number their jobs apart.
  first_job = 1 + ctld_port % 3000
  # cred_expire also sets how long a requeued job waits before it may start again (SLURM's
  # default, 120 s, was most of the time-limit test); 15 s still covers a step's launch.
  # The scheduler's loops run every second or two (defaults: backfill 30 s, main 60 s),
  # so a job starts once it may rather than at the next pass.
  return f"""ClusterName=sasa
FirstJobId={first_job}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={munge_socket},cred_expire=15
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
KillWait=30
MinJobAge=600
SchedulerParameters=bf_interval=1,sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""", munge_socket


def start(root: str) -> Cluster:
  """Writes the configuration under `root` and starts the three daemons."""
  host = socket.gethostname()
  for d in ("state", "spool"):
    os.makedirs(os.path.join(root, d), exist_ok=True)
  devices = []
  for i in range(GPUS):
    path = f"/dev/fakegpu{i}"
    if not os.path.exists(path):
      subprocess.run(["mknod", path, "c", "1", "3"], check=True)
    devices.append(path)
  cpus = os.cpu_count() or 2
  memory_mb = 4096
  conf, munge_socket = _conf(root, host, cpus, memory_mb)
  with open(os.path.join(root, "slurm.conf"), "w") as f:
    f.write(conf)
  with open(os.path.join(root, "gres.conf"), "w") as f:
    f.write(f"NodeName={host} Name=gpu File=/dev/fakegpu[0-{GPUS - 1}]\n")
  key = os.path.join(root, "munge.key")
  subprocess.run(["mungekey", "-c", "-k", key, "-b", "1024"], check=True, capture_output=True)
  env = {"SLURM_CONF": os.path.join(root, "slurm.conf")}
  daemon_env = dict(os.environ, **env)
  logs = {name: open(os.path.join(root, f"{name}.out"), "w") for name in DAEMONS}  # noqa: SIM115
  commands = {
      "munged": ["munged", "--foreground", "--force", f"--socket={munge_socket}",
                 f"--key-file={key}", f"--pid-file={root}/munged.pid",
                 f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
      "slurmctld": ["slurmctld", "-D", "-i", "-f", env["SLURM_CONF"]],
      "slurmd": ["slurmd", "-D", "-f", env["SLURM_CONF"]],
  }
  cluster = Cluster(root, env, {})
  try:
    for name in DAEMONS:
      proc = subprocess.Popen(commands[name], stdout=logs[name], stderr=subprocess.STDOUT,
                              env=daemon_env, start_new_session=True)
      cluster.pids[name] = proc.pid
      if name == "munged":
        _wait(lambda: os.path.exists(munge_socket), proc, root, name)
    _wait(lambda: "State=IDLE" in cluster.run("scontrol", "show", "node", host,
                                              check=False).stdout, proc, root, "slurmd")
  except Exception:
    cluster.stop()
    raise
  return cluster


def _wait(ready, proc, root, name, timeout=60):
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None or time.time() > deadline:
      with open(os.path.join(root, f"{name}.out")) as f:
        raise RuntimeError(f"{name} did not start: {f.read()[-2000:]}")
    time.sleep(0.2)
