"""Your runs next to the SASA paper's tables: Tables 1 and 3-7 (ImageNet top-1) and Table 2
(COCO AP), read from the runs' workdirs alone (local or gs://), finished or not.

  python -m sasa_jax.tools.compare_paper gs://BUCKET/sasa [WORKDIR ...] [--all] [--out F.md]
  python -m sasa_jax.tools.compare_paper --all     # every paper row with its launch config

Each argument is a run's workdir or a folder whose subfolders hold runs. A run counts for a
paper row when it trains the row's network and evaluates on the row's split: the model that
the run's config.model builds equals the one the row's config string builds (impl, dtype and
BatchNorm momentum aside: `--config=configs/imagenet.py:depth=26,variant=baseline` is
Table 1's ResNet-26 baseline), on the same dataset and eval split (Tables 3 and 5: the
held-out 4% of train, `holdout=true`). One run can count in several tables, as one model
does in the paper (ResNet-50 conv-stem + attention, k = 7, relative, q.k + q.r: Tables 1, 4
and 6). Each row shows the paper's number, ours (the last evaluation, in %: of the EMA
weights where config.ema_decay > 0; the mean and half-range of the finished runs, or of
the unfinished ones "so far" while none has finished), each run's state and where its config
departs from the row's (its recipe: epochs, batch, schedule, ...). A row nobody has run
shows the config string that runs it; runs that count for no row are listed with the
nearest row and the model fields that differ from it. Tables without a run are left out
unless --all.
"""
import dataclasses
import functools
import statistics

from absl import app, flags
from etils import epath

from sasa_jax.checkpoint_match import changed_fields, flat_config
from sasa_jax.detection.coco_eval import METRIC_NAMES
from sasa_jax.tools import paper, runs

FLAGS = flags.FLAGS
flags.DEFINE_bool("all", False, "Show every table, also those no run counts for.")
flags.DEFINE_string("out", None, "Also write the report to this file (local or gs://).")

TITLES = {
    1: "Table 1: ResNet-26, -38 and -50, baseline against attention (ImageNet validation)",
    2: "Table 2: RetinaNet, convolution against attention (COCO val2017)",
    3: "Table 3: which residual groups use attention (held-out 4% of ImageNet train)",
    4: "Table 4: spatial extent k (ImageNet validation)",
    5: "Table 5: positional encoding (held-out 4% of ImageNet train)",
    6: "Table 6: attention logits (ImageNet validation)",
    7: "Table 7: the attention stem, full attention (ImageNet validation)",
}
# Fields that say how a run is operated, not what it trains (left out of the differences).
OPERATIONAL = ("dataset.data_dir", "dataset.shuffle_buffer", "dataset.shuffle_window_mib",
               "model.impl", "seed", "log_every_steps", "eval_every_steps",
               "checkpoint_every_steps", "keep_checkpoints", "keep_checkpoint_every_steps",
               "profile", "compilation_cache_dir", "workdir_lease_s", "hang_timeout_s")
SHOWN = 4  # differences named per run


@dataclasses.dataclass(frozen=True, eq=False)  # a row is itself (a key of matches)
class Row:
  """One row of the paper: where it stands, its config string and the paper's numbers (%)."""
  table: int
  label: str
  config_file: str  # in configs/
  arg: str          # the config-string argument that trains it
  paper: dict       # {metric: value}: "top-1", or COCO's AP, AP50, ...

  @property
  def command(self) -> str:
    return f"--config=configs/{self.config_file}:{self.arg}"

  @functools.cached_property
  def config(self):
    return runs.load_config(self.config_file, self.arg)

  @functools.cached_property
  def network(self):
    return network(self.config)


def _arg_value(value) -> str:
  if isinstance(value, (tuple, list)):
    return "-".join(str(v) for v in value) or "none"
  return str(value)


def paper_rows() -> list[Row]:
  """Every row of Tables 1-7, in the paper's order per table."""
  rows = []
  for table, entries in paper.TABLES.items():
    for entry in entries:
      arg = ",".join(f"{k}={_arg_value(v)}" for k, v in entry.model.items())
      if table in paper.HELD_OUT_TABLES:
        arg += ",holdout=true"
      rows.append(Row(table, entry.label, "imagenet.py", arg, {"top-1": entry.top1}))
  for entry in paper.TABLE2:
    rows.append(Row(2, f"{entry.heads} FPN and heads, {entry.backbone} backbone",
                    "coco_retinanet.py", f"backbone_variant={entry.backbone},heads={entry.heads}",
                    dict(zip(METRIC_NAMES, entry.coco))))
  return sorted(rows, key=lambda r: r.table)


