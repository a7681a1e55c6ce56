"""The training objectives: a language model's (`OBJECTIVES`, by config.objective) and a
classifier's.

next_token: loss = mean over real positions t of −log p(targets_t | inputs_≤t), where real means
loss_mask=1, plus optionally z_loss × the mean of log²Z, Z the softmax normalizer (PaLM, Chowdhery
et al. 2022): it pulls log Z towards 0 so the logits cannot drift to magnitudes where bf16 loses
them.

mlm (BERT, Devlin et al. 2019): mask_rate of the real tokens are chosen; of those, mask_fraction
become [MASK], random_fraction a random token and the rest stay; the loss is the same
cross-entropy of the original tokens, at the chosen positions only. The choice is drawn inside
the step from the step's key, so it differs per step and a resumed run draws the same.

Both take the model's logits whole ([batch, length, vocab] f32: 2 GiB per device for Llama-2's
vocabulary at 4 × 4,096 tokens, and as much again for their softmax) unless config.loss_chunk is
shorter than the rows: then the head's logits, log-softmax and per-token statistics are computed
chunk by chunk in a scan under jax.checkpoint, so one chunk's logits are live at a time, in the
forward and the backward pass alike. The statistics are the same per token either way.
"""

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigflax.config import require
from bigflax.errors import ConfigError


