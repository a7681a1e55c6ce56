"""Sampling from a trained model: temperature, top-k and top-p (nucleus) over full recomputes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bigflax.errors import UserError


def filter_logits(logits, *, temperature: float, top_k: int, top_p: float, vocab_size: int):
  """f32 logits [..., V] → logits to sample from; ids ≥ vocab_size (padding) are never drawn.

  top_k=0 and top_p=1.0 switch those filters off; temperature 0 means greedy (argmax)."""
  logits = logits.astype(jnp.float32)
  neg_inf = jnp.finfo(jnp.float32).min
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, neg_inf)
  if temperature == 0:
    return jnp.where(logits == logits.max(-1, keepdims=True), 0.0, neg_inf)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    # Keep the smallest set of tokens whose probability reaches top_p (always at least one).
    cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("apply_fn", "temperature", "top_k", "top_p",
                                             "vocab_size"))
def _next_token(params, window, position, rng, *, apply_fn, temperature, top_k, top_p,
                vocab_size):
  logits = apply_fn({"params": params}, window)[:, position]
  logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                         vocab_size=vocab_size)
  return jax.random.categorical(rng, logits)


def generate(apply_fn, params, prompt: np.ndarray, *, block_size: int, max_new_tokens: int,
             rng, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             vocab_size: int) -> np.ndarray:
  """Continues the 1-D `prompt` by `max_new_tokens` ids, recomputing the last `block_size` tokens
  for each one (the window is padded to block_size so a single compilation serves every step)."""
  tokens = list(int(t) for t in prompt)
  for i in range(max_new_tokens):
    context = tokens[-block_size:]
    window = np.zeros((1, block_size), np.int32)
    window[0, :len(context)] = context
    token = _next_token(params, jnp.asarray(window), len(context) - 1,
                        jax.random.fold_in(rng, i), apply_fn=apply_fn, temperature=temperature,
                        top_k=top_k, top_p=top_p, vocab_size=vocab_size)
    tokens.append(int(token[0]))
  return np.asarray(tokens[len(prompt):], np.int32)


def sample_text(apply_fn, params, tokenizer, block_size: int, prompt: str, *,
                max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                seed: int) -> str:
  """The continuation of `prompt` as text."""
  prompt_ids = tokenizer.encode(prompt)
  if not len(prompt_ids):
    raise UserError("the prompt is empty; give at least one character to continue")
  ids = generate(apply_fn, params, prompt_ids, block_size=block_size,
                 max_new_tokens=max_new_tokens, rng=jax.random.key(seed),
                 temperature=temperature, top_k=top_k, top_p=top_p,
                 vocab_size=tokenizer.vocab_size)
  return tokenizer.decode(ids)
