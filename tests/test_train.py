import jax
import numpy as np
import pytest

from bigflax import data, train
from bigflax.config import ConfigError
from conftest import tiny_config

ONE_DEVICE = jax.devices()[:1]


def make_trainer(corpus_file, devices=ONE_DEVICE, **overrides):
  return train.Trainer(tiny_config(corpus_file, **overrides), devices=devices)


def fixed_batch(trainer, batch_size=8):
  return trainer.batch(data.TRAIN, 0, batch_size)


def run_steps_on(trainer, batch, n):
  losses = []
  for _ in range(n):
    trainer.state, metrics = trainer.run.train_step(trainer.state, batch, trainer.dropout_rng)
    losses.append(float(metrics["loss"]))
  return losses


def test_one_step_on_a_fixed_batch_lowers_the_loss(corpus_file):
  trainer = make_trainer(corpus_file, **{"optimizer.warmup_steps": 0,
                                         "optimizer.schedule": "constant"})
  batch = fixed_batch(trainer)
  before = float(trainer.run.eval_step(trainer.state, batch)["loss_sum"])
  run_steps_on(trainer, batch, 1)
  after = float(trainer.run.eval_step(trainer.state, batch)["loss_sum"])
  assert after < before


def test_gradient_accumulation_matches_one_big_batch(corpus_file):
  kw = {"optimizer.warmup_steps": 0, "optimizer.schedule": "constant"}
  whole = make_trainer(corpus_file, **kw)
  accumulated = make_trainer(corpus_file, grad_accum_steps=4, **kw)
  batch = fixed_batch(whole, batch_size=8)
  loss_whole = run_steps_on(whole, batch, 2)
  loss_accumulated = run_steps_on(accumulated, batch, 2)
  np.testing.assert_allclose(loss_whole, loss_accumulated, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(whole.state.params), jax.tree.leaves(accumulated.state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_same_seed_gives_identical_bits(corpus_file):
  runs = []
  for _ in range(2):
    trainer = make_trainer(corpus_file, **{"model.dropout": 0.1})
    runs.append([float(trainer.step(i)["loss"]) for i in range(3)])
  assert runs[0] == runs[1]


def test_evaluate_reports_mean_loss_and_perplexity(corpus_file):
  trainer = make_trainer(corpus_file)
  result = trainer.evaluate()
  assert 2.0 < result["eval_loss"] < 5.0  # near log(vocab) at init
  np.testing.assert_allclose(result["eval_perplexity"], np.exp(result["eval_loss"]), rtol=1e-6)
  # An ASCII corpus: one byte per character, so bits per byte is nats per token / ln 2.
  np.testing.assert_allclose(result["eval_bpb"], result["eval_loss"] / np.log(2), rtol=1e-6)


def test_bad_config_values_are_refused_with_the_field_name(corpus_file):
  with pytest.raises(ConfigError, match="config.model.embed_dim=30 is not divisible by "
                                        "config.model.num_heads=4"):
    make_trainer(corpus_file, **{"model.embed_dim": 30, "model.num_heads": 4})
  with pytest.raises(ConfigError, match="config.optimizer.name='lion' is unknown"):
    make_trainer(corpus_file, **{"optimizer.name": "lion"})
  with pytest.raises(ConfigError, match="config.steps must be a positive integer"):
    make_trainer(corpus_file, steps=0)