def token_log_likelihood(logits, targets):
  """log p(target) per position, in f32 with a max-subtracted (stable) log-softmax."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def next_token_loss(logits, targets, loss_mask, z_loss: float = 0.0):
  """Returns (mean loss over real tokens, metrics dict with loss, z_loss, accuracy, num_tokens).

  logits: [batch, length, vocab]; targets: [batch, length] ints; loss_mask: [batch, length] in
  {0, 1}. Masked positions contribute nothing to the loss, its gradient or the accuracy. The
  returned loss includes the z-loss term; metrics["loss"] is the cross-entropy alone, so runs with
  and without z-loss report comparable numbers.
  """
  return _loss_of_token_stats(*token_stats(logits, targets), loss_mask, z_loss)


def token_stats(logits, targets):
  """Per position, in f32: (log p(target), log Z the log of the softmax normalizer, 1 where the
  argmax is the target)."""
  logits = logits.astype(jnp.float32)
  return (token_log_likelihood(logits, targets), jax.nn.logsumexp(logits, axis=-1),
          (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))


def chunked_token_stats(states, head, targets, chunk: int):
  """token_stats of head(states) ([batch, length, embed] → f32 logits), the length cut into
  chunks of `chunk` positions (the last one padded) that a scan visits one at a time. Each chunk
  is checkpointed: its backward recomputes its logits instead of keeping them."""
  batch, length = targets.shape
  chunks = -(-length // chunk)
  pad = chunks * chunk - length
  states = jnp.pad(states, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))

  @jax.checkpoint
  def one_chunk(args):
    states, targets = args
    logits = nn.with_logical_constraint(head(states), ("batch", "length", "vocab"))
    return token_stats(logits, targets)

  def chunks_major(x):  # [batch, chunks·chunk, …] → [chunks, batch, chunk, …]
    return jnp.swapaxes(x.reshape(batch, chunks, chunk, *x.shape[2:]), 0, 1)
  stats = jax.lax.map(one_chunk, (chunks_major(states), chunks_major(targets)))
  return [jnp.swapaxes(s, 0, 1).reshape(batch, -1)[:, :length] for s in stats]


def _loss_of_token_stats(log_likelihood, log_z, correct, loss_mask, z_loss: float):
  mask = loss_mask.astype(jnp.float32)
  num_tokens = mask.sum()
  # max(…, 1) keeps an all-masked batch finite (loss 0) instead of 0/0.
  denominator = jnp.maximum(num_tokens, 1.0)
  cross_entropy = -(log_likelihood * mask).sum() / denominator
  z_term = z_loss * (jnp.square(log_z) * mask).sum() / denominator
  accuracy = (correct * mask).sum() / denominator
  return cross_entropy + z_term, {"loss": cross_entropy, "z_loss": z_term, "accuracy": accuracy,
                                  "num_tokens": num_tokens}


def mask_tokens(rng, tokens, real, *, mask_rate: float, mask_fraction: float,
                random_fraction: float, mask_token_id: int):
  """BERT's corruption of tokens [batch, length] at real (bool) positions → (corrupted tokens,
  chosen [batch, length] f32: 1 where the loss reads). Random replacements are ids below
  mask_token_id (the tokenizer's own, never padding ids)."""
  choose, how, replacement = jax.random.split(rng, 3)
  chosen = real & jax.random.bernoulli(choose, mask_rate, tokens.shape)
  draw = jax.random.uniform(how, tokens.shape)
  random_ids = jax.random.randint(replacement, tokens.shape, 0, mask_token_id, tokens.dtype)
  corrupted = jnp.where(draw < mask_fraction, mask_token_id,
                        jnp.where(draw < mask_fraction + random_fraction, random_ids, tokens))
  return jnp.where(chosen, corrupted, tokens), chosen.astype(jnp.float32)


def model_loss(logits_fn, inputs, targets, loss_mask, config):
  """next_token_loss of the model's logits on `inputs`: `logits_fn(inputs)` gives them whole,
  `logits_fn(inputs, hidden=True)` the final states and the head (bigflax.model.Transformer),
  which config.loss_chunk shorter than the rows takes chunk by chunk."""
  # .get: a config.json written before loss_chunk existed takes the logits whole.
  chunk = config.get("loss_chunk", 0)
  if not chunk or chunk >= inputs.shape[1]:
    return next_token_loss(logits_fn(inputs), targets, loss_mask, config.z_loss)
  states, head = logits_fn(inputs, hidden=True)
  return _loss_of_token_stats(*chunked_token_stats(states, head, targets, chunk), loss_mask,
                              config.z_loss)


def next_token(logits_fn, batch, rng, config):
  """`logits_fn(inputs)` → the model's logits on the batch's rows; (loss, metrics) as in
  next_token_loss."""
  del rng
  return model_loss(logits_fn, batch["inputs"], batch["targets"], batch["loss_mask"], config)


def masked_lm(logits_fn, batch, rng, config):
  """The packed batch's inputs, corrupted, are the model's inputs and, as they were, its targets;
  real tokens are those in a segment (all, in windows)."""
  tokens = batch["inputs"]
  real = batch["segment_ids"] > 0 if "segment_ids" in batch else jnp.ones(tokens.shape, bool)
  m = config.mlm
  if m.mask_token_id < 0:
    raise ConfigError("config.mlm.mask_token_id is unset: bigflax.run.resolve reserves it past the "
                      "tokenizer's ids (with no data, as in bigflax aot, set it yourself)")
  corrupted, chosen = mask_tokens(rng, tokens, real, mask_rate=m.mask_rate,
                                  mask_fraction=m.mask_fraction,
                                  random_fraction=m.random_fraction,
                                  mask_token_id=m.mask_token_id)
  return model_loss(logits_fn, corrupted, tokens, chosen, config)


class Objective(typing.NamedTuple):
  loss: typing.Callable  # (logits_fn, batch, rng, config) → (loss, metrics as next_token_loss's)
  causal: bool  # the config.model.causal it needs
  why: str  # … and why, for the error


OBJECTIVES = {
    "next_token": Objective(next_token, True, "a bidirectional model sees the token it predicts"),
    "mlm": Objective(masked_lm, False, "a masked LM reads both sides of each masked token"),
}


def check_config(c) -> None:
  """The objective and its model agree; the masking rates are rates; the loss chunk is a length.
  ConfigError if not."""
  require(c.get("loss_chunk", 0) >= 0, f"config.loss_chunk must be >= 0 (0 = whole rows), got "
          f"{c.get('loss_chunk')}")
  require(c.objective in OBJECTIVES, f"config.objective={c.objective!r} is unknown; choose one of "
          f"{sorted(OBJECTIVES)}")
  objective = OBJECTIVES[c.objective]
  require(c.task != "lm" or c.model.causal == objective.causal,
          f"config.objective={c.objective!r} needs config.model.causal={objective.causal} "
          f"({objective.why}); set it, or choose the other objective")
  m = c.mlm
  require(0 < m.mask_rate < 1, f"config.mlm.mask_rate must be in (0, 1), got {m.mask_rate}")
  require(m.mask_fraction >= 0 and m.random_fraction >= 0
          and m.mask_fraction + m.random_fraction <= 1,
          "config.mlm.mask_fraction and random_fraction must be >= 0 with a sum <= 1, got "
          f"{m.mask_fraction} and {m.random_fraction}")


def classification_loss(logits, labels):
  """Mean cross-entropy of logits [batch, num_labels] against labels [batch] (−1: a padding row,
  ignored) → (loss, metrics: loss, accuracy, num_examples, and the confusion matrix
  [true, predicted] of the real rows)."""
  real = labels >= 0
  weight = real.astype(jnp.float32)
  n = weight.sum()
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None], axis=-1)[:, 0]
  loss = -(picked * weight).sum() / jnp.maximum(n, 1.0)
  predicted = jnp.argmax(logits, axis=-1)
  num_labels = logits.shape[-1]
  confusion = jnp.einsum("bt,bp->tp", jax.nn.one_hot(labels, num_labels) * weight[:, None],
                         jax.nn.one_hot(predicted, num_labels))
  accuracy = jnp.trace(confusion) / jnp.maximum(n, 1.0)
  return loss, {"loss": loss, "accuracy": accuracy, "num_examples": n, "confusion": confusion}
