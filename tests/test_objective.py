import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax.linen as nn

from bigflax import run
from bigflax.config import ModelConfig, base
from bigflax.errors import ConfigError
from bigflax.model import Transformer
from bigflax.objective import (OBJECTIVES, check_config, classification_loss, mask_tokens,
                               next_token_loss)


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


MASK_ID = 100


def masked(rng=0, shape=(64, 512)):
  tokens = jax.random.randint(jax.random.key(99), shape, 0, MASK_ID)
  real = jnp.arange(shape[1])[None, :] < shape[1] * 3 // 4  # the last quarter is padding
  real = jnp.broadcast_to(real, shape)
  corrupted, chosen = mask_tokens(jax.random.key(rng), tokens, real, mask_rate=0.15,
                                  mask_fraction=0.8, random_fraction=0.1, mask_token_id=MASK_ID)
  return *(np.asarray(x) for x in (tokens, real, corrupted, chosen)),


def test_mlm_masking_rates_on_a_large_batch():
  tokens, real, corrupted, chosen = masked()
  chosen = chosen.astype(bool)
  assert not chosen[~real].any()  # padding is never chosen
  np.testing.assert_array_equal(corrupted[~chosen], tokens[~chosen])  # unchosen stay
  assert abs(chosen[real].mean() - 0.15) < 0.005  # 24,576 real tokens: 3.7 sd ≈ 0.0085 / 2
  became_mask = corrupted[chosen] == MASK_ID
  unchanged = corrupted[chosen] == tokens[chosen]
  randomised = ~became_mask & ~unchanged
  n = chosen.sum()
  assert abs(became_mask.mean() - 0.8) < 4 * np.sqrt(0.16 / n)
  # A random draw equals the original 1% of the time: 10% + 0.1% unchanged, 9.9% random.
  assert abs(unchanged.mean() - 0.101) < 4 * np.sqrt(0.09 / n)
  assert abs(randomised.mean() - 0.099) < 4 * np.sqrt(0.09 / n)
  assert corrupted[chosen][randomised].max() < MASK_ID  # random ids are the tokenizer's own


def test_mlm_masks_are_a_function_of_the_key():
  assert np.array_equal(masked(3)[2], masked(3)[2])
  assert not np.array_equal(masked(3)[3], masked(4)[3])


def mlm_config(**mlm):
  c = base()
  c.objective, c.model.causal = "mlm", False
  c.mlm.mask_token_id = MASK_ID
  c.mlm.update(mlm)
  return c


def test_the_mlm_loss_reads_the_chosen_tokens_only():
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, MASK_ID)
  batch = {"inputs": tokens, "segment_ids": jnp.ones_like(tokens)}
  logits = jax.random.normal(jax.random.key(1), (4, 32, 128))
  seen = []

  def logits_fn(inputs):
    seen.append(inputs)
    return logits
  loss, metrics = OBJECTIVES["mlm"].loss(logits_fn, batch, jax.random.key(2), mlm_config())
  corrupted, chosen = mask_tokens(jax.random.key(2), tokens, tokens >= 0, mask_rate=0.15,
                                  mask_fraction=0.8, random_fraction=0.1, mask_token_id=MASK_ID)
  np.testing.assert_array_equal(seen[0], corrupted)  # the model reads the corrupted tokens
  expected, _ = next_token_loss(logits, tokens, chosen)  # … and predicts the originals
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert metrics["num_tokens"] == chosen.sum() > 0
  grad = jax.grad(lambda lg: OBJECTIVES["mlm"].loss(lambda _: lg, batch, jax.random.key(2),
                                                    mlm_config())[0])(logits)
  assert np.all(np.asarray(grad)[np.asarray(chosen) == 0] == 0)  # unchosen: zero loss weight


@pytest.mark.parametrize("overrides, message", [
    ({"objective": "mlm", "model.causal": True}, "needs config.model.causal=False"),
    ({"model.causal": False}, "needs config.model.causal=True"),
    ({"objective": "mlm", "model.causal": False, "mlm.mask_rate": 0.0}, "mask_rate"),
    ({"objective": "mlm", "model.causal": False, "mlm.random_fraction": 0.3},
     "sum <= 1"),
    ({"objective": "bert"}, "config.objective='bert' is unknown"),
    ({"loss_chunk": -1}, "config.loss_chunk must be >= 0"),
])
def test_objective_config_errors(overrides, message):
  c = base()
  c.update_from_flattened_dict(overrides)
  with pytest.raises(ConfigError, match=message):
    check_config(c)


