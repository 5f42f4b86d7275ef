"""create_resnet: variants, overrides, errors and the paper's Table 1 FLOPS/params."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.models import create_resnet
from sasa_jax.run_once import run_once
from sasa_jax.tools import paper
from sasa_jax.tools.model_table import measure
from tests import helpers


@pytest.mark.parametrize("variant", ["baseline", "conv_stem_attention", "full_attention"])
def test_small_model_trains_one_step(variant):
  model = create_resnet(14, variant, num_classes=10, width_multiplier=0.25, num_heads=2,
                        kernel_size=3, small_images=True)
  x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
  variables = run_once(jax.jit(lambda x: model.init(jax.random.key(1), x, train=False)), x)
  labels = jnp.arange(4) % 10

  def loss(params):
    logits, updates = model.apply({**variables, "params": params}, x, train=True,
                                  mutable=["batch_stats"])
    onehot = jax.nn.one_hot(labels, 10)
    return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

  (value, updates), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(value)
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert jax.jit(model.apply)(variables, x).shape == (4, 10)
  has_attention = any("attention" in k for k in jax.tree_util.tree_map_with_path(
      lambda p, _: jax.tree_util.keystr(p), variables["params"]).__str__().split("'"))
  assert has_attention == (variant != "baseline")


def test_attention_groups_override():
  model = create_resnet(26, "conv_stem_attention", attention_groups=(3, 4), num_classes=10,
                        width_multiplier=0.25, num_heads=2, small_images=True)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert "conv2" in params["group1_block1"] and "conv2" in params["group2_block1"]
  assert "attention" in params["group3_block1"] and "attention" in params["group4_block1"]
  assert "stem_conv" in params


def test_bfloat16_model():
  model = create_resnet(14, "full_attention", dtype="bfloat16", num_classes=10,
                        width_multiplier=0.25, num_heads=2, small_images=True)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  variables = run_once(jax.jit(model.init), jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  logits = jax.jit(model.apply)(variables, jnp.ones((2, 28, 28, 1)))
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()


@pytest.mark.parametrize("kw,match", [
    (dict(variant="attention"), r"variant='attention' is not allowed; choose one of"),
    (dict(depth=101), r"depth=101 is not allowed; choose one of"),
    (dict(stem_type="resnet"), r"stem_type='resnet' is not allowed; choose one of"),
    (dict(attention_groups=(0, 1)), r"attention_groups entry=0 is not allowed"),
    (dict(kernel_size=4), r"kernel_size=4 \(group 1\) is not allowed"),
    (dict(dtype="float16"), r"dtype='float16' is not allowed; choose one of"),
    (dict(num_heads=3), r"num_heads=3 \(group 1\): the layer's width 64 must be a multiple of 6"),
    (dict(width_multiplier=0.0625, num_heads=2),  # the stem's 4 heads of 1 channel each
     r"width_multiplier=0.0625: the attention stem's width 4 must be a multiple of 8 \(its 4 "
     r"heads x an even head dimension"),
])
def test_bad_arguments(kw, match):
  kw = {"depth": 50, "variant": "full_attention", **kw}
  with pytest.raises(ValueError, match=match):
    create_resnet(**kw)


@pytest.mark.parametrize("row", paper.TABLE1, ids=lambda r: r.label)
def test_table1_flops_and_params(row):
  got = measure(row)
  assert abs(got["params_m"] - row.params_m) <= 0.1, got
  assert abs(got["gflops_rel_diff"]) <= 0.05, got


def test_model_table_cli_json_and_breakdown():
  out = helpers.run_module("sasa_jax.tools.model_table", ["--tables", "6", "--format",
                                                          "json"]).stdout
  rows = [json.loads(line) for line in out.splitlines()]
  assert [r["attention_type"] for r in rows] == ["qr", "qk+qr"]
  assert all(r["table"] == 6 and r["depth"] == 50 and r["variant"] == "conv_stem_attention"
             and r["gflops"] > 0 and r["params_m"] > 0 for r in rows)
  assert rows[0]["params_m"] < rows[1]["params_m"]  # no key projection
  out = helpers.run_module("sasa_jax.tools.model_table", ["--breakdown", "--depth", "26",
                                                          "--variant", "full_attention"]).stdout
  assert "stem/mixture" in out and "group4_block1/attention/rel_h" in out and "Total" in out


def test_batch_norm_across_reaches_submodules_and_names_what_a_model_lacks():
  """models.resnet.batch_norm_across sets the BatchNorm axis fields of a model and of the
  modules it holds (RetinaNet's backbone); a module without them is named with the fields it
  needs."""
  import flax.linen as nn
  from sasa_jax.models.factory import create_retinanet
  from sasa_jax.models.resnet import batch_norm_across
  model = batch_norm_across(create_retinanet("baseline", "conv", depth=14), "data", ((0, 1),))
  for m in (model, model.backbone):
    assert (m.bn_axis_name, m.bn_axis_index_groups) == ("data", ((0, 1),))
  with pytest.raises(ValueError, match=r"Dense has no fields bn_axis_name and "
                                       r"bn_axis_index_groups .* docs/forking.md"):
    batch_norm_across(nn.Dense(3), "data", None)


def test_initialisation_is_the_documented_one():
  """docs/training.md: each residual block's last BatchNorm scale 0, the others 1; the
  classifier 0; SASA projections N(0, 1/fan-in) and positional embeddings N(0, 1/d)."""
  model = create_resnet(depth=26, variant="conv_stem_attention", num_classes=10,
                        width_multiplier=0.25)
  params = run_once(jax.jit(model.init), jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
  blocks = [name for name in params if "_block" in name]
  assert len(blocks) == 8
  for name in blocks:
    block = params[name]
    assert float(jnp.abs(block["BatchNorm_2"]["scale"]).max()) == 0.0
    for bn in ("BatchNorm_0", "BatchNorm_1"):
      np.testing.assert_array_equal(block[bn]["scale"], 1.0)
  assert float(jnp.abs(params["head"]["kernel"]).max()) == 0.0
  attention = [params[name]["attention"] for name in blocks if "attention" in params[name]]
  assert len(attention) == 8  # every block of the conv-stem model
  for layer in attention:
    fan_in = layer["query"]["kernel"].shape[0]
    for proj in ("query", "key", "value"):
      assert abs(float(jnp.std(layer[proj]["kernel"])) * fan_in**0.5 - 1) < 0.1
  # [k, d / 2] each, d the layer's head width: pooled over the layers, in units of 1/sqrt(d)
  rel = jnp.concatenate([layer[r].ravel() * (2 * layer[r].shape[1])**0.5
                         for layer in attention for r in ("rel_h", "rel_w")])
  assert abs(float(jnp.std(rel)) - 1) < 0.15
