"""What Triton's compiler makes of the GPU kernels, on a machine without a GPU.

  python -m sasa_jax.tools.triton_census [--arch 90] [--dtype bfloat16] [--format json]

impl="pallas" runs three Triton kernels per op on a GPU (forward, dq, dk/dv). This lowers
them as a CUDA export does, at each ResNet-50 stage shape (k = 7, 8 heads, batch 32) and in
each kernel form (`pallas_attention.FORMS`), compiles them with the `triton` package for
the given compute capability (its own ptxas: no GPU or CUDA install needed; the [census]
extra installs it) and reads the machine code back with its cuobjdump. Per kernel:
instructions per thread (the kernels are straight-line code, so every thread executes each
once), registers per thread, stack (spilled registers), shared memory, the warps that fit on
an SM at once (by registers, shared memory and the architecture's limits) and tensor-core
instructions; per op: warp-instructions issued in all, the sum over its kernels of
instructions x warps x programs, and that per logit computed and per query pixel.
--tilings N and --warps 4,8 compare launches; --dtype float32 --f32-dot ieee,bf16x3 the
float32 matmuls (`pa.F32_DOTS`). A count, not a timing: it says which form or tiling gives
a GPU less to issue, not how its memory system (spills included) fares.
"""
import argparse
import contextlib
import json
import math
import os
import re
import subprocess
import tempfile

import jax
import jax.numpy as jnp
from jax import export

from sasa_jax.ops import pallas_attention as pa

STAGES = ((56, 64), (28, 128), (14, 256), (7, 512))  # ResNet-50's (map size, width)
HEADS, KERNEL_SIZE = 8, 7
TENSOR_CORE_OPS = ("HMMA", "WGMMA", "HGMMA")


@contextlib.contextmanager
def _capturing_triton_modules():
  """Yields a list that collects (Triton module text, grid) of every pallas_call lowered for
  CUDA meanwhile. Hooks jax's Pallas-Triton lowering (jax internals: checked here)."""
  from jax._src.pallas.triton import pallas_call_registration as registration
  lowering = getattr(registration, "lowering", None)
  original = getattr(lowering, "lower_jaxpr_to_triton_module", None)
  if original is None:
    raise RuntimeError(f"jax {jax.__version__}: no Pallas-Triton lowering hook found "
                       "(jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module)")
  captured = []

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append((result.module.operation.get_asm(enable_debug_info=False),
                     tuple(result.grid)))
    return result
  lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield captured
  finally:
    lowering.lower_jaxpr_to_triton_module = original


