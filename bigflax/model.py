"""A decoder-only Transformer (GPT) in Flax linen.

The model knows nothing about devices: every parameter is created with logical axis names and the
main activations are constrained with logical names. `bigflax.sharding` maps those names onto a
mesh, so the same module runs on one CPU or a pod slice.

Logical axes: batch, length, embed, heads, head_dim, mlp, vocab.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  block_size: int
  num_layers: int
  num_heads: int
  embed_dim: int
  mlp_dim: int
  dropout: float = 0.0
  use_bias: bool = True
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype of activations and matmuls
  param_dtype: str = "float32"

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @classmethod
  def from_config(cls, model_config) -> "ModelConfig":
    """From `config.model` (where mlp_dim=0 means 4 × embed_dim)."""
    fields = {f.name: model_config[f.name] for f in dataclasses.fields(cls)}
    fields["mlp_dim"] = fields["mlp_dim"] or 4 * fields["embed_dim"]
    return cls(**fields)


def abstract_params(model: nn.Module, length: int):
  """Shapes, dtypes and logical partitioning of the params, without allocating them."""
  tokens = jnp.zeros((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def _init(stddev, axes):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


class LayerNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(
        epsilon=1e-5, use_bias=self.cfg.use_bias, dtype=DTYPES[self.cfg.dtype],
        param_dtype=DTYPES[self.cfg.param_dtype], scale_init=_ones(("embed",)),
        bias_init=_zeros(("embed",)))(x)


class Einsum(nn.Module):
  """A linear map written as an einsum, so the kernel keeps its per-head shape (and logical axes)
  instead of being flattened to 2-D; the bias covers the output's trailing dimensions."""
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  stddev: float
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    dtype, param_dtype = DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
    kernel = self.param("kernel", _init(self.stddev, self.kernel_axes), self.kernel_shape,
                        param_dtype)
    y = jnp.einsum(self.equation, x.astype(dtype), kernel.astype(dtype))
    if self.cfg.use_bias:
      out_rank = len(self.equation.split("->")[1]) - 2  # all but batch and length
      y += self.param("bias", _zeros(self.kernel_axes[-out_rank:]),
                      self.kernel_shape[-out_rank:], param_dtype).astype(dtype)
    return y


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    # GPT-2 init: N(0, 0.02), and the projections that write into the residual stream are scaled
    # by 1/sqrt(2 * num_layers) so the residual variance does not grow with depth.
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5

    def project(name):
      return Einsum("ble,ehd->blhd", (cfg.embed_dim, cfg.num_heads, cfg.head_dim),
                    ("embed", "heads", "head_dim"), 0.02, cfg, name=name)(x)

    q, k, v = project("query"), project("key"), project("value")
    q, k, v = (nn.with_logical_constraint(t, ("batch", "length", "heads", "head_dim"))
               for t in (q, k, v))
    # Scores and softmax in f32 whatever the compute dtype: bf16 logits lose the small differences
    # that decide where attention goes.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(cfg.head_dim).astype(jnp.float32)
    length = x.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    weights = nn.Dropout(cfg.dropout)(weights, deterministic=deterministic)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    return Einsum("blhd,hde->ble", (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                  ("heads", "head_dim", "embed"), residual_std, cfg, name="out")(out)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    h = nn.Dense(cfg.mlp_dim, use_bias=cfg.use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=_init(0.02, ("embed", "mlp")), bias_init=_zeros(("mlp",)),
                 name="up")(x)
    h = nn.with_logical_constraint(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dense(cfg.embed_dim, use_bias=cfg.use_bias, dtype=dtype, param_dtype=param_dtype,
                 kernel_init=_init(0.02 / (2 * cfg.num_layers) ** 0.5, ("mlp", "embed")),
                 bias_init=_zeros(("embed",)), name="down")(h)
    return nn.Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-LayerNorm block: x + attn(ln(x)), then x + mlp(ln(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    h = CausalSelfAttention(self.cfg, name="attn")(
        LayerNorm(self.cfg, name="ln_attn")(x), deterministic=deterministic)
    x = x + nn.Dropout(self.cfg.dropout)(h, deterministic=deterministic)
    x = x + MLP(self.cfg, name="mlp")(LayerNorm(self.cfg, name="ln_mlp")(x),
                                      deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Transformer(nn.Module):
  """tokens [batch, length] int32 → logits [batch, length, vocab] (compute dtype)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens, *, deterministic: bool = True):
    cfg = self.cfg
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if tokens.shape[1] > cfg.block_size:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.block_size "
                       f"{cfg.block_size}")
    token_embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=_init(0.02, ("vocab", "embed")), name="token_embed")
    position_embed = nn.Embed(cfg.block_size, cfg.embed_dim, dtype=dtype,
                              param_dtype=param_dtype,
                              embedding_init=_init(0.02, (None, "embed")), name="position_embed")
    positions = jnp.arange(tokens.shape[1])[None, :]
    x = token_embed(tokens) + position_embed(positions)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    for i in range(cfg.num_layers):
      x = Block(cfg, name=f"block_{i}")(x, deterministic=deterministic)
    x = LayerNorm(cfg, name="ln_final")(x)
    if cfg.tie_embeddings:
      logits = token_embed.attend(x)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=_init(0.02, ("embed", "vocab")), name="lm_head")(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
