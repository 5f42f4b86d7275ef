"""docs/forking.md's worked example, taken from the page and run."""
import jax
import jax.numpy as jnp
import optax

from sasa_jax import optim
from tests import helpers
from tests.test_config import _train_config


def _example(name):
  return helpers.doc_example("forking.md", f"forking-example: {name}")


def test_new_optimizer_example(monkeypatch):
  monkeypatch.setattr(optim, "OPTIMIZERS", dict(optim.OPTIMIZERS))
  exec(_example("optimizer"), vars(optim))  # noqa: S102 - the documented code, as a fork adds it
  assert "rmsprop" in optim.OPTIMIZERS
  from sasa_jax.train import validate_config
  config = _train_config(**{"optimizer.name": "rmsprop", "optimizer.b2": 0.9,
                            "schedule.peak_value": 0.01})
  validate_config(config)  # the new name is accepted
  tx = optim.create_optimizer(config.optimizer, optax.constant_schedule(0.01))
  params = {"w": jnp.ones((3, 3))}
  state = tx.init(params)
  loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2)  # noqa: E731
  before = float(loss(params))
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss(params)) < before
