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


# The first update of each optimizer in closed form, for gradient g = 2w of sum(w²) at w = (3, -2):
# Adam's bias-corrected moments make it lr·g/(|g| + eps); AdamW adds lr·wd·w (decoupled); SGD
# with momentum starts from a zero trace, so its first step is plain lr·g.
FIRST_STEP = {
    "adam": lambda w, g, c: w - c.learning_rate * g / (np.abs(g) + c.eps),
    "adamw": lambda w, g, c: w - c.learning_rate * (g / (np.abs(g) + c.eps)
                                                   + c.weight_decay * w),
    "sgd": lambda w, g, c: w - c.learning_rate * g,
}


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_each_optimizers_first_update_is_its_formula(name):
  c = opt_config(name=name, learning_rate=0.1, warmup_steps=0, schedule="constant",
                 clip_norm=0.0, weight_decay=0.5)
  tx = optim.make_optimizer(c, steps=100)
  w = np.array([3.0, -2.0], np.float32)
  params = {"w": jnp.asarray(w)}
  grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, updates)["w"],
                             FIRST_STEP[name](w, 2 * w, c), rtol=1e-6)


def test_every_optimizer_has_a_first_step_formula():
  assert set(FIRST_STEP) == set(optim.OPTIMIZERS)


def test_clipping_bounds_the_global_norm():
  tx = optim.make_optimizer(opt_config(name="sgd", momentum=0.0, learning_rate=1.0,
                                       warmup_steps=0, schedule="constant", clip_norm=1.0),
                            steps=10)
  params = {"w": jnp.zeros(3)}
  updates, _ = tx.update({"w": jnp.array([30.0, 40.0, 0.0])}, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(updates), 1.0, rtol=1e-5)
