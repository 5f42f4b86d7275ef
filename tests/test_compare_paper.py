"""tools/compare_paper: runs placed in the paper's rows, from their workdirs."""
import json

from tests import helpers


def _rows():
  from sasa_jax.tools import compare_paper
  return compare_paper.paper_rows()


def _find(rows, table, label):
  (row,) = [r for r in rows if r.table == table and r.label == label]
  return row


def _run(config, values, eval_step=10, total_steps=10, workdir="/runs/x"):
  from sasa_jax.tools.compare_paper import Run
  return Run(workdir, config, values, eval_step, total_steps)


def test_each_rows_config_string_trains_that_row_and_the_rows_of_the_same_network():
  """Every row's command builds a network; a run of it counts for its row and for exactly
  the rows of other tables that the paper measured on the same network and split."""
  from sasa_jax.tools.compare_paper import counts_for
  rows = _rows()
  assert len(rows) == 35 and {r.table for r in rows} == {1, 2, 3, 4, 5, 6, 7}
  same = {}
  for row in rows:
    run = _run(row.config, {})
    counted = {(r.table, r.label) for r in rows if counts_for(run, r)}
    assert (row.table, row.label) in counted, row
    # Within a table each row is its own network.
    assert [t for t, _ in counted].count(row.table) == 1, counted
    same[(row.table, row.label)] = counted
  assert same[(4, "kernel 7x7")] == {(1, "ResNet-50 conv_stem_attention"), (4, "kernel 7x7"),
                                     (6, "attention qk+qr")}
  assert same[(3, "attention groups (1, 2, 3, 4)")] == {(3, "attention groups (1, 2, 3, 4)"),
                                                        (5, "positional relative")}
  assert same[(7, "stem spatially_aware")] == {(1, "ResNet-50 full_attention"),
                                               (7, "stem spatially_aware")}
  assert same[(3, "attention groups -")] == {(3, "attention groups -")}
  assert all(len(v) == 1 for (t, _), v in same.items() if t == 2)


def test_the_report_averages_finished_runs_and_names_what_differs():
  from sasa_jax.tools import compare_paper
  from sasa_jax.tools.runs import load_config
  rows = _rows()
  base = load_config("imagenet.py", "depth=50,variant=baseline")
  seeds = [_run(base, {"top-1": 76.0}, workdir="/r/base_s0"),
           _run(base, {"top-1": 77.0}, workdir="/r/base_s1")]
  short = load_config("imagenet.py", "depth=26,variant=full_attention")
  short.num_epochs = 90.0
  partial = _run(short, {"top-1": 70.25}, eval_step=5_000, total_steps=28_150,
                 workdir="/r/r26_full")
  held_out = _run(load_config("imagenet.py", "depth=50,variant=baseline,holdout=true"),
                  {"top-1": 79.0}, workdir="/r/held")
  heads = _run(load_config("imagenet.py", "variant=conv_stem_attention,num_heads=4"), {},
               eval_step=None, workdir="/r/heads4")
  unbuildable = load_config("imagenet.py", "depth=26,variant=baseline")
  unbuildable.model.depth = 27  # (a config.json of some other version, say)
  broken = _run(unbuildable, {"top-1": 1.0}, workdir="/r/broken")
  text = compare_paper.report([*seeds, partial, held_out, heads, broken], rows, show_all=False)
  lines = text.splitlines()
  assert "6 run(s) read: 4 count for paper rows, 2 for none." in text
  assert ("- /r/broken (done): nearest Table 1, ResNet-26 baseline; differs in model.depth: "
          "27 (26)") in lines
  assert "| ResNet-50 baseline | 76.9 | 76.50 ± 0.50 | -0.40 | base_s0 (done), base_s1 (done) " \
         "| none |" in lines
  assert ("| ResNet-26 full_attention | 74.8 | 70.25 so far | -4.55 | r26_full (step 5,000 "
          "of 28,150) | r26_full: num_epochs: 90.0 (130.0) |") in lines
  # The held-out baseline is Table 3's row without attention, not Table 1's.
  assert "| attention groups - | 79.5 | 79.00 | -0.50 | held (done) | none |" in lines
  assert "## Table 4" not in text and "## Table 2" not in text  # no run counts there
  assert ("- /r/heads4 (no evaluation yet): nearest Table 1, ResNet-50 conv_stem_attention; "
          "differs in model.num_heads: 4 (8)") in lines
  detection = load_config("coco_retinanet.py", "backbone_variant=baseline,heads=conv")
  coco = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), (30, 50, 31, 15, 33, 45)))
  text = compare_paper.report([_run(detection, coco, 10, 20, "/r/det")], rows, show_all=False)
  assert ("| conv FPN and heads, baseline backbone | 36.5 / 30.00 | 54.3 / 50.00 | 39.0 / 31.00 "
          "| 18.3 / 15.00 | 40.6 / 33.00 | 51.7 / 45.00 | det (step 10 of 20) |"
          in text.splitlines()), text
  everything = compare_paper.report([], rows, show_all=True)
  assert "| kernel 9x9 | 77.7 | not run |  | `--config=configs/imagenet.py:depth=50," \
         "variant=conv_stem_attention,kernel_size=9` | |" in everything.splitlines()
  assert "## Table 2" in everything


def test_a_real_run_in_its_row_from_its_workdir(tmp_path):
  """A ResNet-26 baseline trained for 2 steps on ImageNet's pipeline (fake pixels) counts
  for Table 1's row, with its accuracy and its config against the paper's recipe; a
  folder of runs is searched and the report written to --out."""
  data_dir = str(tmp_path / "tfds")
  helpers.prepare_fake_imagenet(data_dir)
  workdir = tmp_path / "runs" / "r26"
  flags = helpers.tiny_flags(data_dir, 2, batch=4, eval_every=2, train_split="train",
                             eval_split="validation")
  helpers.run_main("configs/imagenet.py:depth=26,variant=baseline", workdir,
                   flags + ["--config.dataset.image_size=32", "--config.dtype=float32"])
  (evaluation,) = [r for r in helpers.read_metrics(workdir) if "eval/accuracy" in r]
  (tmp_path / "runs" / "not_a_run").mkdir()
  out = tmp_path / "report.md"
  text = helpers.run_module("sasa_jax.tools.compare_paper",
                            [str(tmp_path / "runs"), f"--out={out}"]).stdout
  accuracy = 100 * evaluation["eval/accuracy"]
  assert (f"| ResNet-26 baseline | 74.5 | {accuracy:.2f} | {accuracy - 74.5:+.2f} | r26 (done) "
          "| r26: batch_size: 4 (4096); dataset.image_size: 32 (224); dtype: float32 "
          "(bfloat16); num_train_steps: 2 (-1); +1 more |") in text.splitlines(), text
  assert "1 run(s) read: 1 count for paper rows, 0 for none." in text
  assert out.read_text() + "\n" == text
  # tools/status takes the folder of runs too.
  status = helpers.run_module("sasa_jax.tools.status", [str(tmp_path / "runs")]).stdout
  assert status.startswith(f"{workdir}: --config=configs/imagenet.py:depth=26,variant=baseline ")
  assert "\n  step 2 of 2 (100.0%)" in status and "not_a_run" not in status
  assert json.loads((workdir / "config.json").read_text())["model"]["depth"] == 26