@pytest.mark.parametrize("objective, tied", [("next_token", True), ("mlm", False)])
def test_chunked_loss_equals_the_whole_rows_loss_and_gradients(objective, tied):
  """config.loss_chunk: the logits of 30 positions in chunks of 8 (the last one padded) give the
  whole rows' loss, metrics and parameter gradients, in f32, and no f32 logits of a whole row
  exist in the chunked program."""
  causal = objective == "next_token"
  model = Transformer(ModelConfig(vocab_size=160, block_size=32, num_layers=1, num_heads=2,
                                  embed_dim=32, tie_embeddings=tied, causal=causal))
  tokens = jax.random.randint(jax.random.key(0), (2, 30), 0, MASK_ID)
  segment_ids = jnp.asarray([[1] * 12 + [2] * 15 + [0] * 3, [1] * 30])
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": (segment_ids > 0).astype(jnp.float32), "segment_ids": segment_ids}
  params = nn.unbox(model.init(jax.random.key(1), tokens))["params"]
  calls = []

  def loss(params, chunk):
    c = mlm_config(mask_rate=0.5) if objective == "mlm" else base()
    c.z_loss, c.loss_chunk = 1e-2, chunk

    def logits_fn(inputs, **kwargs):  # as bigflax.run's
      calls.append(kwargs)
      return model.apply({"params": params}, inputs, None, segment_ids, **kwargs)
    return OBJECTIVES[objective].loss(logits_fn, batch, jax.random.key(2), c)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (whole, whole_metrics), whole_grads = step(params, 0)
  (chunked, chunked_metrics), chunked_grads = step(params, 8)
  assert calls == [{}, {"hidden": True}]  # the chunked loss took the states and head
  np.testing.assert_allclose(chunked, whole, atol=1e-5)
  for name in ("loss", "z_loss", "accuracy", "num_tokens"):
    np.testing.assert_allclose(chunked_metrics[name], whole_metrics[name], atol=1e-5)
  assert whole_metrics["z_loss"] > 0 and whole_metrics["num_tokens"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), chunked_grads,
               whole_grads)
  program = str(jax.make_jaxpr(jax.grad(lambda p: loss(p, 8)[0]))(params))
  assert "f32[2,8,160]" in program and "f32[2,30,160]" not in program


@pytest.mark.slow
def test_train_and_eval_steps_with_a_chunked_loss_equal_the_whole_rows_ones():
  """Through bigflax.run's steps (the model asked for its states and head): with config.loss_chunk
  below the rows' length the same loss, accuracy, gradient norm and eval sums as whole rows."""
  tokens = jax.random.randint(jax.random.key(0), (4, 17), 0, 64)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": jnp.ones((4, 16)).at[0, 10:].set(0),
           "segment_ids": jnp.ones((4, 16), jnp.int32).at[1, 7:].set(2),
           "positions": jnp.tile(jnp.arange(16), (4, 1)).at[1, 7:].add(-7)}
  results = []
  for chunk in (0, 6):
    c = base()
    c.model.update(vocab_size=64, block_size=16, num_layers=1, num_heads=2, embed_dim=32)
    c.batch_size, c.mesh.data, c.loss_chunk = 4, 1, chunk
    steps = run.build(c, jax.devices()[:1])
    state = steps.init_state(jax.random.key(0))
    with steps.activate():
      sums = steps.eval_step(state, batch)
      _, metrics = steps.train_step(state, batch, jax.random.key(1))
    results.append({**sums, **{k: metrics[k] for k in ("loss", "accuracy", "grad_norm")}})
  assert results[0].keys() == results[1].keys()
  for name in results[0]:
    np.testing.assert_allclose(results[1][name], results[0][name], rtol=1e-5, err_msg=name)


def test_resolve_reserves_the_mask_id_past_the_tokenizers():
  class Bytes:
    vocab_size = 256
  c = base()
  c.objective, c.model.causal = "mlm", False
  resolved = run.resolve(c, Bytes())
  assert resolved.mlm.mask_token_id == 256 and resolved.model.vocab_size == 384
  c.model.vocab_size = 256  # room for the tokenizer's ids, not for [MASK]
  with pytest.raises(ConfigError, match="plus the \\[MASK\\] id"):
    run.resolve(c, Bytes())


def test_classification_loss_accuracy_and_confusion_ignore_padding_rows():
  logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 5.0], [9.0, 0.0, 0.0]])
  labels = jnp.array([0, 2, 2, -1])
  loss, m = classification_loss(logits, labels)
  log_p = jax.nn.log_softmax(logits)
  np.testing.assert_allclose(loss, -(log_p[0, 0] + log_p[1, 2] + log_p[2, 2]) / 3, rtol=1e-6)
  np.testing.assert_allclose(m["accuracy"], 2 / 3)
  np.testing.assert_array_equal(m["confusion"], [[1, 0, 0], [0, 0, 0], [0, 1, 1]])
  assert m["num_examples"] == 3
  assert np.all(np.asarray(jax.grad(lambda lg: classification_loss(lg, labels)[0])(logits))[3]
                == 0)


def test_eval_summary_gives_accuracy_and_scikit_learns_macro_f1():
  from sklearn.metrics import f1_score
  rng = np.random.default_rng(0)
  truth, predicted = rng.integers(0, 4, 200), rng.integers(0, 5, 200)  # label 4 never true
  confusion = np.zeros((5, 5))
  np.add.at(confusion, (truth, predicted), 1)
  metrics = run.eval_summary({"loss_sum": 100.0, "num_examples": 200.0, "confusion": confusion})
  assert metrics["accuracy"] == np.mean(truth == predicted)
  np.testing.assert_allclose(metrics["macro_f1"], f1_score(truth, predicted, average="macro"))
  assert metrics["loss"] == 0.5
