"""The one local-attention contract and its implementations."""
import collections
import functools

import jax
from jax.sharding import PartitionSpec as P

from sasa_jax.ops import local_attention_cpu as cpu_kernel
from sasa_jax.ops.blocked import (ACCELERATOR_CHUNK_LOGITS, local_attention_blocked,
                                  lowering_platform, platform_layout)
from sasa_jax.ops.pallas_attention import local_attention_pallas
from sasa_jax.ops.reference import local_attention_reference
from sasa_jax.ops.shifted import local_attention_shifted, logits_count


def _cpu(q, k, v, rel_h, rel_w, *, kernel_size, num_heads):
  """impl="cpu": the compiled kernel, except where every window covers the whole map (the
  last stages of small-image models): that is dense attention, which the blocked form runs as
  one block of batched matmuls, faster there (docs/performance.md)."""
  _, h, w, _ = q.shape
  if kernel_size // 2 >= max(h, w) - 1:
    return local_attention_blocked(q, k, v, rel_h, rel_w, kernel_size=kernel_size,
                                   num_heads=num_heads, platform="cpu")
  return cpu_kernel.local_attention_cpu(q, k, v, rel_h, rel_w, kernel_size=kernel_size,
                                        num_heads=num_heads)


IMPLEMENTATIONS = {
    "reference": local_attention_reference,
    "xla": local_attention_blocked,
    "pallas": local_attention_pallas,
    "cpu": _cpu,
    "shifted": local_attention_shifted,
}
IMPLS = ("auto",) + tuple(IMPLEMENTATIONS)


# impl="auto" per lowering platform (jax's names: "cpu", "cuda", "rocm", "tpu"): a platform
# not named here gets "xla", the blocked XLA form. TPU: XLA, because the Mosaic kernels have
# never been timed on a TPU, and libtpu's XLA:TPU (tools/tpu_compile) plans them 2.9-3.9x the
# XLA form's HBM temporaries at ResNet-50's 56x56x64 stage (head dims of 8 stored in 128
# lanes): docs/models.md. GPU: XLA, which beat
# the Triton kernels 1.7-13x in fwd+bwd time on an H200 (docs/gpu.md). CPU: the compiled C++
# kernel (local_attention_cpu.cc) where it builds, else XLA (Pallas runs only in interpret
# mode there, for tests).
ACCELERATOR_IMPL: dict[str, str] = {}
# The shifted form (ops/shifted.py) per lowering platform: on maps of at least this many
# pixels (H x W), impl="auto" lowered for that platform runs it instead of the blocked form
# while its logits (`shifted.logits_count`, per device) are at most SHIFTED_MAX_LOGITS. A
# platform not named here never runs it under "auto"; a device's timings set it
# (tools/gpu_check's decision line names the value). TPU's candidate, by libtpu's cost
# model alone, is 56 * 56 (docs/models.md, "The shifted form").
SHIFTED_FROM_PIXELS: dict[str, int] = {}
# The shifted form runs unchunked, so its temporaries grow with its logits: impl="auto" takes
# it only up to the blocked form's chunk bound on accelerators (at 56 x 56, k = 7 and 8
# heads: 49 images per device). Past it, at 128 images per chip, the conv-stem attention
# ResNet-50's step would not fit a v5e's 16 GiB (docs/models.md).
SHIFTED_MAX_LOGITS = ACCELERATOR_CHUNK_LOGITS


def cpu_impl() -> str:
  """What `impl="auto"` runs on the CPU: "cpu" where the kernel builds, else "xla"."""
  return "cpu" if cpu_kernel.available() else "xla"