def network(config):
  """The Flax module config.model builds, with impl, dtype and BN momentum fixed: equal
  modules are the same network. None where the fields build none (a config.json of a
  version whose fields differ): the run then counts for no row."""
  from sasa_jax import tasks  # noqa: PLC0415 (jax and the data pipeline: not for --help)
  factory = tasks.TASKS[_task(config)].factory
  try:
    return factory(**{**config.model, "impl": "reference"}, dtype="float32", bn_momentum=0.9)
  except (TypeError, ValueError):
    return None


def _task(config) -> str:
  return config.get("task", "classification")  # a config.json from before detection: none


def evaluated_on(config) -> tuple[str, str]:
  return config.dataset.name, config.dataset.eval_split


def differences(config, reference, prefix: str = "", skip: tuple = ()) -> list[str]:
  """"field: ours (the row's)" for every field under `prefix` that differs, bar OPERATIONAL
  and the fields under `skip`."""
  ours, theirs = flat_config(config), flat_config(reference)
  left_out = (*OPERATIONAL, *skip)
  return [f"{k}: {_arg_value(ours.get(k))} ({_arg_value(theirs.get(k))})"
          for k in changed_fields(ours, theirs)
          if k.startswith(prefix) and not any(k == f or k.startswith(f + ".") for f in left_out)]


def recipe_differences(run: "Run", row: Row) -> list[str]:
  """What a run that counts for `row` does otherwise: its config.model builds the row's
  network, whatever its fields say (variant=baseline or attention_groups=none alike)."""
  return differences(run.config, row.config, skip=("model",))


@dataclasses.dataclass
class Run:
  """A workdir as its files tell it: config.json, metrics.jsonl, starts.jsonl."""
  workdir: str
  config: object
  values: dict        # the last evaluation's metrics, in %
  eval_step: int | None
  total_steps: int | None

  @functools.cached_property
  def network(self):
    return network(self.config)

  @property
  def name(self) -> str:
    return self.workdir.rstrip("/").rsplit("/", 1)[-1]

  @property
  def done(self) -> bool:
    return self.eval_step is not None and self.total_steps is not None and (
        self.eval_step >= self.total_steps)

  @property
  def state(self) -> str:
    if self.eval_step is None:
      return "no evaluation yet"
    if self.done:
      return "done"
    return f"step {self.eval_step:,}" + (f" of {self.total_steps:,}" if self.total_steps else "")


def read_run(workdir: epath.Path) -> Run:
  config = runs.read_config(str(workdir))
  metrics = runs.read_jsonl(workdir / "metrics.jsonl")
  keys = {"classification": {"top-1": "eval/accuracy"},
          "detection": {name: f"eval/{name}" for name in METRIC_NAMES}}[_task(config)]
  values, eval_step = {}, None
  for name, key in keys.items():
    steps, series = runs.series(metrics, key)
    if series:
      values[name], eval_step = 100 * series[-1], steps[-1]
  starts = runs.read_jsonl(workdir / "starts.jsonl")
  return Run(str(workdir), config, values, eval_step,
             starts[-1].get("num_train_steps") if starts else None)


def counts_for(run: Run, row: Row) -> bool:
  return (_task(run.config) == _task(row.config) and evaluated_on(run.config) ==
          evaluated_on(row.config) and run.network is not None and run.network == row.network)


def nearest(run: Run, rows: list[Row]) -> tuple[Row, list[str]]:
  """The row whose config.model and eval split differ from the run's in fewest fields."""
  def fields(row):
    diff = differences(run.config, row.config, "model.")
    if evaluated_on(run.config) != evaluated_on(row.config):
      diff.append(f"evaluated on: {'/'.join(evaluated_on(run.config))} "
                  f"({'/'.join(evaluated_on(row.config))})")
    return diff
  candidates = [row for row in rows if _task(row.config) == _task(run.config)]
  return min(((row, fields(row)) for row in candidates), key=lambda pair: len(pair[1]))


def _shown(items: list[str]) -> str:
  return "; ".join(items[:SHOWN]) + (f"; +{len(items) - SHOWN} more" if len(items) > SHOWN
                                     else "")


