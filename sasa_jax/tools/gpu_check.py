"""The prepared accelerator check: is impl="pallas" right and fast on this GPU?

On a TPU VM the same check tests and times the Mosaic kernels (impl="pallas" there) and
leaves out what only the Triton kernels have (their other launches, tune) and PyTorch.

  make gpu-check                      # GPU_CHECK_OUT=dir (default runs/gpu_check)
  PYTHONPATH=. python -m sasa_jax.tools.gpu_check --out DIR [--cpu-smoke] [--tune]

Needs jax, flax, optax and numpy only (no TensorFlow, TFDS, clu or ml_collections), so it
runs from a checkout on a bare accelerator image. In order, printing a JSON row as each
result comes:
0. env: versions, the device, and what impl="auto" picks on it;
1. export: one jitted layer training step exported for ["tpu"], ["cuda"] and both at once;
2. correctness: impl="pallas" (compiled kernels; interpret mode only on the CPU) against
   impl="reference", the output and all five gradients, float32 and bfloat16, at the four
   ResNet-50 stage shapes and at odd shapes (window larger than the map, non-square, 1 head),
   the GPU kernels' other form at the odd shapes in float32, and impl="xla" (the blocked
   form, impl="auto"'s on accelerators) and impl="shifted" (its contender) at every shape
   in both dtypes;
3. op: the op's fwd+bwd time (and its forward's alone) and compiled temporary memory, pallas
   vs xla vs shifted vs a 3x3 conv of the same width (batch 32), bfloat16 and float32, and
   the GPU kernels in the launches impl="pallas" does not run: the other form
   (pallas_attention.FORMS: offset tables read, or offsets computed in the kernel and
   factored by axis) and, for float32, the other matmuls (F32_DOTS: exact, or three
   bfloat16 tensor-core products); and, from profiles: how impl="pallas"'s time splits
   between the three Triton kernels (fwd, dq, dkv) and the XLA operations around them, and
   the XLA operations impl="xla" and impl="shifted" spend most time in;
4. torch: where PyTorch is installed, the same op shapes as an exact SASA by unfold and
   timm's HaloAttn (block 8, halo 3), fwd+bwd;
5. blocks: impl="xla", the blocked form impl="auto" runs on accelerators, in the block
   plans of other blocked.KV_COST values and with fewer sequential chunks, fwd+bwd time at
   the stage shapes in bfloat16: which KV_COST this platform should plan with;
6. train_step: ResNet-50 training steps (batch 128, bfloat16, 224 px, random data):
   baseline, conv-stem + attention and full attention with impl xla and pallas, and
   conv-stem + attention with impl shifted: images/s, XLA's planned device memory and,
   profiled, the step's time by part of the model;
7. tune (with --tune): the Triton kernels' candidate tilings, launch settings (warps,
   pipeline stages) and forms at the stage shapes, fwd+bwd time, each kernel's time and
   gradient error against impl=xla.
Each section compiles all its programs first, --jobs at a time, then runs its rows one by one.
A row that raises is recorded with its error and the check goes on; past --budget-s seconds
(default 360: the check ends within about 7 minutes) no more rows are compiled, and those
are recorded as skipped (rows already compiled are still run: seconds, where compiling
takes minutes); the last line printed is then the call that runs those sections. A row
whose run outlasts --row-timeout-s (a kernel that never finishes) ends the check with every
thread's stack, and results.json names it. Writes results.json and results.md in --out
after every row: the tables, and what they decide about the kernels' defaults. Exit status
1 if a correctness row fails or errs, or a row outlasts its time.
"""
import argparse
import contextlib
import faulthandler
import functools
import gc
import importlib
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
import traceback
from concurrent import futures

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.device_memory import peak_memory
from sasa_jax.models import QUICK_DEPTH
from sasa_jax.ops import blocked, default_impl, local_attention
from sasa_jax.ops import pallas_attention as pa
from sasa_jax.tools.bench import (STAGES, compiled, medians, model_step_case, op_programs,
                                  relative_error, resnet)

TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2}  # max |a - b| / max |b|
ODD_SHAPES = [  # (batch, H, W, C, heads, k): window > map, non-square, 1 head
    (2, 5, 5, 32, 4, 7), (2, 9, 20, 64, 8, 7), (2, 13, 11, 16, 1, 5)]
# In this order by default: the cheap sections first, then the training steps impl="auto"
# runs, then the tuning of impl="pallas" (docs/gpu.md), so that a spent budget cuts the last.
SECTIONS = ("env", "export", "correctness", "op", "torch", "blocks", "train_step", "tune")
# The op rows' implementations: the fused kernels, the blocked XLA form (impl="auto"'s on
# accelerators) and the shifted-slice form, a contender to it (ops/shifted.py).
OP_IMPLS = ("pallas", "xla", "shifted")
# The `blocks` rows: impl="xla" in the block plans of these KV_COST values (blocked.plan_blocks;
# at ResNet-50's 56 x 56 stage 4x4, 4x7, 7x7, 8x8 and 14x14 blocks), each at the accelerators'
# chunk limit and at a 4x larger one (fewer sequential chunks).
BLOCK_KV_COSTS = (blocked.KV_COST, 1.6, 3.2, 6.4, 25.6)
BLOCK_CHUNK_LOGITS = (blocked.ACCELERATOR_CHUNK_LOGITS, 4 * blocked.ACCELERATOR_CHUNK_LOGITS)
# --budget-s's default: rows compiled by then still run, and compilations under way finish
# (a minute at most: ResNet-50 training steps took 25-55 s on an H200).
DEFAULT_BUDGET_S = 360
OVER_BUDGET = "time budget"  # a skipped row's reason: its compilation would have started late
# The op's module (the package's `local_attention` is its function): impl="auto"'s settings.
OP_MODULE = importlib.import_module("sasa_jax.ops.local_attention")


