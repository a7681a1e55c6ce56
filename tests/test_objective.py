import jax
import jax.numpy as jnp
import numpy as np

from bigflax.objective import next_token_loss


def test_loss_equals_hand_computed_cross_entropy():
  logits = jnp.array([[[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]]])
  targets = jnp.array([[0, 1]])
  loss, metrics = next_token_loss(logits, targets, jnp.ones((1, 2)))
  # −log softmax by hand: position 0 picks logit 2 of (2,1,0); position 1 picks 0 of (0,0,3).
  nll0 = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0) + np.exp(0.0)))
  nll1 = -(0.0 - np.log(2 + np.exp(3.0)))
  np.testing.assert_allclose(loss, (nll0 + nll1) / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["accuracy"], 0.5)
  assert metrics["num_tokens"] == 2


def test_masked_positions_contribute_nothing():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11))
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 0, 1, 1, 0]], jnp.float32)
  garbage = logits.at[0, 3:].set(1e4).at[1, 1].set(-1e4)
  loss = lambda lg: next_token_loss(lg, targets, mask)[0]
  np.testing.assert_allclose(loss(logits), loss(garbage), rtol=1e-6)
  grad = jax.grad(loss)(logits)
  assert np.all(np.asarray(grad)[np.asarray(mask) == 0] == 0)
  # The loss is the mean over the 6 real tokens, not over all 10.
  per_token = -jax.nn.log_softmax(logits)[jnp.arange(2)[:, None], jnp.arange(5), targets]
  np.testing.assert_allclose(loss(logits), (per_token * mask).sum() / 6, rtol=1e-6)


def test_loss_is_stable_for_huge_logits_in_bfloat16():
  logits = jnp.array([[[1e4, 0.0, -1e4]]], jnp.bfloat16)
  loss, _ = next_token_loss(logits, jnp.array([[1]]), jnp.ones((1, 1)))
  assert np.isfinite(loss) and abs(float(loss) - 1e4) < 1e2


def test_all_masked_batch_gives_zero_not_nan():
  loss, metrics = next_token_loss(jnp.zeros((1, 3, 4)), jnp.zeros((1, 3), jnp.int32),
                                  jnp.zeros((1, 3)))
  assert float(loss) == 0.0 and metrics["num_tokens"] == 0


def test_z_loss_adds_the_mean_squared_log_normalizer_over_real_tokens():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 3 + 2
  targets = jax.random.randint(jax.random.key(1), (2, 3), 0, 7)
  mask = jnp.array([[1, 1, 0], [1, 0, 1]], jnp.float32)
  plain, plain_metrics = next_token_loss(logits, targets, mask)
  total, metrics = next_token_loss(logits, targets, mask, z_loss=1e-2)
  log_z = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  expected_z = 1e-2 * (log_z ** 2 * np.asarray(mask)).sum() / 4
  np.testing.assert_allclose(metrics["z_loss"], expected_z, rtol=1e-5)
  np.testing.assert_allclose(total, plain + expected_z, rtol=1e-5)
  # The reported cross-entropy is unchanged; only the optimized total includes the z-loss.
  np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
  assert float(plain_metrics["z_loss"]) == 0.0


def test_z_loss_gradient_pulls_the_normalizer_towards_one():
  logits = jnp.full((1, 1, 4), 5.0)  # log Z = 5 + log 4 > 0: the z-loss wants all logits lower
  loss = lambda lg: next_token_loss(lg, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)),
                                    z_loss=1.0)[0]
  ce_only = lambda lg: next_token_loss(lg, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)))[0]
  extra = np.asarray(jax.grad(loss)(logits) - jax.grad(ce_only)(logits))
  # d(log²Z)/dlogit_i = 2 log Z · softmax_i = 2 (5 + log 4) / 4 for each of the 4 equal logits.
  np.testing.assert_allclose(extra, 2 * (5 + np.log(4)) / 4, rtol=1e-5)
