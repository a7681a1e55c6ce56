"""Decoding speed: tokens/s of the KV-cache sampler (bigflax.decode.generate) vs recomputing the
whole context for every new token, at 256 tokens of context.

    python tools/bench_decode.py [--batch 1 8] [--trials 5]

Both sides run their token loop inside one jitted program (greedy, same model, same prompt), so
the ratio measures the cache, not Python overhead. The cache side includes its prefill. Rounds
alternate between the two and report the median; the target is a ratio ≥ 10×.
"""

import argparse
import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigflax.decode import generate
from bigflax.model import ModelConfig, Transformer


@functools.partial(jax.jit, static_argnames=("model", "num_new"))
def recompute_generate(params, tokens, *, model, num_new):
  """Greedy: tokens [batch, context + num_new] with the context filled; each step runs the model
  over the whole (fixed-size) buffer and reads the logits after the last filled token."""
  context = tokens.shape[1] - num_new

  def step(i, tokens):
    logits = model.apply({"params": params}, tokens)[:, context + i - 1]
    return tokens.at[:, context + i].set(jnp.argmax(logits, axis=-1).astype(tokens.dtype))

  return jax.lax.fori_loop(0, num_new, step, tokens)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--context", type=int, default=256)
  parser.add_argument("--new_tokens", type=int, default=64)
  parser.add_argument("--trials", type=int, default=5)
  args = parser.parse_args()
  cfg = ModelConfig(vocab_size=256, block_size=args.context + args.new_tokens, num_layers=6,
                    num_heads=6, embed_dim=384, mlp_dim=1536)
  model = Transformer(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  params = params["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"model: {cfg.num_layers} layers × {cfg.embed_dim} ({n_params / 1e6:.1f}M params), "
        f"context {args.context}, {args.new_tokens} new tokens, f32, "
        f"{jax.devices()[0].platform}")
  for batch in args.batch:
    prompts = np.random.default_rng(0).integers(0, 256, (batch, args.context), np.int32)
    buffer = jnp.zeros((batch, args.context + args.new_tokens), jnp.int32)
    buffer = buffer.at[:, :args.context].set(prompts)

    def cached():
      return np.stack(generate(model, params, list(prompts), max_new_tokens=args.new_tokens,
                               rng=jax.random.key(0), temperature=0.0))

    def recompute():
      out = recompute_generate(params, buffer, model=model, num_new=args.new_tokens)
      return np.asarray(out[:, args.context:])

    same = np.array_equal(cached(), recompute())  # also compiles both
    times = {"cache": [], "recompute": []}
    for _ in range(args.trials):
      for name, fn in (("cache", cached), ("recompute", recompute)):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
    rate = {k: batch * args.new_tokens / statistics.median(v) for k, v in times.items()}
    print(f"batch {batch}: cache {rate['cache']:,.0f} tokens/s, recompute "
          f"{rate['recompute']:,.0f} tokens/s, speedup {rate['cache'] / rate['recompute']:.1f}× "
          f"(greedy tokens identical: {same})")


if __name__ == "__main__":
  main()
