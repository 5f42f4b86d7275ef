"""Does a workdir's checkpoint hold the state this config builds? Said before restoring, with
the arrays and the config fields that differ, instead of orbax's error from deep inside an
asynchronous restore."""
import json
from typing import Any

import jax
import ml_collections
from etils import epath

SHOWN = 5  # differing arrays, and config fields, named in the message


def _name(key) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _arrays(tree) -> dict[str, tuple]:
  """{"params/group1_block1/conv1/kernel": (shape, dtype name), ...} of a state's leaves
  (arrays, ShapeDtypeStructs or orbax's ArrayMetadata)."""
  return {"/".join(_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def state_differences(stored, wanted) -> list[str]:
  """What differs between a checkpoint's array metadata and the state a config builds
  (abstract arrays): one line per array, at most SHOWN, then a count; [] if they match."""
  have, want = _arrays(stored), _arrays(wanted)
  lines, count = [], 0
  for path in sorted(have.keys() | want.keys()):
    if have.get(path) == want.get(path):
      continue
    count += 1
    if len(lines) < SHOWN:
      show = lambda a: "absent" if a is None else f"{a[1]}{list(a[0])}"  # noqa: E731
      lines.append(f"{path}: {show(have.get(path))} in the checkpoint, "
                   f"{show(want.get(path))} for this config")
  if count > SHOWN:
    lines.append(f"... {count} arrays differ in all")
  return lines


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
  return {prefix[:-1]: tree}


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """{dotted field: value} of a config, or of a config.json's dict, as config.json holds
  them (sequences as lists, references resolved)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = json.loads(config.to_json_best_effort())
  return _flat(config)


def changed_fields(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
  """The fields, sorted, whose values differ between two flat configs (flat_config's; a
  field only one of them has counts)."""
  return [key for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]


def config_differences(saved: epath.Path, config: ml_collections.ConfigDict) -> list[str]:
  """The fields (dotted) whose values differ between a run's saved config.json (`saved`;
  none where it does not exist) and `config`, at most SHOWN, as "field: old there, new
  here"."""
  if not saved.exists():
    return []
  old = flat_config(json.loads(saved.read_text()))
  new = flat_config(config)
  changed = [f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"
             for key in changed_fields(old, new)]
  return changed[:SHOWN] + ([f"... {len(changed)} fields differ in all"]
                            if len(changed) > SHOWN else [])
