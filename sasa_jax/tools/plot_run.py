"""Draws the curves of one or more runs' metrics.jsonl (local or gs:// workdirs).

  python -m sasa_jax.tools.plot_run runs/demo runs/other --out curves.png
"""
import argparse

import matplotlib
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sasa_jax.tools.runs import read_metrics, save_figure, series  # noqa: E402

PANELS = (("train/loss", "train loss"), ("eval/accuracy", "test accuracy"),
          ("learning_rate", "learning rate"))


def plot_runs(workdirs, out: str, labels=None) -> str:
  """One panel per metric, one line per run; returns the PNG path."""
  fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
  for i, workdir in enumerate(workdirs):
    rows = read_metrics(workdir)
    label = labels[i] if labels else epath.Path(workdir).name
    for ax, (key, title) in zip(axes, PANELS):
      steps, values = series(rows, key)
      if steps:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
      ax.set_title(title)
      ax.set_xlabel("step")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  out = save_figure(fig, out, dpi=110)
  plt.close(fig)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--out", default="curves.png")
  args = parser.parse_args(argv)
  for w in args.workdirs:
    if not (epath.Path(w) / "metrics.jsonl").exists():
      parser.error(f"{w}: no metrics.jsonl")
  print(plot_runs(args.workdirs, args.out))


if __name__ == "__main__":
  main()
