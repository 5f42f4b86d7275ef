"""Will a config's training step fit on a device? XLA's memory plan of the loop's own step.

  python -m sasa_jax.tools.step_memory --config=configs/imagenet.py:depth=50 --devices=64
  python -m sasa_jax.tools.step_memory --config=configs/fashion_mnist.py --microbatches=1,2,4
  python -m sasa_jax.tools.step_memory --config=configs/imagenet.py:depth=50 --devices=32 \
      --tpu=v5e      # compiled for a TPU v5e chip by libtpu, on any machine (make tpu-compiler)
  python -m sasa_jax.tools.step_memory --config=configs/imagenet.py:depth=50 --devices=64 \
      --gpu=h100     # compiled for an H100 by jax's CUDA plugin, no GPU (make gpu-compiler)

Compiles `train.train_step` (the config's model, optimizer, EMA and task) for one local
device at the batch each of --devices devices holds (config.batch_size / devices: the loop
is data parallel with replicated state), once per --microbatches value, and prints per
device: the batch and microbatch, the state (parameters, BatchNorm statistics, optimizer
state, EMA), XLA's planned temporaries and their total, against the device's memory where the
backend reports it; and the gradient bytes each step all-reduces over the devices. BatchNorm
groups across devices (config.batch_norm_group_size a multiple of the microbatch per device)
are planned as statistics over each device's own images, the same work per device. Memory
plans differ between backends (and the attention op's implementation with them): run it on
a machine of the kind the run will use, or with --tpu=GEN, which compiles for one device of
a TPU generation with libtpu's XLA:TPU compiler (tools/tpu_compile), `impl="auto"` resolved
as on that TPU, against the chip's HBM (a step that cannot fit fails to compile there, and
its row says so; the row adds the step's device time as libtpu's cost model estimates it,
`aot.estimated_cycles`), or with --gpu=h100|h200|a100, which compiles for one such GPU
with XLA:GPU from jax's CUDA plugin (tools/gpu_compile), against the memory jax's allocator
takes of it (75% unless XLA_PYTHON_CLIENT_MEM_FRACTION, read here, says otherwise). No data
is read; nothing runs.
"""
import copy
import json

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sasa_jax import data as data_lib
from sasa_jax import cli, optim, tasks, train
from sasa_jax.tools import aot, gpu_compile, tpu_compile
from sasa_jax.tools.bench import memory_plan, tree_bytes

MIB = 2**20
COMPILERS = {"tpu": tpu_compile, "gpu": gpu_compile}  # --tpu, --gpu: a device not here


def device_bytes() -> int | None:
  """The memory of this machine's first device, where its backend reports it (GPU, TPU)."""
  return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")


def plan_rows(config, devices: int, microbatches, limit: int | None = None,
              device=None) -> list[dict]:
  """One row per value of `microbatches` (see the module docstring), sizes in MiB, each
  total against `limit` bytes where given. device: the device to compile for (default this
  machine's first; a TPU or GPU from tools/tpu_compile or tools/gpu_compile). `config` is
  left as it is."""
  config = copy.deepcopy(config)
  device = device or jax.local_devices()[0]
  if config.batch_size % devices:
    raise ValueError(f"config.batch_size={config.batch_size} must be a multiple of "
                     f"--devices={devices}")
  per_device = config.batch_size // devices
  train.validate_config(config, devices)  # names a bad field before anything compiles
  task = tasks.get(config)
  model = task.create_model(device.platform)  # impl="auto" as on that device
  size = config.dataset.image_size
  image_shape = (size, size, len(data_lib.DATASETS[config.dataset.name].mean))
  schedule = optim.create_schedule(config.schedule, steps_per_epoch=1000, num_steps=10_000)
  tx = optim.create_optimizer(config.optimizer, schedule)
  mesh = Mesh(np.asarray([device]), ("data",))
  _, state, state_sharding = train.initial_state(config, model, tx, mesh, image_shape)
  batch = task.train_batch_spec(per_device, image_shape)
  state_bytes, grad_bytes = tree_bytes(state), tree_bytes(state.params)
  rows, group = [], config.batch_norm_group_size
  for num in microbatches:
    row = {"num_microbatches": num, "batch_per_device": per_device}
    if per_device % num:
      rows.append({**row, "skipped": f"{per_device} images per device do not split into {num}"})
      continue
    micro = per_device // num
    if group and not train.batch_norm_groups_fit(group, micro, devices):
      rows.append({**row, "skipped": f"BatchNorm groups of {group} neither split a device's "
                                     f"microbatch of {micro} nor span whole devices of the "
                                     f"{devices}"})
      continue
    row["microbatch_per_device"] = micro
    with config.unlocked():
      config.num_microbatches = num
      # Groups across devices: per device, the same work as statistics over its own images
      # (the all-reduce of each layer's statistics is a few floats per channel).
      config.batch_norm_group_size = 0 if group > micro else group
    step = train.jit_train_step(config, task, model, tx, schedule, state_sharding,
                                NamedSharding(mesh, P("data")))
    try:
      with jax.set_mesh(mesh):
        exe = step.lower(state, batch).compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU's verdict on memory, among others
      rows.append({**row, "microbatch_per_device": micro,
                   "skipped": f"does not compile: {aot.first_line(str(e))}"})
      continue
    plan, estimate = memory_plan(exe), aot.estimated_cycles(exe)
    if estimate:  # XLA:TPU's cost model (--tpu): the step's device time, estimated
      row.update(est_mcycles=estimate["cycles"] / 1e6,
                 unestimated_kernels=estimate["unestimated_kernels"])
    row.update(state_mib=state_bytes / MIB, temp_mib=plan["temp"] / MIB,
               total_mib=plan["footprint"] / MIB, allreduce_mib=grad_bytes / MIB)
    if limit:
      row.update(device_mib=limit / MIB, fits=plan["footprint"] <= limit)
    rows.append(row)
  return rows


