"""The paper's Tables 1 and 3-7 at small scale, on real Fashion-MNIST.

  python -m sasa_jax.tools.tables [--outdir runs/tables] [--seeds 2] [--epochs 1] [--quick]
                                 [--fresh]

Trains, with identical budgets and seeds, ResNet-26 baseline / conv-stem + attention /
full attention (Table 1), conv-stem with attention in groups 1-4 / 2-4 / 3-4 / 4 / none
(Table 3), conv-stem + attention with k = 3, 5, 7 (Table 4), with positional encoding
none / absolute / relative (Table 5) and with logits q.k + q.r or q.r alone (Table 6), and
full attention with the stand-alone, conv-values and spatially aware stems (Table 7);
shared rows are trained once. Writes OUTDIR/report.md (our accuracy, parameters and FLOPS at 28 px next to the
paper's ImageNet numbers) and PNG plots. --quick: a few steps of ResNet-14 at 1/8 width
on a few hundred images, for tests. Runs already finished in OUTDIR are reused (each run
resumes by itself); --fresh deletes them first (after a change to the code they were
trained with).
"""
import argparse
import os
import shutil
import statistics
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sasa_jax.models import QUICK_DEPTH  # noqa: E402
from sasa_jax.tools import paper, runs  # noqa: E402
from sasa_jax.tools.runs import final, read_metrics, series  # noqa: E402

DEPTH = 26
QUICK_MODEL = f",depth={QUICK_DEPTH},width_multiplier=0.125,num_heads=2"  # --quick's model
# name: (config-string arguments, {table: paper row label})
ALL = "variant=conv_stem_attention,attention_groups=1-2-3-4"  # attention in every group
RUNS = {
    "baseline": ("variant=baseline", {1: f"ResNet-{DEPTH} baseline", 3: "attention groups -"}),
    "conv_stem_attention": (ALL, {1: f"ResNet-{DEPTH} conv_stem_attention",
                                  3: "attention groups (1, 2, 3, 4)", 4: "kernel 7x7",
                                  5: "positional relative", 6: "attention qk+qr"}),
    "full_attention": ("variant=full_attention,attention_groups=1-2-3-4",
                       {1: f"ResNet-{DEPTH} full_attention", 7: "stem spatially_aware"}),
    "groups_2_3_4": ("variant=conv_stem_attention,attention_groups=2-3-4",
                     {3: "attention groups (2, 3, 4)"}),
    "groups_3_4": ("variant=conv_stem_attention,attention_groups=3-4",
                   {3: "attention groups (3, 4)"}),
    "groups_4": ("variant=conv_stem_attention,attention_groups=4", {3: "attention groups (4,)"}),
    "kernel3": (f"{ALL},kernel_size=3", {4: "kernel 3x3"}),
    "kernel5": (f"{ALL},kernel_size=5", {4: "kernel 5x5"}),
    "pos_none": (f"{ALL},positional_encoding=none", {5: "positional none"}),
    "pos_absolute": (f"{ALL},positional_encoding=absolute", {5: "positional absolute"}),
    "qr_only": (f"{ALL},attention_type=qr", {6: "attention qr"}),
    "stem_stand_alone": ("variant=full_attention,attention_groups=1-2-3-4,stem_type=stand_alone",
                         {7: "stem stand_alone"}),
    "stem_conv_values": ("variant=full_attention,attention_groups=1-2-3-4,stem_type=conv_values",
                         {7: "stem conv_values"}),
}
TABLE_TITLES = {1: "Table 1: model variants (ResNet-26)",
                3: "Table 3: which groups use attention (conv stem)",
                4: "Table 4: spatial extent k", 5: "Table 5: positional encoding",
                6: "Table 6: attention type", 7: "Table 7: attention stem (full attention)"}


def load_config(arg: str):
  return runs.load_config("fashion_mnist.py", arg)


