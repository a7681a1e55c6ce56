"""The model-FLOPs formula (bigflax/flops.py), counted by hand and against XLA's own count."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from bigflax import flops
from bigflax.model import ModelConfig, Transformer, abstract_params

VOCAB, BLOCK, LAYERS, EMBED, HEADS = 16, 8, 2, 8, 2


def model_config(**overrides):
  m = ml_collections.ConfigDict(dict(vocab_size=VOCAB, block_size=BLOCK, num_layers=LAYERS,
                                     num_heads=HEADS, embed_dim=EMBED, mlp_dim=4 * EMBED,
                                     use_bias=False, tie_embeddings=True))
  m.update(overrides)
  return m


def params_of(m):
  return nn.unbox(abstract_params(Transformer(ModelConfig(**m.to_dict())), m.block_size))


@pytest.mark.parametrize("tied", [True, False])
def test_formula_counts_kernels_and_the_output_projection(tied):
  m = model_config(tie_embeddings=tied)
  # Per layer: q, k, v, out (E×E each) and up, down (E×4E each); then the E×V output projection
  # (the tied embedding or lm_head). The learned position table is a lookup: not counted.
  matmul_params = LAYERS * (4 * EMBED**2 + 8 * EMBED**2) + EMBED * VOCAB
  attention = 12 * LAYERS * BLOCK * EMBED
  assert flops.train_flops_per_token(params_of(m), m) == 6 * matmul_params + attention


def test_formula_agrees_with_xla_cost_analysis_of_forward_and_backward():
  m = model_config(vocab_size=64, block_size=32, embed_dim=64, num_heads=4, mlp_dim=256)
  model = Transformer(ModelConfig(**m.to_dict()))
  params = params_of(m)
  tokens = jnp.zeros((4, m.block_size), jnp.int32)

  def loss(params):
    return model.apply({"params": params}, tokens).sum()
  cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  analytic = flops.train_flops_per_token(params, m) * tokens.size
  # XLA also counts the elementwise work (softmax, norms, GELU) the formula leaves out.
  assert 1.0 <= cost["flops"] / analytic < 1.15