def format_rows(rows) -> str:
  estimates = any("est_mcycles" in r for r in rows)
  lines = ["num_microbatches  batch/device  microbatch/device  state MiB  temp MiB  "
           "total MiB  device MiB  fits" + ("  est. Mcycles" if estimates else "")]
  planned = [r for r in rows if "allreduce_mib" in r]
  if planned:
    lines.insert(0, f"each step all-reduces {planned[0]['allreduce_mib']:.1f} MiB of gradients "
                    "over the devices")
  for r in rows:
    if "skipped" in r:
      lines.append(f"{r['num_microbatches']:>16}  {r['batch_per_device']:>12}  "
                   f"skipped: {r['skipped']}")
      continue
    lines.append(f"{r['num_microbatches']:>16}  {r['batch_per_device']:>12}  "
                 f"{r['microbatch_per_device']:>17}  {r['state_mib']:>9.1f}  "
                 f"{r['temp_mib']:>8.1f}  {r['total_mib']:>9.1f}  "
                 + (f"{r['device_mib']:>10.0f}  {'yes' if r['fits'] else 'no'}"
                    if "device_mib" in r else f"{'-':>10}  (not reported by the backend)")
                 + (f"  {r['est_mcycles']:>12.1f}" + "+" * bool(r["unestimated_kernels"])
                    if "est_mcycles" in r else ""))
  if estimates:
    lines.append("est. Mcycles: the step's device time as libtpu's cost model estimates it "
                 "(TensorCore cycles)" + (", +: its Pallas kernels not counted" if any(
                     r.get("unestimated_kernels") for r in rows) else ""))
  return "\n".join(lines)


FLAGS = flags.FLAGS


def planned_device(flag_values) -> tuple[str, str] | None:
  """(kind, name) of the device that --tpu or --gpu names (COMPILERS' kinds; step_memory's
  and tools/preflight's flags), None where neither does; ValueError where both do."""
  targets = [(kind, getattr(flag_values, kind)) for kind in COMPILERS
             if getattr(flag_values, kind)]
  if len(targets) > 1:
    raise ValueError("--tpu and --gpu: one device to plan for, not both")
  return targets[0] if targets else None


def define_flags():  # as a program only: tools/preflight imports this module beside its own
  flags.DEFINE_integer("devices", None, "Devices the run will use (default: this machine's).")
  flags.DEFINE_list("microbatches", ["1", "2", "4", "8"],
                    "Values of config.num_microbatches to plan, comma-separated.")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
  flags.DEFINE_enum("tpu", None, list(tpu_compile.TARGETS),
                    "Plan for one chip of this TPU generation (libtpu's compiler; "
                    "`make tpu-compiler`) instead of this machine's device.")
  flags.DEFINE_enum("gpu", None, list(gpu_compile.TARGETS),
                    "Plan for one GPU of this kind (jax's CUDA plugin; `make gpu-compiler`) "
                    "instead of this machine's device.")
  # --config=FILE[:ARGS] and --config.FIELD=VALUE, parsed as sasa_jax.main parses them.
  cli.define_config(lock_config=False)
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  try:
    microbatches = [int(m) for m in FLAGS.microbatches]
  except ValueError:
    microbatches = []
  if not microbatches or min(microbatches) < 1:
    raise app.UsageError(f"--microbatches={','.join(FLAGS.microbatches)}: positive integers, "
                         "comma-separated", exitcode=2)
  try:
    target = planned_device(FLAGS)
  except ValueError as e:
    raise app.UsageError(str(e), exitcode=2) from e
  if target:
    kind, name = target
    try:
      device = COMPILERS[kind].device(name)
    except RuntimeError as e:  # its compiler is not installed
      raise app.UsageError(f"--{kind}={name}: {e}", exitcode=2) from e
    limit = COMPILERS[kind].memory_bytes(name)
  else:
    device, limit = None, device_bytes()
  try:
    rows = plan_rows(FLAGS.config, FLAGS.devices or jax.device_count(), microbatches, limit,
                     device)
  except ValueError as e:  # a bad config or device count: the message names the field
    raise app.UsageError(str(e), exitcode=2) from e
  print(json.dumps(rows, indent=1) if FLAGS.format == "json" else format_rows(rows))


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags)