def run_config(name, seed, args):
  arg = RUNS[name][0] + f",seed={seed}"
  if args.quick:
    arg += QUICK_MODEL
  config = load_config(arg)
  if args.data_dir:
    config.dataset.data_dir = args.data_dir
  if args.quick:
    config.dataset.train_split, config.dataset.eval_split = "train[:256]", "test[:200]"
    config.batch_size, config.num_train_steps = 32, 4
    config.eval_every_steps, config.log_every_steps = 2, 1
  else:
    config.num_epochs = args.epochs
    steps = int(args.epochs * 60_000 // config.batch_size)
    config.eval_every_steps = max(1, steps // 4)  # four points per accuracy curve
  config.checkpoint_every_steps = 10_000
  return config


def model_cost_28px(config):
  from sasa_jax.models import create_resnet
  from sasa_jax.tools.flops import model_cost
  model = create_resnet(**{**config.model, "impl": "reference"})
  return model_cost(model, image_size=28, channels=1)


def train_all(args) -> dict:
  from sasa_jax import train
  results = {}
  for name in RUNS:
    for seed in range(args.seeds):
      workdir = os.path.join(args.outdir, f"{name}_seed{seed}")
      config = run_config(name, seed, args)
      t0 = time.time()
      if args.fresh and os.path.exists(workdir):
        shutil.rmtree(workdir)
      train.train_and_evaluate(config, workdir)
      print(f"[tables] {name} seed {seed}: test accuracy "
            f"{final(read_metrics(workdir), 'eval/accuracy'):.4f} ({time.time() - t0:.0f} s)",
            flush=True)
      results.setdefault(name, {"workdirs": [], "config": config})["workdirs"].append(workdir)
  for name, res in results.items():
    accs = [final(read_metrics(w), "eval/accuracy") for w in res["workdirs"]]
    res["acc_mean"] = statistics.mean(accs)
    res["acc_spread"] = (max(accs) - min(accs)) / 2
    res["accs"] = accs
    res["flops"], res["params"] = model_cost_28px(res["config"])
  return results


def _paper_row(table, label):
  return next(r for r in paper.TABLES[table] if r.label == label)


ORDERING = {  # the paper's claim per table, checked on our means
    1: ("conv_stem_attention", "baseline",
        "conv-stem + attention beats the baseline with fewer parameters"),
    3: ("groups_2_3_4", "conv_stem_attention",
        "convolution in group 1 and attention in groups 2-4 beats attention in every group"),
    4: ("conv_stem_attention", "kernel3", "k=7 beats k=3"),
    5: ("conv_stem_attention", "pos_none", "relative positions beat no positional encoding"),
    6: ("conv_stem_attention", "qr_only", "content and position logits beat position alone"),
    7: ("full_attention", "stem_stand_alone",
        "the spatially aware stem beats the stand-alone attention stem"),
}


def write_report(results, args) -> str:
  lines = ["# SASA tables at small scale (Fashion-MNIST, 28 px)", "",
           f"ResNet-{QUICK_DEPTH if args.quick else DEPTH}, small-image stems, "
           f"{args.seeds} seed(s), "
           f"{'--quick' if args.quick else f'{args.epochs} epoch(s)'} per run, identical "
           "budgets. Accuracy: mean ± half-range over seeds on the full test split"
           f"{' (200 images in --quick)' if args.quick else ''}. MFLOPS and parameters: "
           "our model at 28 px; the paper's columns are ImageNet at 224 px.", ""]
  for table in TABLE_TITLES:
    lines += [f"## {TABLE_TITLES[table]}", "",
              "| row | our test acc | our params | our MFLOPS | paper top-1 | paper params M "
              "| paper GFLOPS |", "|---|---|---|---|---|---|---|"]
    for name, (_, labels) in RUNS.items():
      if table not in labels:
        continue
      res, row = results[name], _paper_row(table, labels[table])
      lines.append(f"| {labels[table]} ({name}) | {res['acc_mean']:.4f} ± {res['acc_spread']:.4f}"
                   f" | {res['params'] / 1e6:.3f}M | {res['flops'] / 1e6:.1f} | {row.top1} | "
                   f"{row.params_m if row.params_m is not None else '-'} | {row.gflops} |")
    better, worse, claim = ORDERING[table]
    b, w = results[better], results[worse]
    holds = b["acc_mean"] > w["acc_mean"]
    # Clear only when the gap exceeds both rows' half-ranges over seeds.
    clear = abs(b["acc_mean"] - w["acc_mean"]) > b["acc_spread"] + w["acc_spread"]
    margin = ("" if args.seeds < 2 else
              ", a gap larger than the seeds' spread" if clear else
              ", but the gap is within the seeds' spread: not a clear result")
    lines += ["", f"The paper's ordering ({claim}) {'holds' if holds else 'does not hold'} here: "
              f"{b['acc_mean']:.4f} vs {w['acc_mean']:.4f}{margin}.", ""]
  lines += ["![accuracy vs step](accuracy_vs_step.png)", "",
            "![accuracy vs cost](accuracy_vs_cost.png)", ""]
  path = os.path.join(args.outdir, "report.md")
  with open(path, "w") as f:
    f.write("\n".join(lines))
  return path


def plot(results, outdir):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, res in results.items():
    steps, acc = series(read_metrics(res["workdirs"][0]), "eval/accuracy")
    ax.plot(steps, acc, marker="o", label=name)
  ax.set_xlabel("training step")
  ax.set_ylabel("test accuracy (seed 0)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "accuracy_vs_step.png"), dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for name, res in results.items():
    axes[0].errorbar(res["flops"] / 1e6, res["acc_mean"], yerr=res["acc_spread"], fmt="o")
    axes[0].annotate(name, (res["flops"] / 1e6, res["acc_mean"]), fontsize=7)
    axes[1].errorbar(res["params"] / 1e6, res["acc_mean"], yerr=res["acc_spread"], fmt="o")
    axes[1].annotate(name, (res["params"] / 1e6, res["acc_mean"]), fontsize=7)
  for r in (r for table in TABLE_TITLES for r in paper.TABLES[table]):
    axes[2].scatter(r.gflops, r.top1, marker="s", c=f"C{r.table}", s=18)
    axes[2].annotate(r.label.replace("ResNet-", "R"), (r.gflops, r.top1), fontsize=6)
  axes[0].set(xlabel="our MFLOPS (28 px)", ylabel="test accuracy", title="ours: accuracy vs FLOPS")
  axes[1].set(xlabel="our parameters (M)", ylabel="test accuracy", title="ours: accuracy vs params")
  axes[2].set(xlabel="paper GFLOPS (224 px)", ylabel="ImageNet top-1 (%)",
              title="the paper (Tables 1, 3-7)")
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "accuracy_vs_cost.png"), dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--outdir", default="runs/tables")
  parser.add_argument("--seeds", type=int, default=2)
  parser.add_argument("--epochs", type=float, default=1.0)
  parser.add_argument("--data-dir", default=None, help="TFDS data_dir (default: TFDS's)")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--fresh", action="store_true", help="retrain runs already in OUTDIR")
  args = parser.parse_args(argv)
  from sasa_jax.logs import quiet_orbax
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  quiet_orbax()
  os.makedirs(args.outdir, exist_ok=True)
  start = time.time()
  results = train_all(args)
  plot(results, args.outdir)
  print(write_report(results, args))
  print(f"[tables] total wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