def default_impl(backend: str | None = None, shape=None, kernel_size: int | None = None,
                 num_heads: int | None = None) -> str:
  """The implementation `impl="auto"` uses on `backend` (default: jax's default backend;
  "gpu" is read as CUDA) for q of `shape` [B, H, W, C] (per device) with `kernel_size` and
  `num_heads` (`shape` None: any shape that `SHIFTED_FROM_PIXELS` does not select)."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    return cpu_impl()
  platform = lowering_platform(backend)
  least = SHIFTED_FROM_PIXELS.get(platform)
  if shape is not None and least is not None and shape[1] * shape[2] >= least:
    if kernel_size is None or num_heads is None:
      raise ValueError("default_impl: a shape needs its kernel_size and num_heads, got "
                       f"kernel_size={kernel_size!r}, num_heads={num_heads!r}")
    if logits_count(shape, kernel_size, num_heads) <= SHIFTED_MAX_LOGITS:
      return "shifted"
  return ACCELERATOR_IMPL.get(platform, "xla")


# The lowering platforms `impl="auto"` tells apart (jax.lax.platform_dependent's names).
PLATFORMS = ("tpu", "cuda", "rocm", "cpu")


def _auto(q, k, v, rel_h, rel_w, *, kernel_size, num_heads):
  """impl="auto", chosen per lowering platform (so one jitted function exports for each):
  the blocked op's blocks and chunks too are sized for the platform, not for the tracing
  host. The default branch (any platform not named) is the blocked form as most of the
  platforms that run it plan it; a platform that would trace otherwise gets its own."""
  kw = dict(kernel_size=kernel_size, num_heads=num_heads)
  impls = {p: default_impl(p, q.shape, **kw) for p in PLATFORMS}

  def runs_as(platform):
    impl = impls[platform]
    if impl == "xla":
      return impl, platform_layout(q.shape, kernel_size, num_heads, platform)
    if impl == "pallas":
      return impl, "tpu" if platform == "tpu" else "gpu"
    return impl, None

  def branch(platform, impl):
    if impl == "pallas":  # that platform's compiled kernels, with no second dispatch
      return functools.partial(local_attention_pallas, platform=runs_as(platform)[1], **kw)
    if impl == "xla":
      return functools.partial(local_attention_blocked, platform=platform, **kw)
    return functools.partial(IMPLEMENTATIONS[impl], **kw)
  keys = {p: runs_as(p) for p in PLATFORMS}
  blocked = collections.Counter(keys[p] for p in PLATFORMS if impls[p] == "xla")
  common = blocked.most_common(1)[0][0] if blocked else None  # ties: the first platform's
  default = next((p for p in PLATFORMS if keys[p] == common), "tpu")
  branches = {p: branch(p, impls[p]) for p in PLATFORMS if keys[p] != common}
  return jax.lax.platform_dependent(q, k, v, rel_h, rel_w, **branches,
                                    default=branch(default, "xla"))


def _check(q, k, v, rel_h, rel_w, kernel_size, num_heads, impl):
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
  if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
  if q.ndim != 4:
    raise ValueError(f"q must have shape [B, H, W, C], got shape {q.shape}")
  c = q.shape[-1]
  if not isinstance(num_heads, int) or num_heads < 1 or c % num_heads:
    raise ValueError(f"num_heads={num_heads!r} must be a positive int dividing the channels "
                     f"C={c} of q (shape {q.shape})")
  d = c // num_heads
  for name, x in (("k", k), ("v", v)):
    if x is None and name == "v":
      raise ValueError("v must be an array of shape [B, H, W, C], got None")
    if x is not None and x.shape != q.shape:
      raise ValueError(f"{name} must have q's shape {q.shape}, got shape {x.shape}")
    if x is not None and x.dtype != q.dtype:
      raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
  if (rel_h is None) != (rel_w is None):
    raise ValueError("rel_h and rel_w must both be arrays or both be None, got "
                     f"rel_h={'None' if rel_h is None else rel_h.shape}, "
                     f"rel_w={'None' if rel_w is None else rel_w.shape}")
  if rel_h is not None:
    if d % 2:
      raise ValueError(f"relative embeddings need an even head dimension d = C / num_heads, "
                       f"got d={d} (C={c}, num_heads={num_heads})")
    for name, x in (("rel_h", rel_h), ("rel_w", rel_w)):
      if x.shape != (kernel_size, d // 2):
        raise ValueError(f"{name} must have shape [kernel_size, d // 2] = "
                         f"{(kernel_size, d // 2)}, got shape {x.shape}")
      if x.dtype != q.dtype:
        raise ValueError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}")
  if k is None and rel_h is None:
    raise ValueError("k=None (positional logits only) needs rel_h and rel_w")


def local_attention(q, k, v, rel_h=None, rel_w=None, *, kernel_size: int, num_heads: int,
                    impl: str = "auto"):
  """Multi-head self-attention of every pixel over its k x k neighbourhood (SASA).

  For the query at (y, x) and every key at (y + dy, x + dx) with |dy|, |dx| <= r =
  kernel_size // 2 that lies inside the image, per head of dimension d = C / num_heads:
      logit = q.k + q[:d/2].rel_h[dy + r] + q[d/2:].rel_w[dx + r]
  and the output is the softmax(logit)-weighted sum of the values. Keys outside the
  image get probability exactly 0. No 1/sqrt(d) scaling is applied.

  Args:
    q, v: [B, H, W, C]; head n owns channels [n d, (n + 1) d).
    k: [B, H, W, C], or None to use the positional term alone (SASA Table 6, "q.r").
    rel_h, rel_w: [kernel_size, d // 2] each, shared by all heads; None for no
      positional term.
    kernel_size: odd window size k.
    num_heads: number of heads N; must divide C.
    impl: "reference" (oracle), "xla" (blocked matmuls), "pallas" (fused kernels; interpret
      mode on CPU), "cpu" (the compiled C++ kernel; CPU only), "shifted" (k² shifted slices
      of flat maps, no matmul), or "auto" (`default_impl` of the platform the function is
      lowered for).
  Returns:
    [B, H, W, C] in q's dtype (float32 softmax and accumulation inside).
  """
  _check(q, k, v, rel_h, rel_w, kernel_size, num_heads, impl)
  fn = functools.partial(_auto if impl == "auto" else IMPLEMENTATIONS[impl],
                         kernel_size=kernel_size, num_heads=num_heads)
  if impl in ("auto", "pallas", "cpu"):
    return _per_batch_shard(fn, q, k, v, rel_h, rel_w)
  return fn(q, k, v, rel_h, rel_w)


def _per_batch_shard(fn, q, k, v, rel_h, rel_w):
  """fn on each device's share of the batch, under the mesh in context (`jax.set_mesh`).

  XLA's SPMD partitioner cannot split a kernel call (a Mosaic, Triton or FFI custom call): jax
  refuses to lower a Mosaic kernel with batch-sharded operands, and a kernel call left to
  the partitioner would run on the whole batch gathered onto every device. Every image
  attends only within itself, so the op maps over batch shards with no
  communication; the relative embeddings are replicated and their gradient is summed over
  the shards by shard_map's transpose. Without a mesh, inside a manual (shard_map) region,
  or for a batch the mesh does not divide (model.init's batch of 1), fn runs as it is.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes or q.shape[0] % mesh.size:
    return fn(q, k, v, rel_h, rel_w)
  axes = tuple(mesh.axis_names)
  arrays = {name: x for name, x in zip("q k v rel_h rel_w".split(), (q, k, v, rel_h, rel_w))
            if x is not None}
  specs = {name: P() if name.startswith("rel") else P(axes) for name in arrays}

  def per_shard(arrays):
    return fn(*(arrays.get(name) for name in "q k v rel_h rel_w".split()))
  # check_vma=False: kernel calls carry no varying-axes types; the transpose then sums the
  # replicated inputs' cotangents over the shards itself.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(specs,), out_specs=P(axes),
                       check_vma=False)(arrays)
