import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bigflax import presets
from bigflax.errors import ConfigError
from bigflax.model import (Dropout, ModelConfig, Transformer, abstract_params, stack_layers,
                           unstack_layers)
from bigflax.objective import next_token_loss

CFG = ModelConfig(vocab_size=50, block_size=16, num_layers=2, num_heads=2, embed_dim=32,
                  mlp_dim=64)
OPTIONS = ("norm", "norm_eps", "positions", "rope_theta", "mlp", "use_bias", "tie_embeddings")


def preset_options(name: str) -> ModelConfig:
  """CFG's tiny sizes with the architecture options of a preset (GQA kept as 4 heads : 2)."""
  model = ml_collections.ConfigDict(dataclasses.asdict(CFG))
  presets.PRESETS[name](model)
  grouped = model.num_kv_heads not in (0, model.num_heads)
  return dataclasses.replace(CFG, num_heads=4, num_kv_heads=2 if grouped else 0,
                             **{k: model[k] for k in OPTIONS})


# Every distinct option combination the presets use, plus the layouts that change the code path.
COMBOS = {}
for _name in presets.PRESETS:
  COMBOS.setdefault(preset_options(_name), _name)
COMBOS = {name: cfg for cfg, name in COMBOS.items()}
COMBOS["llama2_70b_scanned_remat"] = dataclasses.replace(
    COMBOS["llama2_70b"], scan_layers=True, remat="save_dots")
COMBOS["gpt2_124m_scanned"] = dataclasses.replace(COMBOS["gpt2_124m"], scan_layers=True)
# The fast tier runs the two that cover every code path together; `pytest -m slow` the rest.
FAST = ("gpt2_124m", "llama2_70b_scanned_remat")
EVERY_COMBO = [pytest.param(cfg, id=name, marks=() if name in FAST else pytest.mark.slow)
               for name, cfg in COMBOS.items()]


class Jitted:
  """A Transformer whose init and apply are jitted: tests then compile once instead of
  dispatching (and compiling) every operation eagerly."""

  def __init__(self, cfg):
    self.cfg, self.module = cfg, Transformer(cfg)
    self.apply = jax.jit(self.module.apply, static_argnames=("deterministic",))


def init(cfg=CFG):
  model = Jitted(cfg)
  params = jax.jit(model.module.init)(jax.random.key(0), jnp.zeros((1, cfg.block_size),
                                                                   jnp.int32))
  return model, nn.unbox(params)["params"]


def test_presets_set_the_published_architectures():
  for name, cfg in COMBOS.items():
    gpt = name.startswith("gpt")
    assert (cfg.norm, cfg.positions, cfg.mlp) == (
        ("layernorm", "learned", "gelu_tanh") if gpt else ("rmsnorm", "rope", "swiglu")), name
    assert cfg.use_bias == cfg.tie_embeddings == gpt, name
  model = ml_collections.ConfigDict(dataclasses.asdict(CFG))
  presets.PRESETS["llama2_70b"](model)
  assert (model.num_heads, model.num_kv_heads, model.mlp_dim) == (64, 8, 28672)


def test_logits_shape_and_dtype():
  model, params = init()
  tokens = jnp.ones((3, 10), jnp.int32)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 10, 50) and logits.dtype == jnp.float32


@pytest.mark.parametrize("cfg", EVERY_COMBO)
def test_causal_future_tokens_do_not_change_past_logits(cfg):
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % 50)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
  assert np.abs(np.asarray(a[:, 9:] - b[:, 9:])).max() > 1e-3


def test_every_param_has_logical_axes_matching_its_rank():
  boxed = abstract_params(Transformer(CFG), CFG.block_size)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim
  specs = jax.tree.leaves(nn.get_partition_spec(boxed),
                          is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert ("embed", "heads", "head_dim") in [tuple(s) for s in specs]
  assert ("embed", "mlp") in [tuple(s) for s in specs]


def test_tied_and_untied_output_projection():
  _, tied = init()
  _, untied = init(ModelConfig(**{**CFG.__dict__, "tie_embeddings": False}))
  assert "lm_head" not in tied and untied["lm_head"]["kernel"].shape == (32, 50)


def test_bias_free_model_has_no_biases():
  _, params = init(ModelConfig(**{**CFG.__dict__, "use_bias": False}))
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  assert not [n for n in names if "bias" in n]


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  model, params = init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32))
  assert logits.dtype == jnp.float32  # the loss's log-softmax needs f32 logits
  ref = init()[0].apply({"params": params}, jnp.ones((1, 8), jnp.int32))
  np.testing.assert_allclose(logits, ref, atol=0.1)
  assert not np.array_equal(logits, ref)  # the bf16 products did run