def kernel_modules(size: int, width: int, batch: int, dtype, form: str,
                   tiling: pa.Tiling | None = None, num_warps: int | None = None,
                   num_stages: int = pa.NUM_STAGES, f32_dot: str = "ieee"):
  """The op's fwd+bwd at one stage shape lowered for CUDA: [(name, Triton IR, grid)] for the
  forward, dq and dk/dv kernels, at `tiling` (default: the planned one); num_warps and
  f32_dot as `pa.fused_attention`'s."""
  d = width // HEADS
  tiling = tiling or pa.plan_tiling(size, size, d, KERNEL_SIZE, dtype, "gpu")
  x = jax.ShapeDtypeStruct((batch, size, size, width), dtype)
  rel = jax.ShapeDtypeStruct((KERNEL_SIZE, d // 2), dtype)

  def loss(*args):
    y = pa.fused_attention(*args, num_heads=HEADS, tiling=tiling, form=form,
                           num_warps=num_warps, num_stages=num_stages, f32_dot=f32_dot)
    return jnp.sum(y.astype(jnp.float32))
  step = jax.jit(jax.grad(loss, argnums=range(5)))
  with _capturing_triton_modules() as captured:
    export.export(step, platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(x, x, x, rel, rel)
  names = [re.search(r"module @(\w+)", text).group(1) for text, _ in captured]
  return [(name, text, grid) for name, (text, grid) in zip(names, captured)]


def compile_module(text: str, arch: int, num_warps: int, num_stages: int) -> dict:
  """Triton IR -> cubin for compute capability `arch`, and what is in it."""
  import triton  # noqa: PLC0415 - optional: the [census] extra
  from triton import knobs  # noqa: PLC0415
  from triton.backends.compiler import GPUTarget  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, "kernel.ttir")  # the suffix tells triton.compile its input
    with open(source, "w") as f:
      f.write(text)
    kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    cubin = os.path.join(tmp, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(kernel.asm["cubin"])
    tool = knobs.nvidia.cuobjdump.path

    def dump(flag):
      return subprocess.run([tool, flag, cubin], capture_output=True, text=True,
                            check=True).stdout
    sass, resources = dump("-sass"), dump("-res-usage")
  opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)", sass)
  usage = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", resources))
  return {"instructions": len(opcodes), "registers": int(usage.get("REG", 0)),
          "stack_bytes": int(usage.get("STACK", 0)), "shared_bytes": kernel.metadata.shared,
          "tensor_core_ops": sum(op in TENSOR_CORE_OPS for op in opcodes)}


# Per-SM limits of a compute capability (CUDA C++ Programming Guide, "Compute Capabilities"):
# resident warps, resident blocks, 32-bit registers, shared memory (bytes), and the shared
# memory the system reserves per block.
SM_LIMITS = {80: (64, 32, 65536, 164 * 1024, 1024), 90: (64, 32, 65536, 228 * 1024, 1024)}


def resident_warps(registers: int, shared_bytes: int, num_warps: int, arch: int) -> int | None:
  """Warps of one kernel that fit on an SM at once (None for an arch not in SM_LIMITS): the
  fewest programs that registers (allocated 256 per warp), shared memory, the block limit
  and the warp limit allow, times num_warps. More resident warps hide more latency."""
  if arch not in SM_LIMITS:
    return None
  max_warps, max_blocks, sm_registers, sm_shared, reserved = SM_LIMITS[arch]
  per_warp = -(-registers * 32 // 256) * 256
  blocks = min(max_blocks, max_warps // num_warps,
               (sm_registers // per_warp) // num_warps,
               sm_shared // (shared_bytes + reserved))
  return blocks * num_warps


def census(stages=STAGES, batch: int = 32, dtype=jnp.bfloat16, forms=pa.FORMS,
           arch: int = 90, warps=(None,), num_stages: int = pa.NUM_STAGES,
           tilings: int = 1, f32_dots=("ieee",)):
  """One row per (stage, tiling, warps, form, f32 dot, kernel) and one per (stage, tiling,
  warps, form, f32 dot) with kernel "op", at the `tilings` cheapest tilings by the planner's
  cost model (the first is the planned one; up to 32K logits a program, as gpu_check
  --tune). warps: as `pa.kernel_warps`' num_warps (a count for every kernel, "rows", or
  None for the form's own); f32_dots: from `pa.F32_DOTS` (float32 only)."""
  rows = []
  for size, width in stages:
    planned = pa.plan_tiling(size, size, width // HEADS, KERNEL_SIZE, dtype, "gpu")
    candidates = pa.candidate_tilings(size, size, width // HEADS, KERNEL_SIZE, dtype, "gpu",
                                      max_logits=1 << 15)
    chosen = list(dict.fromkeys([planned, *candidates]))[:tilings]
    for tiling, num_warps, form, f32_dot in ((t, w, f, m) for t in chosen for w in warps
                                             for f in forms for m in f32_dots):
      labels = {"shape": f"{batch}x{size}x{size}x{width}", "dtype": jnp.dtype(dtype).name,
                "form": form, "block": f"{tiling.bh}x{tiling.bw}",
                "slab": f"{tiling.kh}x{tiling.kw}", "planned": tiling == planned}
      if jnp.dtype(dtype) == jnp.float32:
        labels["f32_dot"] = f32_dot
      total = 0
      for name, text, grid in kernel_modules(size, width, batch, dtype, form, tiling,
                                             num_warps, num_stages, f32_dot):
        kernel = name.removeprefix("sasa_").removesuffix("_kernel")
        kernel_warps = pa.kernel_warps(tiling, form, kernel, num_warps)
        row = {**labels, "kernel": kernel, "num_warps": kernel_warps,
               "programs": math.prod(grid),
               **compile_module(text, arch, kernel_warps, num_stages)}
        row["warp_instructions"] = row["instructions"] * kernel_warps * row["programs"]
        row["resident_warps"] = resident_warps(row["registers"], row["shared_bytes"],
                                               kernel_warps, arch)
        total += row["warp_instructions"]
        rows.append(row)
      logits = batch * HEADS * math.prod(tiling.block_map) * tiling.nk
      rows.append({**labels, "kernel": "op", "num_warps": "auto" if num_warps is None
                   else num_warps, "warp_instructions": total,
                   "per_logit": total / logits, "per_query": total / (batch * HEADS * size**2)})
  return rows


def to_markdown(rows) -> str:
  keys = ["shape", "block", "num_warps", "form", "f32_dot", "kernel", "instructions",
          "registers", "stack_bytes", "shared_bytes", "resident_warps", "tensor_core_ops",
          "warp_instructions", "per_logit", "per_query"]
  if not any("f32_dot" in r for r in rows):  # bfloat16
    keys.remove("f32_dot")
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  for r in rows:
    lines.append("| " + " | ".join(f"{r[k]:.3g}" if isinstance(r.get(k), float)
                                   else str(r.get(k, "")) for k in keys) + " |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (H100: 90)")
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--warps", default="auto",
                 help="comma-separated, e.g. auto,rows,4,8: a count for every kernel, rows "
                      "(one warp per 16 rows of a kernel's logit block) or auto (the form's "
                      "own: pa.kernel_warps)")
  p.add_argument("--tilings", type=int, default=1,
                 help="the planned tiling and the cost model's next cheapest, this many")
  p.add_argument("--stages", default=",".join(str(s) for s, _ in STAGES),
                 help="map sizes, from 56,28,14,7")
  p.add_argument("--f32-dot", default="ieee",
                 help=f"with --dtype float32: how the kernels multiply, comma-separated from "
                      f"{','.join(pa.F32_DOTS)}")
  p.add_argument("--format", choices=("markdown", "json"), default="markdown")
  args = p.parse_args(argv)
  f32_dots = args.f32_dot.split(",")
  if set(f32_dots) - set(pa.F32_DOTS):
    p.error(f"--f32-dot: {args.f32_dot!r}; choose from {','.join(pa.F32_DOTS)}")
  if args.dtype != "float32" and f32_dots != ["ieee"]:
    p.error("--f32-dot applies to --dtype float32 only (bfloat16 operands go to the tensor "
            "cores whatever it says)")
  sizes = {int(s) for s in args.stages.split(",")}
  unknown = sizes - {s for s, _ in STAGES}
  if unknown:
    p.error(f"--stages: {sorted(unknown)} is not a ResNet-50 stage; choose from 56,28,14,7")
  rows = census([s for s in STAGES if s[0] in sizes], args.batch, jnp.dtype(args.dtype),
                arch=args.arch,
                warps=[None if w == "auto" else w if w == "rows" else int(w)
                       for w in args.warps.split(",")],
                tilings=args.tilings, f32_dots=f32_dots)
  print(json.dumps(rows, indent=1) if args.format == "json" else to_markdown(rows))


if __name__ == "__main__":
  main()