def _operands(shape, heads, k, dtype, seed=0):
  """q, k, v, rel_h, rel_w and an output cotangent, fresh normal draws."""
  b, h, w, c = shape
  rng = np.random.default_rng(seed)
  q, kk, v, cot = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
  rh, rw = (jnp.asarray(rng.normal(size=(k, c // heads // 2)), dtype) for _ in range(2))
  return (q, kk, v, rh, rw), cot


def _medians(runs, repeats):
  """`medians` after one untimed call of each program (other programs ran since its first)."""
  for run in runs:
    run()
  return medians(runs, repeats)


def _compiled_fwd_bwd(op, args, cot):
  """A call computing (output, five gradients) of op at args for the output cotangent cot,
  compiled now."""
  def f(args, cot):
    out, vjp = jax.vjp(op, *args)
    return (out, *vjp(cot))
  exe = jax.jit(f).lower(args, cot).compile()
  return lambda: exe(args, cot)


# Each section yields (labels, prepare) per row: prepare() compiles the row's programs (on
# several threads at once) and returns run(), which times or checks them (one at a time)
# and returns the rest of the row.

def env_rows(smoke):
  def row():
    versions = {}
    for name in ("jaxlib", "flax", "optax", "numpy", "torch", "triton", "timm"):
      try:
        versions[name] = importlib.import_module(name).__version__
      except Exception:  # noqa: BLE001 - not installed, or broken: either way, say so
        versions[name] = None
    row = {"backend": jax.default_backend(), "devices": len(jax.devices()),
           "auto_impl": default_impl(),  # and at each ResNet-50 stage as the op rows run it
           "auto_impl_stages": "/".join(default_impl(shape=(32, s, s, c), kernel_size=7,
                                                     num_heads=8) for s, c in STAGES),
           **versions}
    stats = jax.devices()[0].memory_stats() or {}
    row["device_memory_gb"] = stats.get("bytes_limit", 0) / 2**30
    row["loop_memory_metrics"] = peak_memory(jax.local_devices())  # what the loop logs
    if not smoke:
      try:
        row["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=30).stdout.strip()
      except (OSError, subprocess.SubprocessError) as e:
        row["nvidia_smi"] = f"unavailable: {e}"
    return row
  yield {}, lambda: row


def _planned_kernels(h, w, channels, heads, k, dtype, **launch):
  """The op on [B, h, w, channels] as the GPU kernels at the tiling impl="pallas" plans, with
  `pa.fused_attention`'s launch keywords (form, f32_dot); interpreted off a GPU."""
  tiling = pa.plan_tiling(h, w, channels // heads, k, dtype, "gpu")
  return functools.partial(pa.fused_attention, num_heads=heads, tiling=tiling,
                           interpret=jax.default_backend() != "gpu", **launch)


def correctness_rows(shapes, dtype, form=None, impl="pallas"):
  """`impl` against impl="reference": the output and five gradients. impl="pallas" runs the
  form `GPU_FORM` (`TPU_FORM` on a TPU); form: the GPU kernels in that form instead, at the
  tiling impl="pallas" plans (`fused_attention`; interpreted off a GPU). impl="xla": the
  blocked form, impl="auto"'s on accelerators, in this platform's layout; impl="shifted":
  its contender (ops/shifted.py). Both in float32 with float32 matmuls ("highest": jax's
  default rounds a float32 GEMM's operands to TF32 on NVIDIA GPUs and to bfloat16 on TPUs,
  which the tolerance is not for)."""
  exact = impl != "pallas" and jnp.dtype(dtype) == jnp.float32
  for b, h, w, c, heads, k in shapes:
    labels = {"shape": f"{b}x{h}x{w}x{c}", "heads": heads, "k": k,
              "dtype": jnp.dtype(dtype).name, "impl": impl}
    if impl == "pallas":
      labels["form"] = form or (pa.GPU_FORM if _gpu_kernels_run_here() else pa.TPU_FORM)
    if exact:
      labels["matmul_precision"] = "highest"

    def prepare(b=b, h=h, w=w, c=c, heads=heads, k=k):
      args, cot = _operands((b, h, w, c), heads, k, dtype)
      checked = (functools.partial(local_attention, kernel_size=k, num_heads=heads,
                                   impl=impl) if form is None else
                 _planned_kernels(h, w, c, heads, k, dtype, form=form))
      with jax.default_matmul_precision("highest") if exact else contextlib.nullcontext():
        got, want = (_compiled_fwd_bwd(op, args, cot) for op in (checked, lambda *a: (
            local_attention(*a, kernel_size=k, num_heads=heads, impl="reference"))))

      def run():
        errors = dict(zip(("out", "dq", "dk", "dv", "drel_h", "drel_w"),
                          (relative_error(g, r) for g, r in zip(got(), want()))))
        worst = max(errors.values())
        return {**errors, "worst": worst, "ok": worst <= TOLERANCE[jnp.dtype(dtype).name]}
      return run
    yield labels, prepare


def _gpu_kernels_run_here() -> bool:
  """Whether the GPU (Triton) kernels run on this backend: compiled on a GPU, interpreted on
  the CPU (the smoke run); not on a TPU, where impl="pallas" runs the Mosaic kernels."""
  return jax.default_backend() != "tpu"


def _skipped(reason: str):
  """A section's one row, recorded as skipped for `reason`."""
  yield {}, lambda: lambda: {"skipped": reason}


def _gpu_variant_programs(size, width, batch, dtype):
  """{name: make}, make() -> (run, temp bytes): the fwd+bwd program of `op_programs` with the
  GPU kernels in each launch impl="pallas" does not run, at the tiling it plans: the other
  form (pallas_attention.FORMS), and for float32 operands each form with the other matmuls
  (F32_DOTS); named pallas_<form>[_<f32 dot>]. Interpreted on the CPU; none on a TPU."""
  if not _gpu_kernels_run_here():
    return {}
  (_, args), _ = op_programs(size, width, batch, 7, 8, "pallas", dtype)
  f32_dots = pa.F32_DOTS if jnp.dtype(dtype) == jnp.float32 else (pa.GPU_F32_DOT,)
  programs = {}
  for form in pa.FORMS:
    for f32_dot in f32_dots:
      if (form, f32_dot) == (pa.GPU_FORM, pa.GPU_F32_DOT):
        continue

      def loss(*a, op=_planned_kernels(size, size, width, 8, 7, dtype, form=form,
                                       f32_dot=f32_dot)):
        return jnp.sum(op(*a).astype(jnp.float32) ** 2)
      name = f"pallas_{form}" + ("" if f32_dot == pa.GPU_F32_DOT else f"_{f32_dot}")
      programs[name] = lambda loss=loss: compiled(jax.grad(loss, argnums=range(5)), *args)[:2]
  return programs


def _profiles_read_here() -> bool:
  """Whether `hlo_profile` reads this backend's events: the CPU's, a GPU's (CUPTI's); a
  TPU's are laid out otherwise and not read yet."""
  return jax.default_backend() in ("cpu", "gpu")


def _profiled(run, top: int | None = None) -> list:
  """`run.profile`'s rows (`hlo_profile`): the device's own events on a GPU (3 runs), the
  host's on the CPU (1 run: an interpreted kernel's every operation is an event, and the
  profiler takes seconds to write them); a profiler that recorded none raises."""
  cpu = jax.default_backend() == "cpu"
  rows = run.profile(top, planes="host" if cpu else "device", runs=1 if cpu else 3)
  if not rows:
    raise RuntimeError("the profiler recorded no events of the program")
  return rows


def kernel_split(run) -> dict[str, float]:
  """{"fwd": ms, "dq": ms, "dkv": ms, "rest": ms}: where one fwd+bwd of a fused op's program
  (`run`: a `bench.compiled` run) goes, from its profile (`hlo_profile`): each Triton kernel
  (pallas_attention.KERNELS, told by its pallas_call's name, `sasa_<kernel>_kernel`, in the
  source of the instruction) and the rest (XLA's operations around them). On an accelerator
  only the device's own events count; a profiler that recorded none raises."""
  split = dict.fromkeys([*pa.KERNELS, "rest"], 0.0)
  for r in _profiled(run):
    kernel = re.search(r"sasa_(\w+?)_kernel", r.source)
    split[kernel.group(1) if kernel and kernel.group(1) in pa.KERNELS else "rest"] += r.ms
  return split


def top_ops(run, top: int = 6) -> list[str]:
  """The `top` XLA operations one run of a program (`run`: a `bench.compiled` run) spends
  most time in, profiled (`hlo_profile`; on an accelerator its own events), as lines: share,
  ms, executions, what is fused, result shape and the JAX code it came from."""
  return [f"{100 * r.share:.0f}% {r.ms:.3g} ms x{r.calls} {r.contents} {r.shape} <- "
          + "/".join(r.source.split("/")[-3:]) for r in _profiled(run, top)]


def step_parts(run, scope: str, top: int = 8) -> list[str]:
  """Where one training step (`run`: a `bench.compiled` run) goes, profiled, by the part of
  the model each operation came from (its source's name scope under the model's, `scope`):
  "stem_conv", "head", a residual block's layer summed over every block
  ("blocks/attention", "blocks/conv1", "blocks/BatchNorm_0", ...), or outside the model
  (the loss and the optimizer's update); the `top` largest as "share% part" lines."""
  shares = {}
  for r in _profiled(run):
    names = r.source.split("/")
    at = next((i for i, name in enumerate(names) if scope in name), None)
    inner = names[at + 1:] if at is not None else []
    if at is None:
      part = "outside the model" if r.source else "(no source)"
    elif inner and inner[0].startswith("group") and len(inner) > 1:
      part = f"blocks/{inner[1]}"
    else:
      part = inner[0] if inner else scope
    shares[part] = shares.get(part, 0.0) + r.share
  ranked = sorted(shares.items(), key=lambda kv: -kv[1])[:top]
  return [f"{100 * share:.1f}% {part}" for part, share in ranked]


def _profile_fields(name: str, fields) -> dict:
  """fields() (the row fields of a profile: kernel_split's, top_ops', step_parts'), or its
  failure as "<name>_error": the row's timings stand without them."""
  try:
    return fields()
  except Exception as e:  # noqa: BLE001 - recorded
    return {f"{name}_error": f"{type(e).__name__}: {e}"[:300]}


def op_rows(stages, batch, dtype, repeats):
  """One row per stage: every program's fwd+bwd ms and temporary MB, and ratios. A program
  that fails to build or to run is recorded as <name>_error and the others are still timed."""
  for size, width in stages:
    labels = {"shape": f"{batch}x{size}x{size}x{width}", "dtype": jnp.dtype(dtype).name}

    def prepare(size=size, width=width):
      makers = {}
      for impl in OP_IMPLS:
        (attn, attn_args), conv = op_programs(size, width, batch, 7, 8, impl, dtype)
        makers[impl] = lambda attn=attn, attn_args=attn_args: compiled(attn, *attn_args)[:2]
        makers[f"{impl}_fwd"] = lambda impl=impl, attn_args=attn_args: compiled(
            # the forward alone: how fwd and bwd split
            lambda *a: local_attention(*a, kernel_size=7, num_heads=8, impl=impl),
            *attn_args)[:2]
      makers["conv"] = lambda conv=conv: compiled(conv[0], *conv[1])[:2]
      variants = _gpu_variant_programs(size, width, batch, dtype)
      makers.update(variants)
      errors = {}

      def attempt(name, call):
        """call()'s result, or None with the failure recorded as <name>_error."""
        try:
          return call()
        except Exception as e:  # noqa: BLE001 - recorded; the other programs are still timed
          text = f"{type(e).__name__}: {e}"  # its head and tail: a traceback's end names it
          errors[f"{name}_error"] = text if len(text) <= 600 else f"{text[:300]} ... {text[-300:]}"
          return None
      built = {name: attempt(name, make) for name, make in makers.items()}
      programs = {name: p for name, p in built.items() if p is not None}

      def run():
        for name, (go, _) in list(programs.items()):  # untimed first calls, failures recorded
          if attempt(name, go) is None:
            del programs[name]
        secs = medians([go for go, _ in programs.values()], repeats)
        row = dict(errors)
        for (name, (_, temp)), sec in zip(programs.items(), secs):
          row[f"{name}_ms"] = 1e3 * sec
          if not name.endswith("_fwd"):
            row[f"{name}_temp_mb"] = temp / 2**20
        if "pallas" in programs and _profiles_read_here():  # where impl="pallas"'s time
          row.update(_profile_fields("split", lambda: {  # goes: split_fwd_ms, ...
              f"split_{part}_ms": ms for part, ms in kernel_split(programs["pallas"][0]).items()}))
        for impl in ("xla", "shifted"):  # impl="xla"'s (impl="auto"'s) and the contender's
          if impl in programs and _profiles_read_here():
            row.update(_profile_fields(f"{impl}_top_ops", lambda impl=impl: {
                f"{impl}_top_ops": top_ops(programs[impl][0])}))
        for a, b in [("pallas", "conv"), ("xla", "conv"), ("shifted", "conv"), ("pallas", "xla"),
                     ("shifted", "xla"), *((name, "xla") for name in variants)]:
          if f"{a}_ms" in row and f"{b}_ms" in row:
            row[f"{a}_vs_{b}"] = row[f"{a}_ms"] / row[f"{b}_ms"]
        return row
      return run
    yield labels, prepare


def torch_rows(stages, batch, dtype_name, repeats):
  """An exact SASA by unfold (as public PyTorch ports write it) and timm's HaloAttn (which
  includes its q/k/v projections: an upper bound on its attention alone)."""
  try:
    import torch  # noqa: PLC0415
    import torch.nn.functional as F  # noqa: PLC0415, N812
  except ImportError:
    yield from _skipped("PyTorch is not installed")
    return
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device == "cpu" and jax.default_backend() != "cpu":
    yield from _skipped(f"PyTorch sees no GPU: its CPU times compare with nothing on this "
                        f"{jax.default_backend().upper()}")
    return
  dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]

  def timeit(fn):
    fn()
    times = []
    for _ in range(repeats):
      if device == "cuda":
        torch.cuda.synchronize()
      t = time.perf_counter()
      fn()
      if device == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))

  for size, width in stages:
    labels = {"shape": f"{batch}x{size}x{size}x{width}", "dtype": dtype_name, "device": device}

    def run(size=size, width=width):
      heads, k = 8, 7
      d = width // heads
      x = torch.randn(batch, width, size, size, device=device, dtype=dtype,
                      requires_grad=True)
      q, key, v = (torch.randn(batch, width, size, size, device=device, dtype=dtype,
                               requires_grad=True) for _ in range(3))
      rel = torch.randn(d, k * k, device=device, dtype=dtype, requires_grad=True)
      outside = F.unfold(torch.ones(1, 1, size, size, device=device), k,
                         padding=k // 2).reshape(1, k * k, size * size) == 0

      def unfold_sasa():  # logits q.k + q.r over the k x k window, keys outside masked
        qh = q.reshape(batch * heads, d, size * size)
        kw, vw = (F.unfold(t.reshape(batch * heads, d, size, size), k, padding=k // 2)
                  .reshape(batch * heads, d, k * k, size * size) for t in (key, v))
        logits = (torch.einsum("bcp,bckp->bkp", qh, kw)
                  + torch.einsum("bcp,ck->bkp", qh, rel))
        probs = logits.float().masked_fill(outside, float("-inf")).softmax(1).to(dtype)
        y = torch.einsum("bkp,bckp->bcp", probs, vw)
        y.float().square().sum().backward()
      row = {"unfold_sasa_ms": timeit(unfold_sasa)}
      try:
        from timm.layers.halo_attn import HaloAttn  # noqa: PLC0415 (not in timm.layers' names)
        block = 8 if size % 8 == 0 else size
        halo = HaloAttn(width, width, num_heads=heads, block_size=block, halo_size=3).to(
            device, dtype)
        row["timm_halo_ms"] = timeit(lambda: halo(x).float().square().sum().backward())
      except Exception as e:  # noqa: BLE001 - timm missing, or a shape it refuses
        row["timm_halo"] = f"skipped: {type(e).__name__}: {e}"[:200]
      return row
    yield labels, lambda run=run: run


def export_rows():
  """Whether one jitted function (a SASA layer's training step) exports for each platform
  list, with no context manager: the kernel flavour follows the lowering platform."""
  from jax import export  # noqa: PLC0415
  from sasa_jax.layers import SelfAttention2D  # noqa: PLC0415
  layer = SelfAttention2D(features=128, kernel_size=7, num_heads=8, impl="pallas",
                          dtype=jnp.bfloat16)
  x = jax.ShapeDtypeStruct((8, 14, 14, 128), jnp.bfloat16)
  params = jax.eval_shape(lambda: layer.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)))
  step = jax.jit(jax.grad(lambda p, x: jnp.mean(jnp.square(
      layer.apply(p, x).astype(jnp.float32)))))
  checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
  for platforms in (["tpu"], ["cuda"], ["tpu", "cuda"]):
    def run(platforms=platforms):
      text = export.export(step, platforms=platforms, disabled_checks=checks)(
          params, x).mlir_module()
      return {"ok": True, "tpu_custom_calls": text.count("tpu_custom_call"),
              "triton_calls": text.count("__gpu$xla.gpu.triton")}
    yield {"platforms": "+".join(platforms)}, lambda run=run: run


# (variant, impl) per training step row, in the order they run, so that a budget cut falls
# on the last: the blocked form impl="auto" runs on GPUs, then the shifted form in every
# attention layer, then the Triton kernels (timed on an H200 already: docs/gpu.md).
TRAIN_STEP_CASES = (("baseline", "xla"), ("conv_stem_attention", "xla"),
                    ("full_attention", "xla"), ("conv_stem_attention", "shifted"),
                    ("conv_stem_attention", "pallas"), ("full_attention", "pallas"))


def train_step_rows(depth, batch, image_size, dtype, repeats, cases=TRAIN_STEP_CASES,
                    **model_kw):
  baseline = {}
  for variant, impl in cases:
    labels = {"model": f"ResNet-{depth} {variant}", "impl": impl, "batch": batch,
              "image_size": image_size, "dtype": jnp.dtype(dtype).name}

    def prepare(variant=variant, impl=impl):
      model = resnet(variant, depth, impl, dtype, **model_kw)
      case = model_step_case(model, batch, image_size)

      def run():
        sec = _medians([case.run], repeats)[0]
        row = {"ms": 1e3 * sec, "images_per_s": batch / sec,
               "memory_gb": case.footprint / 2**30, "temp_gb": case.temp / 2**30,
               "grad_mb": case.grad_bytes / 2**20, "compile_s": case.compile_s}
        if _profiles_read_here():  # where the step goes, by part of the model
          row.update(_profile_fields("step_parts", lambda: {
              "step_parts": step_parts(case.run, type(model).__name__)}))
        if variant == "baseline":
          baseline.update(row)
        elif baseline:
          row["vs_baseline"] = sec * 1e3 / baseline["ms"]
          row["memory_vs_baseline"] = row["memory_gb"] / baseline["memory_gb"]
        return row
      return run
    yield labels, prepare


def _grads(op, cot):
  """The five gradients of sum(op(q, k, v, rel_h, rel_w) * cot), as a function of the five."""
  return jax.grad(lambda *a: jnp.sum(op(*a).astype(jnp.float32) * cot), argnums=range(5))


def _xla_gradients(args, cot, heads, k):
  """get() -> impl="xla"'s five gradients at args (`_grads`), computed by the first call;
  rows compiling on other threads meanwhile wait for it."""
  lock, done = threading.Lock(), []

  def get():
    with lock:
      if not done:
        done.extend(jax.jit(_grads(lambda *a: local_attention(
            *a, kernel_size=k, num_heads=heads, impl="xla"), cot))(*args))
    return done
  return get


def _timed_against(fn, args, want, repeats, split=False):
  """run() -> {"ms", "temp_mb", "grad_error"} of fn(*args), five gradients, compiled now:
  fwd+bwd ms, temporaries, and the largest error against want() (`_xla_gradients`); with
  split, each Triton kernel's profiled ms too (`kernel_split`, keys "<kernel>_ms")."""
  go, temp, got = compiled(fn, *args)
  error = max(relative_error(g, w) for g, w in zip(got, want()))

  def run():
    row = {"ms": 1e3 * _medians([go], repeats)[0], "temp_mb": temp / 2**20,
           "grad_error": error}
    if split:
      row.update(_profile_fields("split", lambda: {
          f"{part}_ms": ms for part, ms in kernel_split(go).items()}))
    return row
  return run


def blocks_rows(stages, batch, dtype, repeats):
  """impl="xla", the blocked form impl="auto" runs on GPUs and TPUs, cut otherwise at each
  stage shape (k = 7, 8 heads): the block plans of BLOCK_KV_COSTS and of this platform's
  KV_COST, each with the sequential chunks of this platform's limit and of
  BLOCK_CHUNK_LOGITS, as groups of whole images and as strips of every image
  (`blocked.whole_batch_for`); layouts that cut alike are timed once, shapes with one layout
  not at all. fwd+bwd ms, temporary MB and gradient error against impl="xla" as planned."""
  platform = jax.default_backend()
  heads, k = 8, 7
  kv_costs = dict.fromkeys((blocked.kv_cost_for(platform), *BLOCK_KV_COSTS))
  limits = dict.fromkeys((blocked.chunk_logits_for(platform), *BLOCK_CHUNK_LOGITS))
  whole = blocked.whole_batch_for(platform)
  for size, width in stages:
    shape = (batch, size, size, width)
    layouts = {}  # (plan_h, plan_w, chunks) -> [(kv_cost, chunk limit, whole_batch), ...]
    for kv in kv_costs:
      plans = blocked.plan_blocks(size, size, k // 2, width, heads, kv)
      for limit in limits:
        for whole_batch in (whole, not whole):
          chunks = blocked.plan_chunks(shape, heads, *plans, limit, whole_batch)
          layouts.setdefault((*plans, chunks), []).append((kv, limit, whole_batch))
    if len(layouts) < 2:
      continue
    args, cot = _operands(shape, heads, k, dtype, seed=1)
    want = _xla_gradients(args, cot, heads, k)
    planned = blocked.platform_layout(shape, k, heads, platform)
    for (ph, pw, chunks), settings in layouts.items():
      labels = {"shape": "x".join(map(str, shape)), "dtype": jnp.dtype(dtype).name,
                "block": f"{ph.block}x{pw.block}", "window": f"{ph.window}x{pw.window}",
                "chunks": chunks.count, "chunk_images": chunks.images,
                "kv_costs": "/".join(f"{kv:g}" for kv in dict.fromkeys(s[0] for s in settings)),
                "chunk_logits": settings[0][1], "whole_batch": settings[0][2],
                "planned": (ph, pw, chunks) == planned}

      def prepare(ph=ph, pw=pw, limit=settings[0][1], whole_batch=settings[0][2]):
        return _timed_against(_grads(functools.partial(
            blocked.local_attention_blocked, kernel_size=k, num_heads=heads, plan_h=ph,
            plan_w=pw, chunk_logits=limit, whole_batch=whole_batch), cot), args, want, repeats)
      yield labels, prepare


def tune_rows(stages, batch, dtype, repeats, tilings, warps, interpret=False):
  """Candidate Triton launches at each shape (k = 7, 8 heads), in both kernel forms
  (pallas_attention.FORMS): the `tilings` cheapest by the cost model (up to 32K logits a
  program) x `warps` (as `kernel_warps`' num_warps: a count, "rows", or None), plus the planned
  tiling with two pipeline stages; launches that run alike are timed once. Gradient error
  against impl=xla, so a fast wrong launch shows."""
  for size, width in stages:
    heads, k = 8, 7
    d = width // heads
    shape = (batch, size, size, width)
    args, cot = _operands(shape, heads, k, dtype, seed=1)
    want = _xla_gradients(args, cot, heads, k)
    planned = pa.plan_tiling(size, size, d, k, dtype, "gpu")
    candidates = pa.candidate_tilings(size, size, d, k, dtype, "gpu", max_logits=1 << 15)
    default = (planned, None, pa.NUM_STAGES, pa.GPU_FORM)
    launches = [default]
    for form in pa.FORMS:
      launches += [(t, nw, pa.NUM_STAGES, form) for t in candidates[:tilings] for nw in warps]
      launches.append((planned, None, pa.NUM_STAGES + 1, form))

    def runs_as(t, nw, ns, form):  # with the three kernels' warps, e.g. "1/1/4"
      return (t, "/".join(str(pa.kernel_warps(t, form, kernel, nw)) for kernel in pa.KERNELS),
              ns, form)
    seen = set()
    for t, nw, ns, form in launches:
      key = runs_as(t, nw, ns, form)
      if key in seen:  # runs as an earlier launch does
        continue
      seen.add(key)
      labels = {"shape": "x".join(map(str, shape)), "dtype": jnp.dtype(dtype).name,
                "form": form, "block": f"{t.bh}x{t.bw}", "slab": f"{t.kh}x{t.kw}",
                "logits": t.nq * t.nk, "num_warps": key[1], "num_stages": ns,
                "planned": key == runs_as(*default)}

      def prepare(t=t, nw=nw, ns=ns, form=form):
        return _timed_against(_grads(lambda *a: pa.fused_attention(
            *a, num_heads=heads, tiling=t, num_warps=nw, num_stages=ns, form=form,
            interpret=interpret), cot), args, want, repeats, split=True)
      yield labels, prepare


def _kernel_times(row) -> dict:
  """{launch: ms} of an op row's fwd+bwd Triton launches: "pallas" (what impl="pallas"
  runs) and each `_gpu_variant_programs` name."""
  return {name[:-3]: ms for name, ms in row.items() if name.startswith("pallas")
          and name.endswith("_ms") and not name.endswith("_fwd_ms")}


def decisions(rows) -> list[str]:
  """What the timed rows say about the GPU kernels' defaults (pallas_attention's GPU_FORM
  and GPU_F32_DOT, the planner's launch, `default_impl("gpu")`): markdown list items."""
  lines = []
  ops = [r for r in rows if r["kind"] == "op" and "pallas_ms" in r and "xla_ms" in r]
  runs = f'impl="pallas" ({pa.GPU_FORM}, {pa.GPU_F32_DOT})'
  for r in ops:
    times = _kernel_times(r)
    best = min(times, key=times.get)
    split = ", ".join(f"{part} {r[f'split_{part}_ms']:.3g}" for part in (*pa.KERNELS, "rest")
                      if f"split_{part}_ms" in r)
    lines.append(f"- op {r['shape']} {r['dtype']}: fastest kernels `{best}` "
                 f"{times[best]:.3g} ms; {runs} {r['pallas_ms']:.3g} ms"
                 + (f" (profiled, ms: {split})" if split else "")
                 + f"; impl=\"xla\" {r['xla_ms']:.3g} ms")
  for dtype in ("bfloat16", "float32"):
    here = [r for r in ops if r["dtype"] == dtype]
    for launch in sorted({n for r in here for n in _kernel_times(r)} - {"pallas"}):
      timed = [r for r in here if f"{launch}_ms" in r]
      wins = sum(r[f"{launch}_ms"] < r["pallas_ms"] for r in timed)
      lines.append(f"- `{launch}` beats {runs} at {wins} of {len(timed)} {dtype} stages")
    beats = sum(min(_kernel_times(r).values()) < r["xla_ms"] for r in here)
    if here:
      lines.append(f"- some launch beats impl=\"xla\" at {beats} of {len(here)} {dtype} "
                   f"stages (impl=\"auto\" takes {default_impl('gpu')!r} on GPUs)")
  env = next((r for r in rows if r["kind"] == "env" and "backend" in r), {})
  platform = blocked.lowering_platform(env.get("backend") or jax.default_backend())
  lines += _shifted_decisions([r for r in rows if r["kind"] == "op"], platform)
  lines += _shifted_step_decisions([r for r in rows if r["kind"] == "train_step" and "ms" in r])
  tune = [r for r in rows if r["kind"] == "tune" and "ms" in r]
  for shape in dict.fromkeys(r["shape"] for r in tune):
    right = [r for r in tune if r["shape"] == shape
             and r["grad_error"] <= TOLERANCE[r["dtype"]]]
    planned = [r for r in right if r["planned"]]
    if planned:
      best = min(right, key=lambda r: r["ms"])
      lines.append(f"- tune {shape}: fastest {best['form']}, {best['block']} blocks, "
                   f"{best['num_warps']} warps, {best['num_stages']} stage(s): "
                   f"{best['ms']:.3g} ms against the planned launch's {planned[0]['ms']:.3g}")
      lines += _per_kernel_warps(shape, best, right)
  return lines + _block_decisions([r for r in rows if r["kind"] == "blocks" and "ms" in r],
                                  platform)


def _shifted_decisions(ops, platform) -> list[str]:
  """Per dtype, the `op` rows' stages at which impl="shifted" (ops/shifted.py) ran faster
  than impl="xla", the blocked form impl="auto" runs on `platform` (a lowering platform's
  name). For bfloat16, the training dtype: the fewest pixels from which it won at every
  larger stage, the value of `SHIFTED_FROM_PIXELS[platform]`, where that differs from the
  value now (none: it won at the largest stage, or it is not set and won nowhere)."""
  lines = []
  now = OP_MODULE.SHIFTED_FROM_PIXELS.get(platform)
  for dtype in ("bfloat16", "float32"):
    timed = [r for r in ops if r["dtype"] == dtype and "shifted_ms" in r and "xla_ms" in r]
    if not timed:
      continue
    wins = [r for r in timed if r["shifted_ms"] < r["xla_ms"]]
    each = "; ".join(f"{r['shape']} {r['shifted_ms']:.3g} against {r['xla_ms']:.3g} ms"
                     for r in timed)
    line = (f"- impl=\"shifted\" beats impl=\"xla\" at {len(wins)} of {len(timed)} {dtype} "
            f"stages ({each})")
    if dtype == "bfloat16" and platform != "cpu":  # the CPU's "auto" is its own kernel
      least = None  # walking down from the largest maps while it wins
      for r in sorted(timed, key=lambda r: -_pixels(r["shape"])):
        if r["shifted_ms"] >= r["xla_ms"]:
          break
        least = _pixels(r["shape"])
      if least != now:
        knob = f"SHIFTED_FROM_PIXELS[{platform!r}]"
        line += (f": local_attention.{knob} = {least}" if least is not None else
                 f": remove local_attention.{knob} (now {now})")
    lines.append(line)
  return lines


def _shifted_step_decisions(steps) -> list[str]:
  """Per model timed both ways, its training step with impl="shifted" in every attention
  layer against impl="xla": what the shifted form gives or costs a whole step."""
  lines = []
  xla_steps = {r["model"]: r for r in steps if r["impl"] == "xla"}
  for r in (r for r in steps if r["impl"] == "shifted"):
    xla = xla_steps.get(r["model"])
    if xla:
      lines.append(f"- {r['model']} step with impl=\"shifted\": {r['ms']:.4g} ms, "
                   f"{r['memory_gb']:.3g} GB planned, against impl=\"xla\"'s "
                   f"{xla['ms']:.4g} ms, {xla['memory_gb']:.3g} GB "
                   f"({xla['ms'] / r['ms']:.2f}x the images/s)")
  return lines


def _pixels(shape: str) -> int:
  """H x W of an op row's "BxHxWxC" shape."""
  _, h, w, _ = (int(n) for n in shape.split("x"))
  return h * w


def _block_decisions(rows, platform) -> list[str]:
  """What the `blocks` rows say about the blocked op's layout on `platform` (a lowering
  platform's name): per shape the fastest right layout against the planned one; the KV_COST
  whose plans, each at its fastest chunks, take the least time over all the shapes (for
  blocked.ACCELERATOR_KV_COST); whether fewer sequential chunks ran faster; and whether
  chunks of every image ran faster than groups of whole images (for
  blocked.WHOLE_BATCH_CHUNKS)."""
  def chunks(r):
    return f"{r['chunks']} chunk(s)" + (" of every image" if r.get("whole_batch") else "")
  right = [r for r in rows if r["grad_error"] <= TOLERANCE[r["dtype"]]]
  shapes = list(dict.fromkeys(r["shape"] for r in right))
  lines, per_kv = [], {}  # kv -> {shape: its plan's fastest ms}
  for shape in shapes:
    here = [r for r in right if r["shape"] == shape]
    best = min(here, key=lambda r: r["ms"])
    line = (f"- blocks {shape} {best['dtype']}: fastest {best['block']} blocks "
            f"({best['window']} windows, {chunks(best)}; KV_COST "
            f"{best['kv_costs']}) {best['ms']:.3g} ms")
    for r in (r for r in here if r["planned"]):
      line += f" against the planned {r['block']}'s ({chunks(r)}) {r['ms']:.3g} ms"
    lines.append(line)
    for r in here:
      for kv in r["kv_costs"].split("/"):
        per_kv.setdefault(kv, {})[shape] = min(r["ms"], per_kv.get(kv, {}).get(shape, r["ms"]))
  totals = {kv: sum(t.values()) for kv, t in per_kv.items() if len(t) == len(shapes)}
  planned = next((r["kv_costs"].split("/") for r in right if r["planned"]), [])
  if totals:
    kv = min(totals, key=totals.get)
    now = next((p for p in planned if p in totals), None)
    line = (f"- KV_COST over {len(shapes)} shape(s), each plan at its fastest chunks: {kv} "
            f"{totals[kv]:.3g} ms")
    if now is not None and now != kv:
      knob = ("blocked.KV_COST" if platform == "cpu" else
              f"blocked.ACCELERATOR_KV_COST[{platform!r}]")
      line += f" against the planned {now}'s {totals[now]:.3g} ms: {knob} = {kv}"
    lines.append(line)
  pairs = [(a, b) for a in right for b in right if a["shape"] == b["shape"]
           and a["block"] == b["block"] and a.get("whole_batch") == b.get("whole_batch")
           and a["chunks"] < b["chunks"]]
  if pairs:
    wins = sum(a["ms"] < b["ms"] for a, b in pairs)
    lines.append(f"- fewer sequential chunks ran faster in {wins} of {len(pairs)} pairs of "
                 f"one plan (chunk limit now {blocked.ACCELERATOR_CHUNK_LOGITS:,} logits)")
  pairs = [(a, b) for a in right for b in right if a["shape"] == b["shape"]
           and a["block"] == b["block"] and a.get("whole_batch")
           and b.get("whole_batch") is False and a["chunk_logits"] == b["chunk_logits"]]
  if pairs:
    wins = sum(a["ms"] < b["ms"] for a, b in pairs)
    now = blocked.whole_batch_for(platform)
    verdict = ("" if (2 * wins > len(pairs)) == now else
               f": blocked.WHOLE_BATCH_CHUNKS {'should' if not now else 'should not'} "
               f"name {platform!r}")
    lines.append(f"- chunks of every image (strips of block rows) ran faster than groups of "
                 f"whole images in {wins} of {len(pairs)} pairs of one plan and limit (on "
                 f"{platform} now: {'strips of every image' if now else 'groups of images'})"
                 + verdict)
  return lines


def _per_kernel_warps(shape, best, rows) -> list[str]:
  """Among the tune `rows` of `best`'s form, tiling and stages, the warps at which each kernel
  ran fastest (their profiled times): a decision line where those rows tried more than one
  warp count, since `kernel_warps` sets each kernel's warps on its own."""
  launch = ("form", "block", "slab", "num_stages")
  same = [r for r in rows if all(r.get(k) == best.get(k) for k in launch)
          and all(f"{kernel}_ms" in r for kernel in pa.KERNELS)]
  if len({r["num_warps"] for r in same}) < 2:
    return []
  parts = []
  for i, kernel in enumerate(pa.KERNELS):
    fastest = min(same, key=lambda r, kernel=kernel: r[f"{kernel}_ms"])
    parts.append(f"{kernel} at {fastest['num_warps'].split('/')[i]} warps "
                 f"({fastest[f'{kernel}_ms']:.3g} ms)")
  return [f"- tune {shape}, {best['form']} with {best['block']} blocks, "
          f"{best['num_stages']} stage(s), per kernel (profiled): {', '.join(parts)}"]


def to_markdown(report) -> str:
  lines = [f"# GPU check: {report['device']}", "",
           f"jax {report['jax']}, Python {report['python']}, {report['date']}, "
           f"{report['mode']}", ""]
  for kind in SECTIONS:
    rows = [r for r in report["rows"] if r["kind"] == kind]
    if not rows:
      continue
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items()
                              if k not in ("kind", "traceback", "at_s")
                              and not isinstance(v, list)))
    keys.append("at_s")  # last: rows differ in the other keys they hold
    lines += [f"## {kind}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
      cells = (f"{r[k]:.4g}" if isinstance(r.get(k), float) else
               str(r.get(k, "")).replace("|", "/").replace("\n", " ") for k in keys)
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in rows:  # list fields (xla_top_ops, step_parts) below the table, one per row
      named = " ".join(str(r[k]) for k in ("shape", "model", "impl", "dtype") if k in r)
      for k, items in ((k, v) for k, v in r.items() if isinstance(v, list)):
        lines += [f"{k}, {named}:", "", *(f"- {item}" for item in items), ""]
  decided = decisions(report["rows"])
  if decided:
    lines += ["## decisions", "", *decided, ""]
  return "\n".join(lines)


def _error(row, kind):
  """Record the exception being handled in row (and go on to the next row)."""
  row["error"] = f"{sys.exc_info()[0].__name__}: {sys.exc_info()[1]}"[:1500]
  row["traceback"] = traceback.format_exc()[-4000:]
  if kind == "correctness":
    row["ok"] = False
  return row


def _section_rows(kind, make_rows, jobs, over_budget, starting=lambda row: None):
  """The section's rows: every row's programs compiled first, `jobs` at a time, then each
  row run in order (so that no compilation competes with a timing), `starting(row)` called
  before each run. The budget is checked as each row's compilation would start, where the
  time goes: a row compiled in time is still checked or timed (seconds), the others are
  recorded as skipped."""
  try:
    pairs = list(make_rows())
  except Exception:  # noqa: BLE001 - a section that cannot set up is one error row
    yield _error({"kind": kind}, kind)
    return

  def in_budget(prepare):
    return None if over_budget() else prepare()
  with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
    prepared = [pool.submit(in_budget, prepare) for _, prepare in pairs]
    futures.wait(prepared)
  for (labels, _), future in zip(pairs, prepared):
    row = {"kind": kind, **labels}
    try:
      run = future.result()
      if run is None:
        row["skipped"] = OVER_BUDGET
      else:
        starting(row)
        row.update(run())
    except Exception:  # noqa: BLE001
      _error(row, kind)
    yield row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "runs/gpu_check"))
  p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (tests, any machine)")
  p.add_argument("--tune", action="store_true", help="also time the kernels' launch options")
  p.add_argument("--sections", default=",".join(s for s in SECTIONS if s != "tune"),
                 help=f"comma-separated, from {','.join(SECTIONS)}")
  p.add_argument("--budget-s", type=float, default=None,
                 help="compile no more rows after this many seconds (recorded as skipped); "
                      f"default {DEFAULT_BUDGET_S:g} (so that the check ends within about 7 "
                      "minutes), none with --cpu-smoke; 0: none")
  p.add_argument("--jobs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                 help="programs compiled at once (train steps: at most 3)")
  p.add_argument("--row-timeout-s", type=float, default=120,
                 help="a row whose run (its programs compiled) takes longer, such as a kernel "
                      "that never finishes, ends the check with every thread's stack, "
                      "named in results.json; the rows before it stand (0: no limit)")
  args = p.parse_args(argv)
  # In the order given; --tune adds "tune" at the end unless --sections places it.
  sections = list(dict.fromkeys([s for s in args.sections.split(",") if s]
                                + (["tune"] if args.tune else [])))
  unknown = sorted(set(sections) - set(SECTIONS))
  if unknown:
    p.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
  smoke, start = args.cpu_smoke, time.perf_counter()
  budget_s = args.budget_s if args.budget_s is not None else 0 if smoke else DEFAULT_BUDGET_S
  stages = [(8, 16), (4, 32)] if smoke else STAGES
  shapes = ([(1, 6, 5, 16, 2, 3), (1, 4, 4, 8, 1, 5)] if smoke
            else [(2, s, s, c, 8, 7) for s, c in STAGES] + ODD_SHAPES)
  op_batch, repeats = (2, 2) if smoke else (32, 10)
  odd_shapes = shapes[-1:] if smoke else ODD_SHAPES
  other_form = next(f for f in pa.FORMS if f != pa.GPU_FORM)
  report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "mode": "cpu smoke" if smoke else "full", "rows": []}
  print(f"gpu_check: {report['device']} ({jax.default_backend()}), jax {jax.__version__}; "
        f"sections {','.join(sections)}; budget "
        + (f"{budget_s:g} s" if budget_s else "none"), flush=True)
  makers = {
      "env": lambda: env_rows(smoke),
      "correctness": lambda: itertools.chain(
          (r for dt in (jnp.float32, jnp.bfloat16) for r in correctness_rows(shapes, dt)),
          # the other form at the odd shapes (`tune` checks it at the stage shapes)
          correctness_rows(odd_shapes, jnp.float32, form=other_form)
          if _gpu_kernels_run_here() else (),
          # the blocked XLA form, what impl="auto" runs on GPUs and TPUs, and its contender
          (r for impl in ("xla", "shifted") for dt in (jnp.float32, jnp.bfloat16)
           for r in correctness_rows(shapes, dt, impl=impl))),
      "op": lambda: (r for dt in (jnp.bfloat16, jnp.float32)
                     for r in op_rows(stages, op_batch, dt, repeats)),
      "blocks": lambda: blocks_rows([(12, 16)] if smoke else STAGES, op_batch,
                                    jnp.float32 if smoke else jnp.bfloat16, repeats),
      "torch": lambda: torch_rows(stages, op_batch, "float32" if smoke else "bfloat16",
                                  repeats),
      "export": export_rows,
      "train_step": lambda: (
          train_step_rows(QUICK_DEPTH, 2, 32, jnp.float32, 2, width_multiplier=0.125,
                          num_heads=2,
                          cases=[("baseline", "xla"), ("full_attention", "pallas")])
          if smoke else train_step_rows(50, 128, 224, jnp.bfloat16, 5)),
      "tune": lambda: (_skipped("the Triton kernels' launches: a GPU's")
                       if not _gpu_kernels_run_here() else
                       tune_rows(stages[:1], op_batch, jnp.float32, 2, 1, (None,),
                                 interpret=True) if smoke else
                       tune_rows(STAGES, op_batch, jnp.bfloat16, repeats, 4,
                                 (None, "rows", 4, 8))),
  }
  os.makedirs(args.out, exist_ok=True)

  def over_budget():
    return bool(budget_s) and time.perf_counter() - start > budget_s
  # What the imports and each finished section leave alive (jax's caches of traced and
  # compiled programs, mostly) is frozen out of the garbage collector's full passes, which
  # otherwise walk it again and again (3.6 of 43 CPU seconds in the CPU smoke).
  gc.freeze()

  def save(rows):
    """What is done so far, so that a run cut short by a time limit still leaves both."""
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump({**report, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
      f.write(to_markdown({**report, "rows": rows}))

  def starting(row):
    """Before a row runs: on disk as unfinished, and under the watchdog (faulthandler's: it
    writes every thread's stack and exits with status 1, whatever the thread waits in)."""
    if args.row_timeout_s:
      save([*report["rows"], {**row, "error": (
          f"did not finish within {args.row_timeout_s:g} s (--row-timeout-s): the check "
          "stopped here, every thread's stack in its output")}])
      faulthandler.dump_traceback_later(args.row_timeout_s, exit=True)
  for section in sections:
    jobs = min(args.jobs, 3) if section == "train_step" else args.jobs  # device memory
    for row in _section_rows(section, makers[section], jobs, over_budget, starting):
      faulthandler.cancel_dump_traceback_later()
      row["at_s"] = round(time.perf_counter() - start, 1)
      print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
      if "traceback" in row:
        print(row["traceback"], flush=True)
      report["rows"].append(row)
      save(report["rows"])
    gc.collect()
    gc.freeze()
  bad = [r for r in report["rows"] if r["kind"] == "correctness" and not r.get("ok", True)]
  print(to_markdown(report), flush=True)
  print(f"gpu_check: {len(bad)} correctness failure(s) in {time.perf_counter() - start:.0f} s;"
        f" results in {args.out}", flush=True)
  cut = list(dict.fromkeys(r["kind"] for r in report["rows"] if r.get("skipped") == OVER_BUDGET))
  if cut:  # what a second call on the same machine would run
    print(f"gpu_check: the budget left rows of {', '.join(cut)} unrun; to run those sections: "
          f"PYTHONPATH=. python3 -m sasa_jax.tools.gpu_check --out "
          f"{os.path.join(args.out, 'rest')} {'--cpu-smoke ' if smoke else ''}--sections="
          f"{','.join(dict.fromkeys(['env', *cut]))} --budget-s SECONDS", flush=True)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
