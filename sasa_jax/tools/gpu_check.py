"""The prepared accelerator check: is impl="pallas" right and fast on this GPU?

  make gpu-check                      # GPU_CHECK_OUT=dir (default runs/gpu_check)
  PYTHONPATH=. python -m sasa_jax.tools.gpu_check --out DIR [--cpu-smoke]

Needs jax, flax, optax and numpy only (no TensorFlow, TFDS, clu or ml_collections), so it
runs from a checkout on a bare accelerator image. In order, printing as it goes:
1. correctness: impl="pallas" (compiled kernels; interpret mode only on the CPU) against
   impl="reference", the output and all five gradients, float32 and bfloat16, at the four
   ResNet-50 stage shapes and at odd shapes (window larger than the map, non-square, 1 head);
2. the op's fwd+bwd time and compiled temporary memory, pallas vs xla vs a 3x3 conv of the
   same width (batch 32), bfloat16 and float32;
3. ResNet-50 training steps (batch 128, bfloat16, 224 px, synthetic data): baseline,
   conv-stem + attention and full attention with impl pallas and xla: images/s, memory;
4. where PyTorch and timm are installed, the same op shapes as an exact SASA by unfold and
   timm's HaloAttn (block 8, halo 3), fwd+bwd.
Writes results.json and results.md in --out. --cpu-smoke: tiny shapes, for the test suite.
"""
import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops import local_attention
from sasa_jax.tools.bench import STAGES, compiled, medians, op_case, train_step_case

TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2}  # max |a - b| / max |b|
ODD_SHAPES = [  # (batch, H, W, C, heads, k): window > map, non-square, 1 head
    (2, 5, 5, 32, 4, 7), (2, 9, 20, 64, 8, 7), (2, 13, 11, 16, 1, 5)]


