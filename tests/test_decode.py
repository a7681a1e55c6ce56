import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigflax.decode import decode_step, filter_logits, generate, init_cache, prefill
from bigflax.model import ModelConfig, Transformer

LOGITS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def kept(**kw):
  args = dict(temperature=1.0, top_k=0, top_p=1.0, vocab_size=4) | kw
  return np.asarray(filter_logits(LOGITS, **args) > -1e30)[0].tolist()


def test_filters():
  assert kept() == [True, True, True, True]
  assert kept(top_k=2) == [True, True, False, False]
  assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7 ≤ 0.8
  assert kept(top_p=0.5) == [True, False, False, False]
  assert kept(temperature=0.0) == [True, False, False, False]  # greedy
  assert kept(vocab_size=3) == [True, True, True, False]  # padded ids never sampled


def test_temperature_sharpens_the_distribution():
  hot = jax.nn.softmax(filter_logits(LOGITS, temperature=2.0, top_k=0, top_p=1.0, vocab_size=4))
  cold = jax.nn.softmax(filter_logits(LOGITS, temperature=0.5, top_k=0, top_p=1.0,
                                      vocab_size=4))
  assert cold[0, 0] > 0.5 > hot[0, 0]

GPT = ModelConfig(vocab_size=50, block_size=16, num_layers=2, num_heads=4, embed_dim=32,
                  mlp_dim=64)
LLAMA_GQA_SCANNED = ModelConfig(**{**GPT.__dict__, "norm": "rmsnorm", "positions": "rope",
                                   "mlp": "swiglu", "num_kv_heads": 2, "use_bias": False,
                                   "tie_embeddings": False, "scan_layers": True})


def make(cfg):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))["params"]
  return model, params


@pytest.mark.parametrize("cfg", [GPT, LLAMA_GQA_SCANNED], ids=["gpt", "llama_gqa_scanned"])
def test_cached_logits_equal_full_recompute_at_every_position(cfg):
  model, params = make(cfg)
  sequences = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  full = np.asarray(jax.jit(model.apply)({"params": params}, sequences))
  lengths = np.array([5, 2])
  # Right-padded prompts whose padding is junk: it must never leak into a real position.
  prompts = np.where(np.arange(16) < lengths[:, None], sequences, 49)
  cache, logits = jax.jit(prefill, static_argnums=0)(model, params, init_cache(model, 2),
                                                     jnp.asarray(prompts), jnp.asarray(lengths))
  rows = np.arange(2)
  np.testing.assert_allclose(logits, full[rows, lengths - 1], atol=1e-5)
  step = jax.jit(decode_step, static_argnums=0)
  for i in range(16 - lengths.max()):
    positions = lengths + i
    cache, logits = step(model, params, cache, sequences[rows, positions], jnp.asarray(positions))
    np.testing.assert_allclose(logits, full[rows, positions], atol=1e-5)


def greedy_by_recompute(model, params, prompt, n):
  apply = jax.jit(model.apply)
  tokens = list(prompt)
  for _ in range(n):
    window = np.zeros((1, model.cfg.block_size), np.int32)  # one shape: one compilation
    window[0, :len(tokens)] = tokens
    logits = apply({"params": params}, jnp.asarray(window))
    tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
  return tokens[len(prompt):]


def test_greedy_generation_of_a_ragged_batch_matches_recomputing():
  model, params = make(GPT)
  prompts = [np.array([3, 1, 4, 1, 5]), np.array([9]), np.array([2, 6, 5])]
  out = generate(model, params, prompts, max_new_tokens=8, rng=jax.random.key(0),
                 temperature=0.0)
  for prompt, row in zip(prompts, out):
    assert row.tolist() == greedy_by_recompute(model, params, prompt, 8)
  # top_k=1 is greedy too, whatever the temperature.
  top1 = generate(model, params, prompts, max_new_tokens=8, rng=jax.random.key(5), top_k=1)
  assert [r.tolist() for r in top1] == [r.tolist() for r in out]


def test_a_stop_token_ends_its_row_only():
  model, params = make(GPT)
  prompts = [np.array([3, 1, 4]), np.array([7, 7])]
  free = generate(model, params, prompts, max_new_tokens=10, rng=jax.random.key(0))
  first_new = [i for i, t in enumerate(free[0]) if t not in free[0][:i]]
  cut = next(i for i in first_new if i >= 2)  # a token row 0 draws for the first time
  stop = int(free[0][cut])
  stopped = generate(model, params, prompts, max_new_tokens=10, rng=jax.random.key(0),
                     stop_tokens=[stop])
  assert stopped[0].tolist() == free[0][:cut].tolist()
  expected_1 = free[1].tolist()
  if stop in expected_1:
    expected_1 = expected_1[:expected_1.index(stop)]
  assert stopped[1].tolist() == expected_1


def test_sampling_is_seeded_and_respects_top_k_and_the_vocabulary():
  model, params = make(GPT)
  kw = dict(max_new_tokens=12, temperature=1.5, top_k=5, vocab_size=40)
  a = generate(model, params, [np.array([1, 2])], rng=jax.random.key(3), **kw)[0]
  b = generate(model, params, [np.array([1, 2])], rng=jax.random.key(3), **kw)[0]
  c = generate(model, params, [np.array([1, 2])], rng=jax.random.key(4), **kw)[0]
  assert a.tolist() == b.tolist() and a.tolist() != c.tolist()
  assert a.max() < 40
  # Each draw is among the 5 most likely after its context (causal: one forward pass has all).
  logits = model.apply({"params": params}, jnp.asarray([[1, 2] + a.tolist()]))[0, 1:-1, :40]
  top5 = np.argsort(np.asarray(logits), axis=-1)[:, -5:]
  assert all(token in row for token, row in zip(a, top5))


def test_generation_continues_past_the_block_size():
  model, params = make(GPT)
  out = generate(model, params, [np.arange(20) % 50, np.array([1])], max_new_tokens=40,
                 rng=jax.random.key(0), temperature=0.0)
  assert [len(r) for r in out] == [40, 40]
  # The first window is exact: up to block_size tokens of context, like recomputing.
  assert out[1][:15].tolist() == greedy_by_recompute(model, params, [1], 15)
