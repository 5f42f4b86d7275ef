"""Reading finished runs: metrics.jsonl, config.json and the latest checkpoint."""
import json
import os

import ml_collections


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one metric."""
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def final(rows: list[dict], key: str) -> float:
  values = series(rows, key)[1]
  if not values:
    raise ValueError(f"no {key!r} in metrics.jsonl")
  return values[-1]


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a sasa_jax run directory?")
  with open(path) as f:
    config = json.load(f)
  if isinstance(config["model"].get("attention_groups"), list):
    config["model"]["attention_groups"] = tuple(config["model"]["attention_groups"])
  return ml_collections.ConfigDict(config)


def restore_variables(workdir: str):
  """(step, {"params", "batch_stats"}) of the latest checkpoint, as numpy trees."""
  import orbax.checkpoint as ocp
  with ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints")) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    state = mngr.restore(step, args=ocp.args.StandardRestore())
  params = state["ema_params"] if state.get("ema_params") is not None else state["params"]
  return step, {"params": params, "batch_stats": state["batch_stats"]}
