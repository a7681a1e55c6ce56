import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigflax import optim
from bigflax.config import base


def opt_config(**kw):
  c = base().optimizer
  for k, v in kw.items():
    c[k] = v
  return c


def test_cosine_schedule_warms_up_then_decays_to_end_value():
  c = opt_config(learning_rate=1e-3, warmup_steps=100, decay_steps=2000, end_learning_rate=1e-4)
  lr = optim.learning_rate_schedule(c, steps=2000)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(50), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(lr(100), 1e-3, rtol=1e-5)
  np.testing.assert_allclose(lr(1050), (1e-3 + 1e-4) / 2, rtol=1e-4)  # cosine midpoint
  np.testing.assert_allclose(lr(2000), 1e-4, rtol=1e-5)


def test_exponential_and_constant_schedules():
  c = opt_config(schedule="exponential", learning_rate=1.0, warmup_steps=10,
                 decay_transition_steps=100, decay_rate=0.5, end_learning_rate=0.0)
  lr = optim.learning_rate_schedule(c, steps=1000)
  np.testing.assert_allclose([lr(10), lr(110), lr(210)], [1.0, 0.5, 0.25], rtol=1e-5)
  c = opt_config(schedule="constant", learning_rate=0.3, warmup_steps=3)
  lr = optim.learning_rate_schedule(c, steps=1000)
  np.testing.assert_allclose([lr(0), lr(3), lr(900)], [0.0, 0.3, 0.3], rtol=1e-6)


def test_weight_decay_skips_norms_biases_and_embeddings():
  params = {"token_embed": {"embedding": jnp.ones((4, 2))},
            "block": {"mlp": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
                      "ln": {"scale": jnp.ones(2)}}}
  mask = optim.decay_mask(params, ("bias", "scale", "embedding"))
  assert mask == {"token_embed": {"embedding": False},
                  "block": {"mlp": {"kernel": True, "bias": False}, "ln": {"scale": False}}}
  # Only the kernel shrinks under pure weight decay (zero gradients).
  tx = optim.make_optimizer(opt_config(learning_rate=0.1, warmup_steps=0, schedule="constant",
                                       weight_decay=0.5, clip_norm=0.0), steps=10)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates["block"]["mlp"]["kernel"][0, 0]) < 0
  assert float(updates["block"]["mlp"]["bias"][0]) == 0
  assert float(updates["token_embed"]["embedding"][0, 0]) == 0


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_each_optimizer_descends_a_quadratic(name):
  c = opt_config(name=name, learning_rate=0.1, warmup_steps=0, schedule="constant")
  tx = optim.make_optimizer(c, steps=100)
  params = {"w": jnp.array([3.0, -2.0])}
  state = tx.init(params)
  for _ in range(50):
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 1.0


def test_clipping_bounds_the_global_norm():
  tx = optim.make_optimizer(opt_config(name="sgd", momentum=0.0, learning_rate=1.0,
                                       warmup_steps=0, schedule="constant", clip_norm=1.0),
                            steps=10)
  params = {"w": jnp.zeros(3)}
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)
