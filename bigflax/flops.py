"""Model FLOPs and peak FLOP/s: the two halves of MFU (model FLOPs utilisation).

Training FLOPs per token (PaLM's accounting, appendix B; the usual MFU definition):

    6 · N  +  12 · L · T · (heads · head_dim)

N counts the parameters that take part in a matmul per token (every kernel, plus the output
projection — which is the embedding table when tied; lookup tables such as learned positions do
no matmul and are not counted). Each such parameter costs 2 FLOPs in the forward pass and 4 in
the backward. The attention term covers QKᵀ and the attention-weighted sum of V: 2·T·d each per
token per layer forward, ×3 with the backward, where T is the sequence length and d = heads ·
head_dim. Rematerialisation is not counted (it is overhead, not model work), nor are norms,
softmax and the optimizer.
"""

import jax
import numpy as np


def matmul_params(params, tie_embeddings: bool) -> int:
  """N above: every ≥2-D leaf except embedding tables, plus the tied output projection."""
  count = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", "")) for k in path]
    if "embedding" in names:
      if tie_embeddings and "token_embed" in names:
        count += int(np.prod(leaf.shape))
      continue
    if len(leaf.shape) >= 2:
      count += int(np.prod(leaf.shape))
  return count


def train_flops_per_token(params, model_config) -> float:
  """The formula above for `params` of a model built from `model_config` (config.model)."""
  m = model_config
  return (6 * matmul_params(params, m.tie_embeddings)
          + 12 * m.num_layers * m.block_size * m.embed_dim)
