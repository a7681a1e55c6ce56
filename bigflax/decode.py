"""Sampling with a key/value cache: a jitted prefill, then a jitted loop of one-token steps.

The cache ([layers], batch, block_size, kv_heads, head_dim per key and value) is preallocated, so
each new token costs one token's forward pass instead of a recompute of the whole context. Prompts
of different lengths share a batch: they are right-padded, and each row writes its next token at
its own position (the padding's cache slots are overwritten before any query can see them).

When a row's context reaches block_size, generation continues from a fresh prefill of its last
block_size // 2 tokens (the model has never seen positions past block_size).
"""

import functools

import flax.linen as nn
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


def init_cache(model: nn.Module, batch_size: int):
  """An all-zero cache for `batch_size` rows of up to block_size tokens."""
  shapes = jax.eval_shape(functools.partial(model.init, decode=True), jax.random.key(0),
                          jnp.zeros((batch_size, 1), jnp.int32))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def prefill(model: nn.Module, params, cache, tokens, lengths):
  """Writes right-padded tokens [batch, length] into the cache; returns (cache, the logits
  [batch, vocab] after each row's last real token, at index lengths - 1)."""
  logits, variables = model.apply({"params": params, "cache": cache}, tokens, decode=True,
                                  mutable=["cache"])
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
  return variables["cache"], last


def decode_step(model: nn.Module, params, cache, tokens, positions):
  """Adds one token per row (tokens, positions: [batch]); returns (cache, next logits [batch,
  vocab])."""
  logits, variables = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                  positions[:, None], decode=True, mutable=["cache"])
  return variables["cache"], logits[:, 0]


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "temperature", "top_k",
                                             "top_p", "vocab_size"))
def _sample_window(params, tokens, lengths, budget, stop_tokens, done, rng, *, model, num_steps,
                   temperature, top_k, top_p, vocab_size):
  """Prefills `tokens` and samples up to `budget` (≤ num_steps) tokens per row in one
  lax.while_loop, stopping early once every row is done. Returns ([batch, num_steps] tokens, the
  number of steps taken, done)."""
  cache, logits = prefill(model, params, init_cache(model, tokens.shape[0]), tokens, lengths)
  out = jnp.zeros((tokens.shape[0], num_steps), jnp.int32)

  def keep_going(state):
    i, _, _, done, _ = state
    return (i < budget) & ~done.all()

  def step(state):
    i, cache, logits, done, out = state
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                             vocab_size=vocab_size)
    token = jax.random.categorical(jax.random.fold_in(rng, i), filtered).astype(jnp.int32)
    out = out.at[:, i].set(token)
    done = done | jnp.isin(token, stop_tokens)
    cache, logits = decode_step(model, params, cache, token, lengths + i)
    return i + 1, cache, logits, done, out

  num, _, _, done, out = jax.lax.while_loop(keep_going, step, (0, cache, logits, done, out))
  return out, num, done


def generate(model: nn.Module, params, prompts, *, max_new_tokens: int, rng,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens=(), vocab_size: int | None = None) -> list[np.ndarray]:
  """Continues each 1-D prompt (at least one id each) by up to `max_new_tokens` ids.

  A row ends early at its first stop token, which is not returned. temperature 0 is greedy;
  top_k=0 and top_p=1.0 are off; ids ≥ vocab_size (default: the model's) are never drawn."""
  block_size = model.cfg.block_size
  vocab_size = vocab_size or model.cfg.vocab_size
  contexts = [list(map(int, p)) for p in prompts]
  if not all(contexts):
    raise UserError("every prompt needs at least one token")
  new = [[] for _ in contexts]
  done = np.zeros(len(contexts), bool)
  stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
  # Prompts longer than block_size - 1 keep their last tokens; later windows keep half the cache.
  keep = block_size - 1
  window = steps = 0
  while not done.all() and steps < max_new_tokens:
    rows = [(c + n)[-keep:] for c, n in zip(contexts, new)]
    lengths = np.array([len(r) for r in rows], np.int32)
    tokens = np.zeros((len(rows), block_size), np.int32)
    for b, row in enumerate(rows):
      tokens[b, :len(row)] = row
    budget = min(block_size - int(lengths.max()) + 1, max_new_tokens - steps)
    out, num, now_done = _sample_window(
        params, jnp.asarray(tokens), jnp.asarray(lengths), budget, stops, jnp.asarray(done),
        jax.random.fold_in(rng, window), model=model, num_steps=block_size,
        temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
    out, num = np.asarray(out), int(num)
    for b in range(len(rows)):
      if not done[b]:
        new[b].extend(out[b, :num].tolist())
    done = np.asarray(now_done)
    keep, window, steps = block_size // 2, window + 1, steps + num
  stop_set = set(stop_tokens)
  return [np.asarray(_until_stop(n, stop_set), np.int32) for n in new]


def _until_stop(tokens: list[int], stop_set: set[int]) -> list[int]:
  return next((tokens[:i] for i, t in enumerate(tokens) if t in stop_set), tokens)


def sample_text(model: nn.Module, params, tokenizer, prompt: str, *, max_new_tokens: int,
                temperature: float, top_k: int, top_p: float, seed: int) -> str:
  """The continuation of `prompt` as text."""
  prompt_ids = tokenizer.encode(prompt)
  if not len(prompt_ids):
    raise UserError("the prompt is empty; give at least one character to continue")
  [ids] = generate(model, params, [prompt_ids], max_new_tokens=max_new_tokens,
                   rng=jax.random.key(seed), temperature=temperature, top_k=top_k, top_p=top_p,
                   vocab_size=tokenizer.vocab_size)
  return tokenizer.decode(ids)
