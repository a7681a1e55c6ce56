"""The maximum-likelihood next-token objective.

loss = mean over real positions t of −log p(targets_t | inputs_≤t), where real means loss_mask=1.
"""

import jax
import jax.numpy as jnp


def token_log_likelihood(logits, targets):
  """log p(target) per position, in f32 with a max-subtracted (stable) log-softmax."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def next_token_loss(logits, targets, loss_mask):
  """Returns (mean loss over real tokens, metrics dict with loss, accuracy and the token count).

  logits: [batch, length, vocab]; targets: [batch, length] ints; loss_mask: [batch, length] in
  {0, 1}. Masked positions contribute nothing to the loss, its gradient or the accuracy.
  """
  mask = loss_mask.astype(jnp.float32)
  num_tokens = mask.sum()
  # max(…, 1) keeps an all-masked batch finite (loss 0) instead of 0/0.
  denominator = jnp.maximum(num_tokens, 1.0)
  loss = -(token_log_likelihood(logits, targets) * mask).sum() / denominator
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  accuracy = (correct * mask).sum() / denominator
  return loss, {"loss": loss, "accuracy": accuracy, "num_tokens": num_tokens}