def _rel_error(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def correctness(shapes, dtype):
  """Rows: per shape, the worst relative error of the output and of each gradient."""
  for b, h, w, c, heads, k in shapes:
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, h, w, c)), dtype) for _ in range(3))
    rh, rw = (jnp.asarray(rng.normal(size=(k, c // heads // 2)), dtype) for _ in range(2))
    cot = jnp.asarray(rng.normal(size=(b, h, w, c)), dtype)

    def fwd_bwd(impl):
      def f(*args):
        return local_attention(*args, kernel_size=k, num_heads=heads, impl=impl)
      out, vjp = jax.vjp(f, q, kk, v, rh, rw)
      return (out, *vjp(cot))
    got = jax.jit(lambda: fwd_bwd("pallas"))()
    want = jax.jit(lambda: fwd_bwd("reference"))()
    errors = dict(zip(("out", "dq", "dk", "dv", "drel_h", "drel_w"),
                      (_rel_error(g, r) for g, r in zip(got, want))))
    worst = max(errors.values())
    yield {"kind": "correctness", "shape": f"{b}x{h}x{w}x{c}", "heads": heads, "k": k,
           "dtype": jnp.dtype(dtype).name, **errors, "worst": worst,
           "ok": worst <= TOLERANCE[jnp.dtype(dtype).name]}


def op_speed(stages, batch, dtype, repeats):
  for size, width in stages:
    row = {"kind": "op", "shape": f"{batch}x{size}x{size}x{width}",
           "dtype": jnp.dtype(dtype).name}
    for impl in ("pallas", "xla"):
      case = op_case(size, width, batch, 7, 8, impl, dtype, repeats)
      row[f"{impl}_ms"] = 1e3 * case["t_attn"]
      row[f"{impl}_temp_mb"] = case["m_attn"] / 2**20
      row["conv_ms"], row["conv_temp_mb"] = 1e3 * case["t_conv"], case["m_conv"] / 2**20
    row["pallas_vs_conv"] = row["pallas_ms"] / row["conv_ms"]
    row["xla_vs_conv"] = row["xla_ms"] / row["conv_ms"]
    yield row


def model_steps(depth, batch, image_size, dtype, repeats, cases=None, **model_kw):
  cases = cases or [(variant, impl)
                    for variant in ("baseline", "conv_stem_attention", "full_attention")
                    for impl in (("xla",) if variant == "baseline" else ("pallas", "xla"))]
  for variant, impl in cases:
    run, temp, compile_s = train_step_case(variant, depth, batch, image_size, impl, dtype,
                                           **model_kw)
    sec = medians([run], repeats)[0]
    stats = jax.local_devices()[0].memory_stats() or {}
    yield {"kind": "train_step", "model": f"ResNet-{depth} {variant}", "impl": impl,
           "batch": batch, "image_size": image_size, "dtype": jnp.dtype(dtype).name,
           "ms": 1e3 * sec, "images_per_s": batch / sec, "temp_mb": temp / 2**20,
           "peak_mb": stats.get("peak_bytes_in_use", 0) / 2**20, "compile_s": compile_s}


def torch_baselines(stages, batch, dtype_name, repeats):
  """An exact SASA by unfold (as public PyTorch ports write it) and timm's HaloAttn."""
  try:
    import torch
    import torch.nn.functional as F
  except ImportError:
    yield {"kind": "torch", "skipped": "PyTorch is not installed"}
    return
  device = "cuda" if torch.cuda.is_available() else "cpu"
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
    heads, k = 8, 7
    d = width // heads
    x = torch.randn(batch, width, size, size, device=device, dtype=dtype, requires_grad=True)
    q, key, v = (torch.randn(batch, width, size, size, device=device, dtype=dtype,
                             requires_grad=True) for _ in range(3))
    rel = torch.randn(d, k * k, device=device, dtype=dtype, requires_grad=True)
    outside = F.unfold(torch.ones(1, 1, size, size, device=device), k,
                       padding=k // 2).reshape(1, k * k, size * size) == 0

    def unfold_sasa():  # logits q.k + q.r over the k x k window, keys outside masked
      qh = q.reshape(batch * heads, d, size * size)
      kw, vw = (F.unfold(t.reshape(batch * heads, d, size, size), k, padding=k // 2).reshape(
          batch * heads, d, k * k, size * size) for t in (key, v))
      logits = torch.einsum("bcp,bckp->bkp", qh, kw) + torch.einsum("bcp,ck->bkp", qh, rel)
      probs = logits.float().masked_fill(outside, float("-inf")).softmax(1).to(dtype)
      y = torch.einsum("bkp,bckp->bcp", probs, vw)
      y.float().square().sum().backward()
    row = {"kind": "torch", "shape": f"{batch}x{size}x{size}x{width}", "dtype": dtype_name,
           "device": device, "unfold_sasa_ms": timeit(unfold_sasa)}
    try:
      from timm.layers import HaloAttn
      block = 8 if size % 8 == 0 else size
      halo = HaloAttn(width, width, num_heads=heads, block_size=block, halo_size=3).to(
          device, dtype)
      row["timm_halo_ms"] = timeit(lambda: halo(x).float().square().sum().backward())
    except Exception as e:  # noqa: BLE001 - timm missing, or a shape it refuses
      row["timm_halo"] = f"skipped: {type(e).__name__}: {e}"[:200]
    yield row


def to_markdown(report) -> str:
  lines = [f"# GPU check: {report['device']}", "",
           f"jax {report['jax']}, {report['date']}, {report['mode']}", ""]
  for kind in ("correctness", "op", "train_step", "torch"):
    rows = [r for r in report["rows"] if r["kind"] == kind]
    if not rows:
      continue
    keys = [k for k in rows[0] if k != "kind"]
    lines += [f"## {kind}", "", "| " + " | ".join(keys) + " |",
              "|" + "---|" * len(keys)]
    for r in rows:
      lines.append("| " + " | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float)
                                     else str(r.get(k)) for k in keys) + " |")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "runs/gpu_check"))
  p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (tests, any machine)")
  p.add_argument("--skip-models", action="store_true")
  args = p.parse_args(argv)
  smoke = args.cpu_smoke
  stages = [(8, 16), (4, 32)] if smoke else STAGES
  shapes = ([(1, 6, 5, 16, 2, 3), (1, 4, 4, 8, 1, 5)] if smoke
            else [(2, s, s, c, 8, 7) for s, c in STAGES] + ODD_SHAPES)
  op_batch, repeats = (2, 2) if smoke else (32, 10)
  report = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "mode": "cpu smoke" if smoke else "full", "rows": []}
  print(f"gpu_check: {report['device']} ({jax.default_backend()}), jax {jax.__version__}",
        flush=True)
  sections = [correctness(shapes, dt) for dt in (jnp.float32, jnp.bfloat16)]
  sections += [op_speed(stages, op_batch, dt, repeats) for dt in (jnp.bfloat16, jnp.float32)]
  if not args.skip_models:
    if smoke:
      sections.append(model_steps(26, 2, 32, jnp.float32, 2, width_multiplier=0.125,
                                  num_heads=2, cases=[("baseline", "xla"),
                                                      ("full_attention", "pallas")]))
    else:
      sections.append(model_steps(50, 128, 224, jnp.bfloat16, 5))
  sections.append(torch_baselines(stages, op_batch, "float32" if smoke else "bfloat16",
                                  repeats))
  os.makedirs(args.out, exist_ok=True)
  for section in sections:
    for row in section:
      print(json.dumps(row), flush=True)
      report["rows"].append(row)
      with open(os.path.join(args.out, "results.json"), "w") as f:  # what is done so far
        json.dump(report, f, indent=1)
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(to_markdown(report))
  bad = [r for r in report["rows"] if r["kind"] == "correctness" and not r["ok"]]
  print(f"gpu_check: {len(bad)} correctness failure(s); results in {args.out}", flush=True)
  return 1 if bad else 0


if __name__ == "__main__":
  sys.exit(main())
