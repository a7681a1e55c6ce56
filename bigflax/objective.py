"""The maximum-likelihood next-token objective.

loss = mean over real positions t of −log p(targets_t | inputs_≤t), where real means loss_mask=1,
plus optionally z_loss × the mean of log²Z, Z the softmax normalizer (PaLM, Chowdhery et al.
2022): it pulls log Z towards 0 so the logits cannot drift to magnitudes where bf16 loses them.
"""

import jax
import jax.numpy as jnp


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
  mask = loss_mask.astype(jnp.float32)
  num_tokens = mask.sum()
  # max(…, 1) keeps an all-masked batch finite (loss 0) instead of 0/0.
  denominator = jnp.maximum(num_tokens, 1.0)
  cross_entropy = -(token_log_likelihood(logits, targets) * mask).sum() / denominator
  log_z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  z_term = z_loss * (jnp.square(log_z) * mask).sum() / denominator
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = (correct * mask).sum() / denominator
  return cross_entropy + z_term, {"loss": cross_entropy, "z_loss": z_term, "accuracy": accuracy,
                                  "num_tokens": num_tokens}
