"""Running the demos and reading finished runs: metrics.jsonl, config.json, checkpoints."""
import dataclasses
import functools
import gc
import importlib.util
import io
import json
from typing import Any

import ml_collections
import numpy as np
from etils import epath


CONFIGS = epath.Path(__file__).parents[2] / "configs"  # the checkout's; not a package


def load_config(file: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """configs/FILE's get_config(arg): load_config("imagenet.py", "depth=26") is the config
  of --config=configs/imagenet.py:depth=26."""
  path = CONFIGS / file
  spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _path(workdir) -> epath.Path:
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.absolute()


def workdirs(paths: list[str]) -> list[epath.Path]:
  """The run directories at `paths` (local or URLs): each a workdir (it holds config.json)
  or a folder whose subfolders are, in name order."""
  found = []
  for path in map(_path, paths):
    if (path / "config.json").exists():
      found.append(path)
      continue
    inside = sorted(p for p in path.iterdir() if (p / "config.json").exists()) \
        if path.is_dir() else []
    if not inside:
      raise FileNotFoundError(f"{path}: no config.json in it or in its subfolders: not a "
                              "sasa_jax run directory, nor a folder of them")
    found += inside
  return found


def save_figure(fig, path, dpi: int = 100) -> str:
  """Writes a matplotlib figure as PNG to `path`, a local path or a URL (gs://bucket/run/x.png:
  matplotlib itself writes local files only); returns the path."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=dpi)
  path = _path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(png.getvalue())
  return str(path)


def read_jsonl(path: epath.PathLike) -> list[dict]:
  """The JSON rows of a .jsonl file (none if it does not exist); a last line still being
  written (a local file read mid-append) is left out."""
  path = epath.Path(path)
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  rows = [json.loads(line) for line in lines[:-1]]
  try:
    rows += [json.loads(line) for line in lines[-1:]]
  except json.JSONDecodeError:
    pass
  return rows


def read_metrics(workdir: str) -> list[dict]:
  path = _path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a sasa_jax run directory?")
  return read_jsonl(path)


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric along the run as its last start continued it: a row at or
  before a step the metric already has (a run resumed from a checkpoint older than its last
  logged rows repeats those steps) replaces the rows from that step on."""
  pairs = []
  for r in rows:
    if key in r:
      while pairs and pairs[-1][0] >= r["step"]:
        pairs.pop()
      pairs.append((r["step"], r[key]))
  return [p[0] for p in pairs], [p[1] for p in pairs]


def final(rows: list[dict], key: str) -> float:
  values = series(rows, key)[1]
  if not values:
    raise ValueError(f"no {key!r} in metrics.jsonl")
  return values[-1]


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = _path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a sasa_jax run directory?")
  config = json.loads(path.read_text())
  if isinstance(config["model"].get("attention_groups"), list):
    config["model"]["attention_groups"] = tuple(config["model"]["attention_groups"])
  return ml_collections.ConfigDict(config)


def restore_state(workdir, step: int | None = None) -> tuple[int, dict]:
  """(step, state as a tree of numpy arrays) of checkpoint `step` (default: the latest),
  on this process's first device, whatever topology saved it."""
  import jax
  import orbax.checkpoint as ocp
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  with ocp.CheckpointManager(_path(workdir) / "checkpoints") as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = mngr.restore(step, args=ocp.args.StandardRestore(fallback_sharding=device))
  return step, jax.tree.map(np.asarray, state)


WEIGHTS = ("ema", "raw")


def restore_variables(workdir, step: int | None = None,
                      weights: str | None = None) -> tuple[int, str, dict]:
  """(step, weights, {"params", "batch_stats"} as numpy trees) of checkpoint `step` (default:
  the latest). weights: "ema" (the EMA of the parameters, which the run must have kept:
  config.ema_decay > 0) or "raw" (the trained parameters); default: "ema" where the run kept
  them, as the loop evaluates."""
  if weights not in (None, *WEIGHTS):
    raise ValueError(f"weights={weights!r} is not allowed; choose one of {WEIGHTS}")
  step, state = restore_state(workdir, step)
  has_ema = state.get("ema_params") is not None
  weights = weights or ("ema" if has_ema else "raw")
  if weights == "ema" and not has_ema:
    raise ValueError(f"weights=ema: the run in {workdir} kept no EMA weights "
                     "(config.ema_decay = 0); use weights=raw")
  params = state["ema_params"] if weights == "ema" else state["params"]
  return step, weights, {"params": params, "batch_stats": state["batch_stats"]}


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """One checkpoint of a run with the model its config builds, to call from Python
  (`load_trained`): trained(images) gives the model's outputs in inference mode."""
  config: ml_collections.ConfigDict  # the run's config.json
  step: int
  weights: str                       # "ema" or "raw"
  model: Any                         # the flax module, as the training loop builds it
  variables: dict                    # {"params", "batch_stats"}: numpy trees

  def __call__(self, images):
    """[B, S, S, C] uint8 pixels, as the dataset's evaluation pipeline makes them (S:
    config.dataset.image_size) -> classification: logits [B, num_classes]; detection:
    {"logits": [B, N, num_classes], "boxes": [B, N, 4]} over the N anchors."""
    return self._apply(self.variables, images)

  @functools.cached_property
  def _apply(self):
    import jax  # noqa: PLC0415
    from sasa_jax import data as data_lib  # noqa: PLC0415
    name = self.config.dataset.name
    return jax.jit(lambda variables, images: self.model.apply(
        variables, data_lib.normalize(images, name), train=False))


def load_trained(workdir, step: int | None = None, weights: str | None = None,
                 config: ml_collections.ConfigDict | None = None) -> TrainedModel:
  """The model of the run in `workdir` (local or gs://) with checkpoint `step`'s variables
  (default: the latest; weights as `restore_variables`), whatever topology trained it.
  config: the run's config as `read_config` gave it (read here if None)."""
  from sasa_jax import train  # noqa: PLC0415
  config = read_config(workdir) if config is None else config
  step, weights, variables = restore_variables(workdir, step, weights)
  return TrainedModel(config, step, weights, train.create_model(config), variables)


def train_or_resume(config, workdir: str, fresh: bool) -> int:
  """Trains `config` in `workdir` (resuming it, or deleting it first if `fresh`); returns
  the parameter count."""
  if fresh and _path(workdir).exists():
    _path(workdir).rmtree()
  from sasa_jax.logs import quiet_orbax  # noqa: PLC0415
  quiet_orbax()
  import jax  # noqa: PLC0415
  from sasa_jax.train import train_and_evaluate  # noqa: PLC0415
  # As sasa_jax/main.py: the imports' heap out of the garbage collector's reach, which the
  # demos turn off while they import; on for the run; what it leaves is not walked again.
  gc.freeze()
  gc.enable()
  state = train_and_evaluate(config, workdir)
  gc.freeze()
  return sum(x.size for x in jax.tree.leaves(state.params))
