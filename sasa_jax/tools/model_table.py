"""Prints the paper's model tables next to the FLOPS and parameters of our models.

  python -m sasa_jax.tools.model_table                  # Table 1 and ablations 3-7
  python -m sasa_jax.tools.model_table --tables 1 --format json
  python -m sasa_jax.tools.model_table --breakdown --depth 26 --variant full_attention
  python -m sasa_jax.tools.model_table --detection [--format json]   # Table 2 (RetinaNet)

FLOPS are counted from the traced model (see sasa_jax.tools.flops) with the reference
attention, at batch 1 and 224 x 224 px (Table 2: 640 x 640); GFLOPS = 2 x multiply-adds / 1e9.
"""
import argparse
import json
import sys

import jax

from sasa_jax.models import create_resnet
from sasa_jax.models.factory import create_retinanet
from sasa_jax.tools import paper
from sasa_jax.tools.flops import model_cost


def measure(row: paper.PaperRow, image_size: int = 224) -> dict:
  """One JSON-ready row: the paper's numbers, ours and the differences."""
  flops, params = model_cost(create_resnet(**row.model, impl="reference"), image_size)
  out = {"table": row.table, "label": row.label, "depth": row.model["depth"],
         "variant": row.model["variant"], **row.extra,
         "gflops": round(flops / 1e9, 3), "params_m": round(params / 1e6, 3),
         "paper_gflops": row.gflops, "paper_params_m": row.params_m, "paper_top1": row.top1}
  out["gflops_rel_diff"] = round(out["gflops"] / row.gflops - 1, 4)
  if row.params_m is not None:
    out["params_m_diff"] = round(out["params_m"] - row.params_m, 3)
  return out


def measure_detection(row: paper.DetectionRow, image_size: int) -> dict:
  """One JSON-ready Table 2 row: backbone, heads, ours and the paper's numbers."""
  model = create_retinanet(row.backbone, row.heads, impl="reference")
  flops, params = model_cost(model, image_size)
  out = {"table": 2, "backbone": row.backbone, "heads": row.heads, "image_size": image_size,
         "gflops": round(flops / 1e9, 2), "params_m": round(params / 1e6, 3),
         "paper_gflops": row.gflops, "paper_params_m": row.params_m,
         "paper_coco_ap": list(row.coco)}
  out["gflops_rel_diff"] = round(out["gflops"] / row.gflops - 1, 4)
  out["params_m_rel_diff"] = round(out["params_m"] / row.params_m - 1, 4)
  return out


def format_detection(rows: list[dict]) -> str:
  header = (f"{'heads + FPN':12s} {'backbone':20s} {'GFLOPS':>7s} {'paper':>6s} {'diff':>7s}"
            f"   {'params M':>8s} {'paper':>6s} {'diff':>7s}   {'paper AP':>8s}")
  lines = [f"Table 2 (RetinaNet, {rows[0]['image_size']} x {rows[0]['image_size']} px)", header,
           "-" * len(header)]
  for r in rows:
    lines.append(f"{r['heads']:12s} {r['backbone']:20s} {r['gflops']:7.1f} "
                 f"{r['paper_gflops']:6.0f} {100 * r['gflops_rel_diff']:+6.1f}%   "
                 f"{r['params_m']:8.2f} {r['paper_params_m']:6.1f} "
                 f"{100 * r['params_m_rel_diff']:+6.1f}%   {r['paper_coco_ap'][0]:8.1f}")
  return "\n".join(lines)


def format_text(rows: list[dict]) -> str:
  lines, table = [], None
  header = (f"{'row':34s} {'GFLOPS':>7s} {'paper':>6s} {'diff':>7s}   "
            f"{'params M':>8s} {'paper':>6s} {'diff':>6s}   {'paper top-1':>11s}")
  for r in rows:
    if r["table"] != table:
      table = r["table"]
      lines += ["", f"Table {table}", header, "-" * len(header)]
    pm = "" if r["paper_params_m"] is None else f"{r['paper_params_m']:6.1f}"
    pd = "" if "params_m_diff" not in r else f"{r['params_m_diff']:+6.2f}"
    lines.append(f"{r['label']:34s} {r['gflops']:7.2f} {r['paper_gflops']:6.1f} "
                 f"{100 * r['gflops_rel_diff']:+6.1f}%   {r['params_m']:8.2f} {pm:>6s} {pd:>6s}"
                 f"   {r['paper_top1']:11.1f}")
  return "\n".join(lines[1:])


def breakdown(depth: int, variant: str, image_size: int) -> str:
  """clu's per-module parameter table for one model."""
  from clu import parameter_overview
  model = create_resnet(depth, variant)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jax.numpy.zeros((1, image_size, image_size, 3))))
  return parameter_overview.get_parameter_overview(variables["params"], include_stats=False)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tables", default="1,3,4,5,6,7",
                      help="comma-separated paper tables among 1,3,4,5,6,7")
  parser.add_argument("--format", choices=("text", "json"), default="text")
  parser.add_argument("--image-size", type=int, default=None,
                      help="input size (default 224; 640 with --detection)")
  parser.add_argument("--detection", action="store_true",
                      help="Table 2: the five RetinaNet rows instead of the ResNet tables")
  parser.add_argument("--breakdown", action="store_true",
                      help="print clu's per-module parameter overview of --depth/--variant")
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--variant", default="full_attention")
  args = parser.parse_args(argv)
  if args.detection:
    size = args.image_size or paper.DETECTION_IMAGE_SIZE
    rows = []
    for row in paper.TABLE2:
      rows.append(measure_detection(row, size))
      if args.format == "json":
        print(json.dumps(rows[-1]), flush=True)
    if args.format == "text":
      print(format_detection(rows))
    return
  args.image_size = args.image_size or 224
  if args.breakdown:
    print(breakdown(args.depth, args.variant, args.image_size))
    return
  try:
    tables = [int(t) for t in args.tables.split(",")]
  except ValueError:
    parser.error(f"--tables={args.tables!r}: expected comma-separated ints")
  bad = [t for t in tables if t not in paper.TABLES]
  if bad:
    parser.error(f"--tables: {bad} not among {sorted(paper.TABLES)}")
  rows = []
  for t in tables:
    for row in paper.TABLES[t]:
      rows.append(measure(row, args.image_size))
      if args.format == "json":
        print(json.dumps(rows[-1]), flush=True)
  if args.format == "text":
    print(format_text(rows))


if __name__ == "__main__":
  sys.exit(main())
