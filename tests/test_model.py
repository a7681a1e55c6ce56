import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigflax.model import ModelConfig, Transformer, abstract_params

CFG = ModelConfig(vocab_size=50, block_size=16, num_layers=2, num_heads=2, embed_dim=32,
                  mlp_dim=64)


def init(cfg=CFG):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, cfg.block_size), jnp.int32)))
  return model, params["params"]


def test_logits_shape_and_dtype():
  model, params = init()
  tokens = jnp.ones((3, 10), jnp.int32)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (3, 10, 50) and logits.dtype == jnp.float32


def test_causal_future_tokens_do_not_change_past_logits():
  model, params = init()
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


def test_bfloat16_compute_keeps_float32_params():
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  model, params = init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits = model.apply({"params": params}, jnp.ones((1, 8), jnp.int32))
  assert logits.dtype == jnp.bfloat16
  _, ref_params = init()
  ref = Transformer(CFG).apply({"params": params}, jnp.ones((1, 8), jnp.int32))
  np.testing.assert_allclose(np.asarray(logits, np.float32), ref, atol=0.1)


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


def test_sequence_longer_than_block_size_is_rejected():
  model, params = init()
  with pytest.raises(ValueError, match="block_size"):
    model.apply({"params": params}, jnp.ones((1, 17), jnp.int32))
