"""Where a trained SASA layer looks: attention of chosen query pixels, per head.

  python -m sasa_jax.tools.attention_maps --workdir runs/demo --image 0
  python -m sasa_jax.tools.attention_maps --workdir runs/demo --image 7 --layer group3_block1 \\
      --queries 3,3 10,4 --out maps.png

Loads the run's config.json and latest checkpoint, runs image N of its evaluation split
through the model, takes the layer's queries and keys (captured Flax intermediates) and its
relative embeddings, and draws each query pixel's softmax over its k x k window, per head,
on top of the image (the layer's grid is stretched over the input image). The workdir may
be local or gs://; the PNG goes into it unless --out says otherwise.
"""
import argparse

import jax
import matplotlib
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sasa_jax import data as data_lib  # noqa: E402
from sasa_jax.ops.reference import window_logits  # noqa: E402
from sasa_jax.tools.runs import load_trained, save_figure  # noqa: E402


def window_probabilities(q, k, rel_h, rel_w, y, x, kernel_size, num_heads):
  """[heads, k, k] softmax of query (y, x) over its window (outside the image: 0), from the
  op's own logit formula (`sasa_jax.ops.reference.window_logits`).

  q, k: [H, W, C] of one image (k None: positional logits only); rel_h, rel_w: [k, d/2] or None."""
  logits = window_logits(q[None], None if k is None else k[None], rel_h, rel_w,
                         kernel_size=kernel_size, num_heads=num_heads)[0, y, x]  # [N, k*k]
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  return probs.reshape(num_heads, kernel_size, kernel_size)


def attention_layers(params) -> list[str]:
  return [name for name in params if "attention" in params[name]]


def example_split(splits, split: str, index: int) -> str:
  """The TFDS split of example `index` of `split` (any spec: "test", "test[:200]",
  "train[96%:]", "a+b"), e.g. "train[1229921:1229922]"; splits: builder.info.splits."""
  offset = index
  for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits):
    start = part.from_ or 0
    stop = splits[part.splitname].num_examples if part.to is None else part.to
    if 0 <= offset < stop - start:
      return f"{part.splitname}[{start + offset}:{start + offset + 1}]"
    offset -= stop - start
  raise ValueError(f"--image={index} is out of range: split {split!r} has "
                   f"{index - offset} images")


def load_eval_image(config, index: int):
  """Image `index` of the run's evaluation split: (model inputs [1, S, S, C], pixels in
  [0, 1] [S, S, C], label)."""
  builder = data_lib.get_builder(config.dataset.name, config.dataset.data_dir)
  ds = data_lib.eval_dataset(builder, split=example_split(builder.info.splits,
                                                          config.dataset.eval_split, index),
                             per_host_batch=1, image_size=config.dataset.image_size, num_steps=1)
  batch = next(ds.as_numpy_iterator())
  inputs = np.asarray(data_lib.normalize(batch["image"], config.dataset.name))
  return inputs, batch["image"][0] / 255.0, int(batch["label"][0])


def draw(workdir, image_index, layer=None, queries=None, out=None):
  trained = load_trained(workdir)
  config, step, variables, model = (trained.config, trained.step, trained.variables,
                                    trained.model)
  layers = attention_layers(variables["params"])
  if not layers:
    raise ValueError(f"{workdir}: the model has no attention layer")
  layer = layer or layers[0]
  if layer not in layers:
    raise ValueError(f"--layer={layer!r} is not an attention layer; choose one of {layers}")
  image, pixels, label = load_eval_image(config, image_index)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, capture_intermediates=True,
                                           mutable=["intermediates"]))
  _, state = apply(variables, image)
  inter = state["intermediates"][layer]["attention"]
  p = variables["params"][layer]["attention"]
  q = np.asarray(inter["query"]["__call__"][0])[0]
  k = np.asarray(inter["key"]["__call__"][0])[0] if "key" in inter else None
  settings = model.group_attention[int(layer.split("_")[0][len("group"):]) - 1]
  ks, heads = settings.kernel_size, settings.num_heads
  rel_h = np.asarray(p["rel_h"]) if "rel_h" in p else None
  rel_w = np.asarray(p["rel_w"]) if "rel_w" in p else None
  gh, gw = q.shape[:2]
  queries = queries or [(gh // 4, gw // 4), (gh // 2, gw // 2), (3 * gh // 4, 3 * gw // 4)]
  sh, sw = pixels.shape[0] / gh, pixels.shape[1] / gw  # image pixels per layer cell
  fig, axes = plt.subplots(len(queries), heads + 1, figsize=(2 * (heads + 1), 2 * len(queries)),
                           squeeze=False)
  r = ks // 2
  for row, (y, x) in enumerate(queries):
    if not (0 <= y < gh and 0 <= x < gw):
      raise ValueError(f"query ({y}, {x}) is outside the layer's {gh}x{gw} grid")
    probs = window_probabilities(q, k, rel_h, rel_w, y, x, ks, heads)
    axes[row, 0].imshow(pixels.squeeze(), cmap="gray")
    axes[row, 0].add_patch(plt.Rectangle((x * sw - 0.5, y * sh - 0.5), sw, sh, fill=False,
                                         ec="red", lw=2))
    axes[row, 0].set_title(f"query ({y},{x})", fontsize=8)
    for n in range(heads):
      grid = np.zeros((gh, gw))
      for i in range(ks):
        for j in range(ks):
          if 0 <= y + i - r < gh and 0 <= x + j - r < gw:
            grid[y + i - r, x + j - r] = probs[n, i, j]
      ax = axes[row, n + 1]
      ax.imshow(pixels.squeeze(), cmap="gray")
      ax.imshow(grid, cmap="inferno", alpha=0.6, extent=(-0.5, pixels.shape[1] - 0.5,
                                                          pixels.shape[0] - 0.5, -0.5))
      ax.add_patch(plt.Rectangle((x * sw - 0.5, y * sh - 0.5), sw, sh, fill=False, ec="cyan"))
      ax.set_title(f"head {n}", fontsize=8)
  for ax in axes.flat:
    ax.axis("off")
  fig.suptitle(f"{layer} (k={ks}, {heads} heads, {gh}x{gw} grid), image {image_index} of "
               f"{config.dataset.eval_split} "
               f"(label {label}), step {step}", fontsize=9)
  fig.tight_layout()
  out = save_figure(
      fig, out or epath.Path(workdir) / f"attention_image{image_index}_{layer}.png")
  plt.close(fig)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--image", type=int, default=0, help="index in the eval split")
  parser.add_argument("--layer", default=None, help="e.g. group3_block1 (default: first)")
  parser.add_argument("--queries", nargs="*", default=None, help="y,x cells of the layer grid")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  queries = [tuple(int(t) for t in s.split(",")) for s in args.queries] if args.queries else None
  print(draw(args.workdir, args.image, args.layer, queries, args.out))


if __name__ == "__main__":
  main()