def test_dropout_is_active_only_when_not_deterministic():
  cfg = ModelConfig(**{**CFG.__dict__, "dropout": 0.5})
  model, params = init(cfg)
  tokens = jnp.ones((1, 8), jnp.int32)
  eval_a = model.apply({"params": params}, tokens)
  eval_b = model.apply({"params": params}, tokens)
  train = model.apply({"params": params}, tokens, deterministic=False,
                      rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(eval_a, eval_b)
  assert np.abs(np.asarray(train - eval_a)).max() > 1e-3


@pytest.mark.parametrize("rate, shape", [(0.2, (64, 6, 130)), (0.5, (30, 1001))])
def test_dropout_drops_its_rate_and_keeps_the_expectation(rate, shape):
  x = jnp.ones(shape)
  y = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(0)})
  kept = np.asarray(y) != 0
  tolerance = 4 * (rate * (1 - rate) / kept.size) ** 0.5  # 4 standard deviations
  assert abs(kept.mean() - (1 - rate)) < tolerance
  np.testing.assert_allclose(np.asarray(y)[kept], 256 / round((1 - rate) * 256))
  assert abs(float(y.mean()) - 1.0) < 3 * tolerance  # inverted dropout: the mean is unchanged
  assert 0 < kept[..., -3:].mean() < 1  # the tail of an axis not divisible by 4 is random too
  rows = kept.reshape(-1, shape[-1])
  assert not (rows == rows[0]).all()  # every row has its own draw
  other = Dropout(rate).apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.array_equal(np.asarray(other) != 0, kept)
  np.testing.assert_array_equal(Dropout(rate).apply({}, x, deterministic=True), x)


def test_sequence_longer_than_block_size_is_rejected():
  model, params = init()
  with pytest.raises(ValueError, match="block_size"):
    model.apply({"params": params}, jnp.ones((1, 17), jnp.int32))


@pytest.mark.parametrize("cfg", EVERY_COMBO)
def test_initial_loss_is_near_uniform_and_a_tiny_batch_can_be_overfitted(cfg):
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, 50)
  inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], jnp.ones((2, 16))
  tx = optax.adam(1e-2)

  def loss_fn(params):
    return next_token_loss(model.apply({"params": params}, inputs), targets, mask)[0]

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(60):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert abs(losses[0] - np.log(50)) < 0.3, losses[0]  # small init: near-uniform predictions
  assert losses[-1] < 0.1, losses[-1]


@pytest.mark.parametrize("name", ["gpt2_124m", "llama2_70b"])
def test_a_packed_row_equals_its_documents_run_separately(name):
  model, params = init(COMBOS[name])
  a = jax.random.randint(jax.random.key(1), (1, 5), 0, 50)
  b = jax.random.randint(jax.random.key(2), (1, 8), 0, 50)
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 8 + [0] * 3])
  positions = jnp.array([list(range(5)) + list(range(8)) + [0, 1, 2]])
  logits = model.apply({"params": params}, packed, positions, segment_ids)
  np.testing.assert_allclose(logits[:, :5], model.apply({"params": params}, a), atol=1e-5)
  np.testing.assert_allclose(logits[:, 5:13], model.apply({"params": params}, b), atol=1e-5)


@pytest.mark.parametrize("chunk", [6])  # 16 = 6 + 6 + 4: full chunks and a short last one
def test_chunked_causal_attention_equals_the_full_square(chunk):
  cfg = COMBOS["llama2_70b"]  # grouped-query attention and rope: the most index bookkeeping
  model, params = init(cfg)
  chunked = Jitted(dataclasses.replace(cfg, attention_chunk=chunk))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  segment_ids = jnp.array([[1] * 7 + [2] * 9, [1] * 16])
  positions = jnp.array([list(range(7)) + list(range(9)), list(range(16))])
  np.testing.assert_allclose(
      chunked.apply({"params": params}, tokens, positions, segment_ids),
      model.apply({"params": params}, tokens, positions, segment_ids), atol=1e-5)

  def loss(apply, params):
    return apply({"params": params}, tokens, positions, segment_ids).mean()
  grads = [jax.grad(functools.partial(loss, m.apply))(params) for m in (chunked, model)]
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-6), *grads)


def test_grouped_query_attention_shares_key_value_heads():
  boxed = abstract_params(Transformer(COMBOS["llama2_70b"]), 8)
  attn = boxed["block_0"]["attn"]
  assert attn["query"]["kernel"].value.shape == (32, 4, 8)
  assert attn["key"]["kernel"].value.shape == (32, 2, 8)
  assert attn["value"]["kernel"].names == ("embed", "kv_heads", "head_dim")


