"""Speed and memory of local attention against convolution, on the current backend.

  python -m sasa_jax.tools.bench                 # op at ResNet-50 stage shapes + training steps
  python -m sasa_jax.tools.bench --skip-models --format json

(a) fwd+bwd of local_attention (k=7, 8 heads) at the four ResNet-50 stage shapes
    against a 3x3 convolution of the same width and against the reference implementation;
(b) one training step of ResNet-50 full attention and conv-stem + attention against the
    ResNet-50 baseline at the same batch;
(c) one training step of the demo model (configs/fashion_mnist.py, its batch) against the
    same config with variant=baseline;
(d) where an attention step's time goes, per layer kind: the op, the rest of the attention
    layers (q/k/v projections, pooling), the stem (with the head, loss and update) and the
    rest of the network;
(e) achieved GFLOP/s next to a measured dense-matmul GFLOP/s of this machine;
(f) with --hlo-profile N, the N XLA operations each op program and each attention step
    spends most time in (`sasa_jax.tools.hlo_profile`).
Times are medians of --repeats runs after compilation; memory is XLA's compiled
temporary allocation (memory_analysis().temp_size_in_bytes). All ratios come from one run.
The benchmarked programs' gradients are checked against the reference implementation's;
the command fails if they disagree.
"""
import argparse
import functools
import json
import statistics
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sasa_jax.layers import SelfAttention2D
from sasa_jax.models import QUICK_DEPTH, create_resnet
from sasa_jax.ops import default_impl, local_attention
from sasa_jax.run_once import run_once
from sasa_jax.tools.flops import count_flops
from sasa_jax.tools.hlo_profile import HloOpTime, format_rows, hlo_profile

# Largest relative gradient difference from the reference that counts as agreement.
GRAD_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}
STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # ResNet-50 groups 1-4: (H = W, width)


def relative_error(a, b) -> float:
  """max |a - b| / max |b| in float32; inf where a has a non-finite value."""
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if not np.all(np.isfinite(a)):
    return float("inf")
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def compiled(fn, *args):
  """(run, temp bytes, output) of jit(fn) on args, compiled and run once: run() times one
  more call in seconds."""
  run, memory, out = compiled_with_memory(fn, *args)
  return run, memory["temp"], out


def memory_plan(exe) -> dict[str, int]:
  """XLA's memory plan of a compiled program in bytes: "temp" (temporaries), "argument",
  "output", "alias" (outputs written into donated arguments) and "footprint" (arguments +
  outputs - aliased + temporaries); zeros where the backend gives no analysis."""
  mem = exe.memory_analysis()
  plan = {name: int(getattr(mem, f"{name}_size_in_bytes", 0) or 0) if mem is not None else 0
          for name in ("temp", "argument", "output", "alias")}
  plan["footprint"] = plan["temp"] + plan["argument"] + plan["output"] - plan["alias"]
  return plan


def compiled_with_memory(fn, *args):
  """(run, memory, output) as `compiled`; memory: XLA's plan in bytes, {"temp": temporaries,
  "footprint": arguments + outputs - donated + temporaries}. run.profile(top, **kw) lists
  the program's `top` most expensive XLA operations (`hlo_profile`'s keywords)."""
  exe = jax.jit(fn).lower(*args).compile()
  memory = memory_plan(exe)
  out = jax.block_until_ready(exe(*args))

  def run():
    t = time.perf_counter()
    jax.block_until_ready(exe(*args))
    return time.perf_counter() - t
  run.profile = lambda top=None, **kw: hlo_profile(exe, *args, top=top, **kw)
  return run, memory, out


def medians(runs, repeats):
  """Median seconds of each of `runs`, their calls interleaved so that the load of a shared
  machine, which drifts over seconds, weighs on every program of a ratio alike."""
  times = [[] for _ in runs]
  for _ in range(repeats):
    for t, run in zip(times, runs):
      t.append(run())
  return [statistics.median(t) for t in times]


def timed(fn, *args, repeats=5):
  """(median seconds, temp bytes) of a jitted fn; compiles once first."""
  run, temp, _ = compiled(fn, *args)
  return medians([run], repeats)[0], temp


def matmul_gflops(n=2048, dtype=jnp.float32):
  a = jnp.ones((n, n), dtype)
  sec, _ = timed(lambda x, y: x @ y, a, a)
  return 2 * n ** 3 / sec / 1e9


