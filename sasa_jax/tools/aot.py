"""Compiling for a device this machine does not have: what tools/tpu_compile and
tools/gpu_compile share.

A compiler that describes a device without one (libtpu for TPUs, jax's CUDA plugin for
NVIDIA GPUs: `jax.experimental.topologies`) gives JAX devices that compile but never run.
Here: placing abstract arguments on such a device, compiling for it, and the attention op's
table (its forward and backward at the four ResNet-50 stage shapes: compiled or the
compiler's first error line, the planned temporaries, the Pallas kernels in the program).
"""
import contextlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # ResNet-50 at 224 px: size, channels
MIB = 2**20
# How a compiled program calls a Pallas kernel: Mosaic on TPU, Triton on GPU.
KERNEL_CALLS = ('custom_call_target="tpu_custom_call"',
                'custom_call_target="__gpu$xla.gpu.triton"')


def placed(device, *shapes):
  """jax.ShapeDtypeStructs `shapes` placed on `device` (what jit lowers for it)."""
  sharding = NamedSharding(Mesh(np.asarray([device]), ("data",)), P())
  return [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]


def compile_for(device, fn, *shapes):
  """(compiled, None) or (None, the compiler's error): `fn` jitted and compiled for `device`
  at jax.ShapeDtypeStruct `shapes`."""
  try:
    return jax.jit(fn).lower(*placed(device, *shapes)).compile(), None
  except Exception as e:  # pylint: disable=broad-except  # the compiler's errors, reported
    return None, f"{type(e).__name__}: {e}"


def first_line(error: str) -> str:
  """The compiler's error up to its details ("Ran out of memory in memory space vmem ...")."""
  lines = [line for line in error.splitlines() if line.strip()]
  return " ".join(lines[:2])[:400]


def kernel_calls(compiled) -> int:
  """Pallas kernel launches (Mosaic or Triton) in a compiled program."""
  text = compiled.as_text()
  return sum(text.count(call) for call in KERNEL_CALLS)


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
  """({computation name: its instruction lines}, the entry's name) of an HLO module's text."""
  bodies, name, entry = {}, None, None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):
      header = re.match(r"(ENTRY )?%?([^\s(]+)", line)
      name = header.group(2)
      bodies[name] = []
      entry = name if header.group(1) else entry
    elif name is not None and line.startswith("  "):
      bodies[name].append(line)
  return bodies, entry


def _trip_count(condition: list[str]) -> int | None:
  """A while loop's iterations from its condition, `counter < constant` (a counter from 0,
  as jax's fori_loop lowers), or None for any other condition."""
  constants = dict(re.findall(r"%(\S+) = s32\[\]\S* constant\((\d+)\)", "\n".join(condition)))
  for line in condition:
    compare = re.search(r"ROOT .*compare\(%\S+, %([^\s,)]+)\), direction=LT", line)
    if compare and compare.group(1) in constants:
      return int(constants[compare.group(1)])
  return None


def estimated_cycles(compiled) -> dict | None:
  """XLA:TPU's own estimate of a compiled program's run time, from libtpu's cost model (the
  `estimated_cycles` its scheduler writes on each instruction of the optimized program),
  summed over the program with while loops' bodies counted once per iteration:
  {"cycles": TensorCore cycles, "unestimated_kernels": Pallas kernel calls, which carry no
  estimate and are not counted, "unknown_loops": loops whose trip count could not be read,
  counted once}. None for a compiler that writes no estimates (XLA:GPU, XLA:CPU).
  An estimate, not a measurement: it sees every array's tiled layout (padding included),
  not contention or overlap between operations. Conditionals' branches and called
  computations are not walked (the op and the loop's step compile to none)."""
  hlo = compiled.as_text()
  if '"estimated_cycles":' not in hlo:
    return None
  bodies, entry = _computations(hlo)
  found = {"cycles": 0, "unestimated_kernels": 0, "unknown_loops": 0}

  def add(name, times):
    for line in bodies.get(name, []):
      loop = re.search(r" while\(.*condition=%([^\s,]+), body=%([^\s,]+)", line)
      if loop:
        trips = _trip_count(bodies.get(loop.group(1), []))
        found["unknown_loops"] += trips is None
        add(loop.group(2), times * (1 if trips is None else trips))
        continue
      cycles = re.search(r'"estimated_cycles":"(\d+)"', line)
      if cycles:
        found["cycles"] += times * int(cycles.group(1))
      elif any(call in line for call in KERNEL_CALLS):
        found["unestimated_kernels"] += times
  add(entry, 1)
  return found


CONV = "conv3x3"  # op_rows' baseline: a 3x3 convolution of the same width, what SASA replaces