def test_scanned_params_sit_on_a_layers_axis():
  cfg = dataclasses.replace(CFG, scan_layers=True)
  boxed = abstract_params(Transformer(cfg), 8)
  assert set(boxed) == {"blocks", "token_embed", "position_embed", "norm_final"}
  kernel = boxed["blocks"]["attn"]["query"]["kernel"]
  assert kernel.names == ("layers", "embed", "heads", "head_dim")
  assert kernel.value.shape == (2, 32, 2, 16)


# save_dots runs scanned in the llama2_70b_scanned_remat combo above.
@pytest.mark.parametrize("remat", [pytest.param("none", marks=pytest.mark.slow), "full"])
def test_scanned_and_unscanned_models_agree_in_outputs_and_gradients(remat):
  cfg = dataclasses.replace(COMBOS["llama2_70b"], remat=remat)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  _, params = init(cfg)
  stacked = stack_layers(params, cfg.num_layers)
  jax.tree.map(np.testing.assert_array_equal, unstack_layers(stacked), params)
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)

  @functools.partial(jax.jit, static_argnums=0)
  @functools.partial(jax.value_and_grad, argnums=1, has_aux=True)
  def loss(cfg, params):
    logits = Transformer(cfg).apply({"params": params}, tokens[:, :-1])
    return next_token_loss(logits, tokens[:, 1:], jnp.ones((2, 15)))[0], logits

  (loss_a, logits_a), grads_a = loss(cfg, params)
  (loss_b, logits_b), grads_b = loss(scanned, stacked)
  np.testing.assert_allclose(logits_a, logits_b, atol=1e-6)
  np.testing.assert_allclose(loss_a, loss_b, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads_a,
               unstack_layers(grads_b))


@pytest.mark.parametrize("causal", [True, False])
def test_bidirectional_attention_sees_the_future_and_never_crosses_segments(causal):
  cfg = dataclasses.replace(CFG, causal=causal)
  model, params = init(cfg)
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 50)
  segments = jnp.array([[1] * 6 + [2] * 6 + [0] * 4])
  positions = jnp.array([list(range(6)) * 2 + [0] * 4])
  logits = lambda t: model.apply({"params": params}, t, positions, segments)
  base = logits(tokens)
  later = logits(tokens.at[0, 4].set((tokens[0, 4] + 1) % 50))  # a later token of segment 1
  other = logits(tokens.at[0, 9].set((tokens[0, 9] + 1) % 50))  # a token of segment 2
  changed = np.abs(np.asarray(later - base)).max(-1)[0]
  # Position 0 reads position 4 only when bidirectional; position 5 (after it) always does.
  assert (changed[0] > 1e-4) == (not causal) and changed[5] > 1e-4
  np.testing.assert_array_equal(np.asarray(later)[0, 6:12], np.asarray(base)[0, 6:12])
  np.testing.assert_array_equal(np.asarray(other)[0, :6], np.asarray(base)[0, :6])


def test_a_bidirectional_model_refuses_decoding():
  model = Transformer(dataclasses.replace(CFG, causal=False))
  with pytest.raises(ConfigError, match="only a causal language model generates text"):
    model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), decode=True)


@pytest.mark.parametrize("name", ["gpt2_124m", "llama2_7b"])
def test_presets_compute_in_bf16_with_f32_params_logits_and_loss(name):
  model = ml_collections.ConfigDict(dataclasses.asdict(CFG))
  presets.PRESETS[name](model)
  assert (model.dtype, model.param_dtype) == ("bfloat16", "float32")
  assert (CFG.dtype, CFG.param_dtype) == ("float32", "float32")  # the CPU-sized default
  # The preset's options and precision at CFG's tiny sizes (tied and untied output heads).
  cfg = dataclasses.replace(CFG, **{k: model[k] for k in (*OPTIONS, "dtype", "param_dtype")})
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), tokens))["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits, variables = Transformer(cfg).apply({"params": params}, tokens,
                                             capture_intermediates=True)
  blocks = [v for path, v in jax.tree_util.tree_leaves_with_path(variables)
            if "mlp" in jax.tree_util.keystr(path)]
  assert blocks and all(x.dtype == jnp.bfloat16 for x in blocks)  # computed in bf16
  assert logits.dtype == jnp.float32
  loss, _ = next_token_loss(logits, tokens, jnp.ones_like(tokens))
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