def op_losses(kernel_size, heads, impl):
  """(attention loss of (q, k, v, rel_h, rel_w), 3x3 conv loss of (input, HWIO filter)): the
  float32 sum of squares of the op's output with `impl`, and of a 3x3 convolution's of the
  same width (what SASA replaces)."""
  def attn_loss(q, k, v, rh, rw):
    y = local_attention(q, k, v, rh, rw, kernel_size=kernel_size, num_heads=heads, impl=impl)
    return jnp.sum(y.astype(jnp.float32) ** 2)

  def conv_loss(x, w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y.astype(jnp.float32) ** 2)
  return attn_loss, conv_loss


def op_programs(size, width, batch, kernel_size, heads, impl, dtype):
  """((attention fwd+bwd, its args), (3x3 conv fwd+bwd, its args)) at one stage shape, on
  random operands: each program returns the gradients of a sum of squares (`op_losses`)."""
  rng = np.random.default_rng(0)
  shape = (batch, size, size, width)
  q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
  rel = jnp.asarray(rng.normal(size=(kernel_size, width // heads // 2)), dtype)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  w = jnp.asarray(rng.normal(size=(3, 3, width, width)) / np.sqrt(9 * width), dtype)
  attn_loss, conv_loss = op_losses(kernel_size, heads, impl)
  return ((jax.grad(attn_loss, argnums=range(5)), (q, k, v, rel, rel)),
          (jax.grad(conv_loss, argnums=(0, 1)), (x, w)))


def op_case(size, width, batch, kernel_size, heads, impl, dtype, repeats):
  (attn, attn_args), (conv, conv_args) = op_programs(size, width, batch, kernel_size, heads,
                                                     impl, dtype)
  run_attn, m_attn, grads = compiled(attn, *attn_args)
  run_conv, m_conv, _ = compiled(conv, *conv_args)
  t_attn, t_conv = medians([run_attn, run_conv], repeats)
  # Algorithmic fwd FLOPS of the op (reference count), x3 for fwd+bwd.
  flops = 3 * count_flops(lambda *a: local_attention(*a, kernel_size=kernel_size,
                                                      num_heads=heads, impl="reference"),
                          *attn_args)
  return dict(t_attn=t_attn, m_attn=m_attn, t_conv=t_conv, m_conv=m_conv, grads=grads,
              profile=run_attn.profile,
              attn_gflops_per_s=flops / t_attn / 1e9,
              conv_gflops_per_s=3 * 2 * batch * size * size * 9 * width * width / t_conv / 1e9)


def bench_ops(args):
  rows = []
  for size, width in args.stages:
    fast = op_case(size, width, args.batch, args.kernel_size, args.heads, args.impl,
                   args.dtype, args.repeats)
    row = {"kind": "op", "shape": f"{args.batch}x{size}x{size}x{width}", "impl": args.impl,
           "dtype": str(args.dtype),
           "ms": 1e3 * fast["t_attn"], "conv_ms": 1e3 * fast["t_conv"],
           "vs_conv": fast["t_attn"] / fast["t_conv"],
           "temp_mb": fast["m_attn"] / 2**20, "conv_temp_mb": fast["m_conv"] / 2**20,
           "gflops_per_s": fast["attn_gflops_per_s"],
           "conv_gflops_per_s": fast["conv_gflops_per_s"]}
    if not args.skip_reference:
      ref = op_case(size, width, args.batch, args.kernel_size, args.heads, "reference",
                    args.dtype, 2)
      row["reference_ms"] = 1e3 * ref["t_attn"]
      row["vs_reference"] = fast["t_attn"] / ref["t_attn"]
      row["reference_temp_mb"] = ref["m_attn"] / 2**20
      # The timed programs' own gradients, compiled as benchmarked: a fast wrong op is no result.
      row["grad_error_vs_reference"] = max(
          relative_error(a, b) for a, b in zip(fast["grads"], ref["grads"]))
    rows.append(row)
    yield row
    if args.hlo_profile:
      yield profile_row(f"op {row['shape']} {args.impl} fwd+bwd", fast["profile"],
                        args.hlo_profile)


def profile_row(program, profile, top):
  """A row of `profile(top)`: a compiled run's `.profile`."""
  return {"kind": "hlo_profile", "program": program,
          "ops": [r._asdict() for r in profile(top)]}


def train_step_case(variant, depth, batch, image_size, impl, dtype="float32", **model_kw):
  """`model_step_case` of a ResNet variant; model_kw: more create_resnet keywords."""
  return model_step_case(resnet(variant, depth, impl, dtype, **model_kw), batch, image_size)


def resnet(variant, depth, impl, dtype, **model_kw):
  return create_resnet(depth, variant, impl=impl, dtype=jnp.dtype(dtype).name, **model_kw)


def tree_bytes(tree) -> int:
  """Bytes of every array in a pytree (arrays or ShapeDtypeStructs)."""
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


class StepCase(NamedTuple):
  run: Callable[[], float]  # seconds of one more step
  temp: int                 # bytes of the compiled step's temporaries
  compile_s: float
  footprint: int            # bytes of its planned device memory (state, batch, temporaries)
  grad_bytes: int           # bytes of the parameters' gradients: what data parallelism
                            # all-reduces every step


def model_step_case(model, batch, image_size, channels=3) -> StepCase:
  """One SGD training step of a classifier on a random batch, compiled and run once."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, image_size, image_size, channels)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, model.num_classes, size=(batch,)), jnp.int32)
  variables = run_once(jax.jit(functools.partial(model.init, train=False)), jax.random.key(0),
                       x[:1])
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = tx.init(variables["params"])

  def step(params, batch_stats, opt_state, x, labels):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss

  args = (variables["params"], variables["batch_stats"], opt_state, x, labels)
  t0 = time.perf_counter()
  run, memory, _ = compiled_with_memory(step, *args)
  return StepCase(run, memory["temp"], time.perf_counter() - t0, memory["footprint"],
                  tree_bytes(variables["params"]))


def attention_layers(model, batch, image_size, channels=3):
  """{(unbound SelfAttention2D, input shape): how many} of the model's attention layers,
  found by tracing its init abstractly."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, SelfAttention2D) and context.method_name == "__call__":
      layer = context.module.clone(parent=None, name=None)
      key = (layer, tuple(args[0].shape))
      found[key] = found.get(key, 0) + 1
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((batch, image_size, image_size, channels), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
  return found


def layer_case(layer: SelfAttention2D, shape):
  """(run of the layer's fwd+bwd, run of its op's fwd+bwd) at input `shape`."""
  x = jnp.ones(shape, layer.dtype)
  params = run_once(jax.jit(layer.init), jax.random.key(0), x)
  layer_grad = jax.grad(lambda p, x: jnp.sum(layer.apply(p, x).astype(jnp.float32) ** 2),
                        argnums=(0, 1))
  b, h, w, _ = shape
  c, heads, kernel = layer.features, layer.num_heads, layer.kernel_size
  q = jnp.ones((b, h, w, c), layer.dtype)
  # The op's operands as the layer passes them: no keys for q.r alone (unless absolute
  # positions stand in for them), relative embeddings only for relative positions.
  keys = None if (layer.attention_type == "qr" and layer.positional_encoding != "absolute") \
      else q
  rel = (jnp.ones((kernel, c // heads // 2), layer.dtype)
         if layer.positional_encoding == "relative" else None)

  def op_loss(q, k, v, rh, rw):
    y = local_attention(q, k, v, rh, rw, kernel_size=kernel, num_heads=heads, impl=layer.impl)
    return jnp.sum(y.astype(jnp.float32) ** 2)
  args = (q, keys, q, rel, rel)
  op_grad = jax.grad(op_loss, argnums=tuple(i for i, a in enumerate(args) if a is not None))
  return compiled(layer_grad, params, x)[0], compiled(op_grad, *args)[0]


def step_breakdown(model, batch, image_size, channels=3, repeats=5, step_run=None):
  """Milliseconds of one training step and of its parts, each part timed on its own (fwd+bwd):
  op: every attention layer's local_attention; projections: the rest of those layers
  (q/k/v, pooling); stem: the network with no residual blocks (stem, pooling, head, loss and
  update); rest: the step minus these (the blocks' convolutions, normalisation, residuals).
  step_run: the model's step as `model_step_case` compiled it, if the caller has it."""
  layers = attention_layers(model, batch, image_size, channels)
  stem_only = model.clone(stage_blocks=(0,) * len(model.stage_blocks))
  step_run = step_run or model_step_case(model, batch, image_size, channels).run
  runs = [step_run, model_step_case(stem_only, batch, image_size, channels).run]
  for layer, shape in layers:
    runs.extend(layer_case(layer, shape))
  secs = medians(runs, repeats)
  step, stem = secs[:2]
  counts = list(layers.values())
  layer_s = sum(n * t for n, t in zip(counts, secs[2::2]))
  op_s = sum(n * t for n, t in zip(counts, secs[3::2]))
  parts = {"op": op_s, "projections": layer_s - op_s, "stem": stem,
           "rest": step - layer_s - stem}
  return {"step_ms": 1e3 * step, **{f"{k}_ms": 1e3 * v for k, v in parts.items()},
          **{f"{k}_share": v / step for k, v in parts.items()},
          "attention_layers": sum(counts)}


def bench_models(args):
  variants = ("baseline", "conv_stem_attention", "full_attention")
  cases = [train_step_case(v, args.depth, args.model_batch, args.image_size, args.impl,
                           args.dtype) for v in variants]
  secs = medians([case.run for case in cases], args.model_repeats)
  base_sec, base_mem = secs[0], cases[0].temp
  for variant, sec, case in zip(variants, secs, cases):
    yield {"kind": "train_step", "model": f"ResNet-{args.depth} {variant}",
           "batch": args.model_batch, "image_size": args.image_size, "impl": args.impl,
           "dtype": str(args.dtype),
           "ms": 1e3 * sec, "temp_mb": case.temp / 2**20, "vs_baseline": sec / base_sec,
           "temp_vs_baseline": case.temp / max(base_mem, 1), "compile_s": case.compile_s}
  if args.hlo_profile:
    for variant, case in zip(variants[1:], cases[1:]):
      yield profile_row(f"train step ResNet-{args.depth} {variant}", case.run.profile,
                        args.hlo_profile)
  if not args.skip_breakdown:
    yield breakdown_row(f"ResNet-{args.depth} full_attention",
                        resnet("full_attention", args.depth, args.impl, args.dtype),
                        args.model_batch, args.image_size, 3, args.model_repeats,
                        step_run=cases[variants.index("full_attention")].run)


def breakdown_row(name, model, batch, image_size, channels, repeats, step_run=None):
  return {"kind": "breakdown", "model": name, "batch": batch, "image_size": image_size,
          **step_breakdown(model, batch, image_size, channels, repeats, step_run)}


def demo_models(impl="auto", depth=None):
  """(attention model, baseline model, batch, image size, channels) of configs/fashion_mnist.py
  (depth: its ResNet's, None = the config's)."""
  from sasa_jax.data import DATASETS  # noqa: PLC0415 (TensorFlow: only for this part)
  from sasa_jax.tools.tables import load_config  # noqa: PLC0415 (configs/ is not a package)
  config = load_config(None)
  kw = dict(config.model, impl=impl, depth=depth or config.model.depth)
  return (create_resnet(**kw), create_resnet(**dict(kw, variant="baseline")),
          config.batch_size, config.dataset.image_size, len(DATASETS[config.dataset.name].mean))


def bench_demo(args):
  attention, baseline, batch, size, channels = demo_models(
      args.impl, depth=QUICK_DEPTH if args.quick else None)
  if args.quick:
    batch = 8
  cases = [model_step_case(m, batch, size, channels) for m in (baseline, attention)]
  (base_s, attn_s) = medians([case.run for case in cases], args.model_repeats)
  yield {"kind": "demo_step", "model": "configs/fashion_mnist.py", "batch": batch,
         "image_size": size, "impl": args.impl, "ms": 1e3 * attn_s,
         "baseline_ms": 1e3 * base_s, "vs_baseline": attn_s / base_s,
         "temp_mb": cases[1].temp / 2**20, "baseline_temp_mb": cases[0].temp / 2**20}
  if args.hlo_profile:
    yield profile_row("train step configs/fashion_mnist.py", cases[1].run.profile,
                      args.hlo_profile)
  if not args.skip_breakdown:
    yield breakdown_row("configs/fashion_mnist.py", attention, batch, size, channels,
                        args.model_repeats, step_run=cases[1].run)


def fmt(row):
  if row["kind"] == "op":
    s = (f"op {row['shape']:>16s} {row['impl']}: {row['ms']:8.1f} ms = {row['vs_conv']:5.2f}x "
         f"3x3 conv ({row['conv_ms']:.1f} ms); temp {row['temp_mb']:.0f} MB vs conv "
         f"{row['conv_temp_mb']:.0f} MB; {row['gflops_per_s']:.1f} GFLOP/s (conv "
         f"{row['conv_gflops_per_s']:.1f})")
    if "vs_reference" in row:
      s += (f"; {1 / row['vs_reference']:.1f}x faster than reference "
            f"({row['reference_ms']:.0f} ms, {row['reference_temp_mb']:.0f} MB)")
      err = row["grad_error_vs_reference"]
      s += (f"; grads match it to {err:.0e}" if err <= GRAD_TOLERANCE[row["dtype"]] else
            f"; WRONG: grads differ from it by {err:.2g} (relative)")
    return s
  if row["kind"] == "train_step":
    return (f"train step {row['model']:32s} batch {row['batch']} @ {row['image_size']}px: "
            f"{row['ms']:8.0f} ms = {row['vs_baseline']:4.2f}x baseline; temp "
            f"{row['temp_mb']:.0f} MB = {row['temp_vs_baseline']:4.2f}x")
  if row["kind"] == "demo_step":
    return (f"train step {row['model']} batch {row['batch']} @ {row['image_size']}px: "
            f"{row['ms']:.0f} ms = {row['vs_baseline']:4.2f}x its baseline variant "
            f"({row['baseline_ms']:.0f} ms); temp {row['temp_mb']:.0f} MB (baseline "
            f"{row['baseline_temp_mb']:.0f} MB)")
  if row["kind"] == "breakdown":
    parts = ", ".join(f"{k} {row[k + '_ms']:.0f} ms ({100 * row[k + '_share']:.0f}%)"
                      for k in ("op", "projections", "stem", "rest"))
    return (f"where a step of {row['model']} (batch {row['batch']}, {row['step_ms']:.0f} ms, "
            f"{row['attention_layers']} attention layers) goes: {parts}")
  if row["kind"] == "hlo_profile":
    return (f"where {row['program']} spends its time, by XLA operation (ms per run under the "
            f"profiler, share, executions):\n"
            + format_rows([HloOpTime(**r) for r in row["ops"]]))
  return f"dense matmul 2048^2 {row['dtype']}: {row['gflops_per_s']:.1f} GFLOP/s on {row['backend']}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--impl", default="auto")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--kernel-size", type=int, default=7)
  p.add_argument("--heads", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=7)
  p.add_argument("--depth", type=int, default=50)
  p.add_argument("--model-batch", type=int, default=4)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--model-repeats", type=int, default=5)
  p.add_argument("--skip-reference", action="store_true")
  p.add_argument("--skip-models", action="store_true")
  p.add_argument("--skip-ops", action="store_true")
  p.add_argument("--skip-demo", action="store_true")
  p.add_argument("--skip-breakdown", action="store_true",
                 help="no per-layer-kind breakdown of the attention steps")
  p.add_argument("--hlo-profile", type=int, default=0, metavar="N",
                 help="after each op and attention step, its N most expensive XLA operations")
  p.add_argument("--format", choices=("text", "json"), default="text")
  p.add_argument("--quick", action="store_true",
                 help="tiny shapes (a smoke test of the benchmark itself, not a measurement)")
  args = p.parse_args(argv)
  args.stages = STAGES
  if args.quick:
    args.stages, args.batch, args.repeats = [(14, 16), (7, 32)], 1, 1
    args.depth, args.model_batch, args.image_size, args.model_repeats = QUICK_DEPTH, 1, 32, 1
  if args.impl == "auto":  # what it resolves to here, without tracing other platforms' kernels
    args.impl = default_impl()
  args.dtype = jnp.dtype(args.dtype)

  def emit(row):
    print(json.dumps(row) if args.format == "json" else fmt(row), flush=True)

  emit({"kind": "matmul", "backend": jax.default_backend(), "dtype": str(args.dtype),
        "gflops_per_s": matmul_gflops(dtype=args.dtype)})
  wrong = []
  if not args.skip_ops:
    for row in bench_ops(args):
      emit(row)
      if row["kind"] == "op" and row.get("grad_error_vs_reference", 0) > GRAD_TOLERANCE[
          row["dtype"]]:
        wrong.append(row["shape"])
  if not args.skip_demo:
    for row in bench_demo(args):
      emit(row)
  if not args.skip_models:
    for row in bench_models(args):
      emit(row)
  if wrong:
    raise SystemExit(f"impl={args.impl} computed wrong gradients at {', '.join(wrong)}")


if __name__ == "__main__":
  main()