def _loss_and_args(impl: str, maps, dtype, kernel_size: int, num_heads: int):
  """(loss, its jax.ShapeDtypeStruct arguments): the op's (q, k, v, rel_h, rel_w) with
  `impl`, or CONV's (input, HWIO filter), on [B, H, W, C] `maps` (`bench.op_losses`)."""
  from sasa_jax.tools.bench import op_losses  # noqa: PLC0415
  x = jax.ShapeDtypeStruct(maps, dtype)
  channels = maps[-1]
  attn_loss, conv_loss = op_losses(kernel_size, num_heads, impl)  # one of them is used
  if impl == CONV:
    return conv_loss, (x, jax.ShapeDtypeStruct((3, 3, channels, channels), dtype))
  rel = jax.ShapeDtypeStruct((kernel_size, channels // num_heads // 2), dtype)
  return attn_loss, (x, x, x, rel, rel)


@contextlib.contextmanager
def _kv_cost(platform: str, value: float | None):
  """blocked.ACCELERATOR_KV_COST[platform] = value within (None: as it is)."""
  from sasa_jax.ops import blocked  # noqa: PLC0415
  saved = dict(blocked.ACCELERATOR_KV_COST)
  if value is not None:
    blocked.ACCELERATOR_KV_COST[platform] = value
  try:
    yield
  finally:
    blocked.ACCELERATOR_KV_COST.clear()
    blocked.ACCELERATOR_KV_COST.update(saved)


def op_rows(device, target: str, impls, dtypes, batch: int = 32, stages=STAGES,
            kernel_size: int = 7, num_heads: int = 8, kv_costs=()) -> list[dict]:
  """One row per (stage, dtype, impl): the op's fwd+bwd compiled for `device` (named
  `target` in the rows): compiled or the compiler's first error line, XLA's planned
  temporaries (MiB), the Pallas kernels the program launches and, where the compiler
  estimates run time (XLA:TPU), `estimated_cycles`' fields. impls: the op's, or CONV for a
  3x3 convolution of the same width (fwd+bwd: input and filter gradients). The blocked XLA
  form's rows ("auto" where the device runs it, "xla") name their block plan and chunks;
  kv_costs: for each value, one more "auto" row planned with it as the device's
  `blocked.ACCELERATOR_KV_COST` (its `kv_cost` field)."""
  from sasa_jax.ops import blocked, default_impl  # noqa: PLC0415
  platform = blocked.lowering_platform(device.platform)
  rows = []
  for size, channels in stages:
    maps = (batch, size, size, channels)
    for dtype in dtypes:
      for impl, kv_cost in [(impl, None) for impl in impls] + [("auto", c) for c in kv_costs]:
        loss, args = _loss_and_args(impl, maps, dtype, kernel_size, num_heads)
        row = {"target": target, "device": device.device_kind,
               "shape": "x".join(map(str, maps)), "dtype": jnp.dtype(dtype).name,
               "impl": impl, "kernel_size": kernel_size,
               **({} if kv_cost is None else {"kv_cost": kv_cost})}
        with _kv_cost(platform, kv_cost):
          if impl == "xla" or impl == "auto" and default_impl(
              platform, maps, kernel_size=kernel_size, num_heads=num_heads) == "xla":
            row["blocks"] = _block_plan(maps, kernel_size, num_heads,
                                        jax.default_backend() if impl == "xla" else platform)
          start = time.perf_counter()
          exe, error = compile_for(device, jax.grad(loss, argnums=range(len(args))), *args)
        row.update(compiled=exe is not None, compile_s=round(time.perf_counter() - start, 2))
        if exe is not None:
          row["temp_mib"] = exe.memory_analysis().temp_size_in_bytes / MIB
          row["kernels"] = kernel_calls(exe)
          row.update(estimated_cycles(exe) or {})
        else:
          row["error"] = first_line(error)
        rows.append(row)
  return rows


def _block_plan(maps, kernel_size: int, num_heads: int, platform: str) -> str:
  """How the blocked XLA form cuts `maps` on `platform`: "BHxBW" blocks, then "1 chunk" or
  "N chunks (I images x R rows)", the sequential chunks."""
  from sasa_jax.ops import blocked  # noqa: PLC0415
  ph, pw, chunks = blocked.platform_layout(maps, kernel_size, num_heads, platform)
  if chunks.count == 1:
    return f"{ph.block}x{pw.block}, 1 chunk"
  return (f"{ph.block}x{pw.block}, {chunks.count} chunks ({chunks.images} images x "
          f"{chunks.height} rows)")


def format_rows(rows) -> str:
  """op_rows as a table; the estimate's columns where any row has one (in millions of
  cycles, and as a multiple of the 3x3 convolution's at the same shape and dtype)."""
  estimates = any("cycles" in r for r in rows)
  conv = {(r["target"], r["shape"], r["dtype"]): r["cycles"] for r in rows
          if r["impl"] == CONV and "cycles" in r}
  lines = ["target shape            dtype     impl          compiled  temp MiB  kernels"
           + ("  est. Mcycles  / conv" if estimates else "") + "  blocks"]
  for r in rows:
    impl = r["impl"] + (f" kv={r['kv_cost']:g}" if "kv_cost" in r else "")
    if r["compiled"]:
      tail = f"{'yes':>8}  {r['temp_mib']:>8.1f}  {r['kernels']:>7}"
      if estimates:
        base = conv.get((r["target"], r["shape"], r["dtype"]))
        part = "+" if r.get("unestimated_kernels") else " "  # Pallas kernels not counted
        tail += (f"  {r['cycles'] / 1e6:>11.2f}{part}  "
                 + (f"{r['cycles'] / base:>5.1f}" if base else f"{'':>5}"))
      tail += f"  {r.get('blocks', '')}"
    else:
      tail = f"{'no':>8}  {r['error']}"
    lines.append(f"{r['target']:<6} {r['shape']:<16} {r['dtype']:<9} {impl:<13} {tail}")
  if any(r.get("unestimated_kernels") for r in rows):
    lines.append("+: the program's Pallas kernels carry no estimate and are not counted")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def table_program(targets, target_flag: str, target_help: str, device_for):
  """tools/tpu_compile's and tools/gpu_compile's program: the op table (`table_main`) on this
  machine's CPU, with its flags (defined here, as a program only: step_memory imports those
  modules beside its own flags): --TARGET_FLAG (a list of `targets`, `target_help` says
  what), --impls, --dtypes, --batch, --stages, --format."""
  jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
  flags.DEFINE_list(target_flag, list(targets), f"{target_help}, of {list(targets)}.")
  flags.DEFINE_list("impls", ["auto", "pallas", CONV],
                    "The op's implementations to compile (\"auto\": what that device runs; "
                    "\"xla\" sizes its blocks and chunks for the host that traces it), and "
                    f"{CONV}: a 3x3 convolution of the same width, the baseline.")
  flags.DEFINE_list("kv_costs", [],
                    "For each value, one more impl=\"auto\" row with the blocked form "
                    "planned with it as the device's blocked.ACCELERATOR_KV_COST.")
  flags.DEFINE_list("dtypes", ["bfloat16", "float32"], "Dtypes of the op's inputs.")
  flags.DEFINE_integer("batch", 32, "Images per device.")
  flags.DEFINE_list("stages", [f"{s}x{c}" for s, c in STAGES],
                    "Shapes SIZExCHANNELS of the op's square maps (8 heads).")
  flags.DEFINE_integer("kernel_size", 7, "The op's window size k (odd; Table 4's 3-11).")
  flags.DEFINE_enum("format", "text", ["text", "json"], "Output format.")
  app.run(lambda argv: table_main(argv, targets, target_flag, device_for))


def table_main(argv, targets, target_flag: str, device_for):
  """The op table over the --TARGET_FLAG devices, each from `device_for(name)` (which raises
  RuntimeError when its compiler is not installed), printed as --format says."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=2)
  names = getattr(FLAGS, target_flag)
  for name in names:
    if name not in targets:
      raise app.UsageError(f"--{target_flag}={name}: not one of {sorted(targets)}",
                           exitcode=2)
  try:
    stages = [tuple(int(n) for n in s.split("x")) for s in FLAGS.stages]
  except ValueError:
    stages = []
  if not stages or any(len(s) != 2 for s in stages):
    raise app.UsageError(f"--stages={','.join(FLAGS.stages)}: SIZExCHANNELS, comma-separated",
                         exitcode=2)
  if FLAGS.kernel_size < 1 or FLAGS.kernel_size % 2 == 0:
    raise app.UsageError(f"--kernel_size={FLAGS.kernel_size}: a positive odd window size",
                         exitcode=2)
  rows = []
  for name in names:
    try:
      device = device_for(name)
    except RuntimeError as e:  # the compiler is not installed
      raise app.UsageError(str(e), exitcode=2) from e
    rows += op_rows(device, name, FLAGS.impls, [jnp.dtype(d) for d in FLAGS.dtypes],
                    FLAGS.batch, stages, kernel_size=FLAGS.kernel_size,
                    kv_costs=[float(c) for c in FLAGS.kv_costs])
  print(json.dumps(rows, indent=1) if FLAGS.format == "json" else format_rows(rows))
