"""The loop's training step compiled for the devices of a TPU slice or GPU cluster that this
machine only describes (libtpu, jax's CUDA plugin): which devices each all-reduce joins.

  python tests/mesh_step.py tpu v5e 2x4 CONFIG_ARG         # a v5e slice of 2x4 chips
  python tests/mesh_step.py gpu h100 2x8 CONFIG_ARG        # 2 hosts of 8 GPUs

Prints one JSON object: "devices" {id: [host, *coords]} and, per "GROUP/MICROBATCHES" (config
batch_norm_group_size and num_microbatches; 8 images per device): 16/1 (BatchNorm over pairs of
devices) and 4/2 (2 microbatches, BatchNorm within each device's), the all-reduces' replica
groups as XLA prints them.
"""
import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sasa_jax import optim, tasks, train
from sasa_jax.tools import gpu_compile, tpu_compile
from sasa_jax.tools.tables import load_config


def described_devices(kind: str, name: str, topology: str) -> list:
  if kind == "tpu":
    return tpu_compile.slice_devices(name, topology)
  hosts, per_host = (int(n) for n in topology.split("x"))
  return gpu_compile.cluster(name, hosts, per_host)


def main(kind: str, name: str, topology: str, config_arg: str):
  devices = described_devices(kind, name, topology)
  mesh = Mesh(np.asarray(devices), ("data",))  # the loop's mesh, over jax's device order
  config = load_config(config_arg)
  config.batch_size = 8 * len(devices)
  out = {"devices": {d.id: [d.process_index, *getattr(d, "coords", ())] for d in devices}}
  for group, micro in [(16, 1), (4, 2)]:
    config.batch_norm_group_size, config.num_microbatches = group, micro
    task = tasks.get(config)
    model = task.create_model(devices[0].platform)
    schedule = optim.create_schedule(config.schedule, 10, 100)
    tx = optim.create_optimizer(config.optimizer, schedule)
    _, state, shardings = train.initial_state(config, model, tx, mesh, (28, 28, 1))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         state, shardings)
    data = NamedSharding(mesh, P("data"))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=data),
                         task.train_batch_spec(config.batch_size, (28, 28, 1)))
    step = train.jit_train_step(config, task, model, tx, schedule, shardings, data)
    with jax.set_mesh(mesh):
      hlo = step.lower(state, batch).compile().as_text()
    out[f"{group}/{micro}"] = sorted({
        line.split("replica_groups=")[1].split(", ")[0].split(" ")[0]
        for line in hlo.splitlines() if "all-reduce" in line and "replica_groups=" in line})
  print(json.dumps(out))


if __name__ == "__main__":
  jax.config.update("jax_platforms", "cpu")
  main(*sys.argv[1:])