def _ours(matched: list[Run], metric: str) -> tuple[str, float | None, bool]:
  """(our number as shown, its mean, whether it is "so far") over the finished runs, or
  over the others while none has finished."""
  evaluated = [r for r in matched if metric in r.values]
  finished = [r for r in evaluated if r.done]
  chosen = finished or evaluated
  if not chosen:
    return "", None, False
  values = [r.values[metric] for r in chosen]
  mean = statistics.mean(values)
  text = f"{mean:.2f}" + (f" ± {(max(values) - min(values)) / 2:.2f}" if len(values) > 1 else "")
  return text, mean, not finished


def table_lines(table: int, rows: list[Row], matches: dict) -> list[str]:
  metrics = list(rows[0].paper)
  lines = [f"## {TITLES[table]}", ""]
  if len(metrics) == 1:
    lines += ["| row | paper | ours | ours − paper | runs | config differs from the row's in |",
              "|---|---|---|---|---|---|"]
  else:
    lines += [f"{', '.join(metrics)} (%): the paper's / ours (so far where no run has "
              "finished; the runs' states in the last column, their config differences below "
              "the table).", "",
              "| row | " + " | ".join(metrics) + " | runs |",
              "|---|" + "---|" * (len(metrics) + 1)]
  notes = []
  for row in rows:
    matched = matches[row]
    if not matched:
      cells = ([f"{row.paper[metrics[0]]}", "not run", ""] if len(metrics) == 1 else
               [f"{row.paper[m]}" for m in metrics])
      lines.append(f"| {row.label} | " + " | ".join(cells) + f" | `{row.command}` |"
                   + (" |" if len(metrics) == 1 else ""))
      continue
    run_cells = [f"{r.name} ({r.state})" for r in matched]
    diffs = [f"{r.name}: {_shown(d)}" for r in matched if (d := recipe_differences(r, row))]
    if len(metrics) == 1:
      text, mean, so_far = _ours(matched, metrics[0])
      paper_value = row.paper[metrics[0]]
      delta = f"{mean - paper_value:+.2f}" if mean is not None else ""
      text = text + " so far" if so_far else text or "no evaluation yet"
      lines.append(f"| {row.label} | {paper_value} | {text} | {delta} | "
                   f"{', '.join(run_cells)} | {'<br>'.join(diffs) or 'none'} |")
    else:
      cells = []
      for m in metrics:
        cells.append(f"{row.paper[m]} / {_ours(matched, m)[0] or '-'}")
      lines.append(f"| {row.label} | " + " | ".join(cells) + f" | {', '.join(run_cells)} |")
      notes += [f"- {row.label}: {d}" for d in diffs]
  if notes:
    lines += ["", "Config differences from the row's:", *notes]
  return lines + [""]


def report(found: list[Run], rows: list[Row], show_all: bool) -> str:
  matches = {row: [r for r in found if counts_for(r, row)] for row in rows}
  counted = {id(r) for matched in matches.values() for r in matched}
  unmatched = [r for r in found if id(r) not in counted]
  lines = ["# Runs against the SASA paper (Ramachandran et al. 2019)", "",
           f"{len(found)} run(s) read: {len(found) - len(unmatched)} count for paper rows, "
           f"{len(unmatched)} for none. Ours: the last evaluation (%), the mean ± half-range "
           "of the finished runs (\"so far\" while none has finished). Config differences: "
           "the run's value (the row's), operational fields left out.", ""]
  for table in sorted({row.table for row in rows}):
    in_table = [row for row in rows if row.table == table]
    if show_all or any(matches[row] for row in in_table):
      lines += table_lines(table, in_table, matches)
  if unmatched:
    lines += ["## Runs that count for no paper row", ""]
    datasets = {row.config.dataset.name for row in rows}
    for run in unmatched:
      dataset = run.config.dataset.name
      if dataset not in datasets:
        lines.append(f"- {run.workdir}: {dataset}, not a dataset of the paper's tables")
        continue
      row, diff = nearest(run, rows)
      lines.append(f"- {run.workdir} ({run.state}): nearest Table {row.table}, {row.label}; "
                   f"differs in {_shown(diff)}")
    lines.append("")
  return "\n".join(lines)


def main(argv):
  if len(argv) < 2 and not FLAGS.all:
    raise app.UsageError("give workdirs, or folders of them (or --all for every paper row)")
  text = report([read_run(p) for p in runs.workdirs(argv[1:])], paper_rows(), FLAGS.all)
  print(text)
  if FLAGS.out:
    out = epath.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
  app.run(main)
