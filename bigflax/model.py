"""A Transformer in Flax linen, with the options GPT-2, GPT-3, Llama and BERT use.

The model knows nothing about devices: every parameter is created with logical axis names and the
main activations are constrained with logical names. `bigflax.sharding` maps those names onto a
mesh, so the same module runs on one CPU or a pod slice.

Logical axes: batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, layers (and lora,
the rank of LoRA adapters).

`causal` makes it a decoder (GPT) or a bidirectional encoder (BERT) with the same modules;
`num_labels` > 0 puts a classifier on it in place of the LM head.

The fields are `ModelConfig`'s (bigflax/config.py); the options are registries at the end of this
file, chosen by name: norm (NORMS), positions (POSITIONS), mlp (MLPS), remat (REMAT_POLICIES),
dtype (DTYPES). num_kv_heads < num_heads gives grouped-query attention; scan_layers runs the blocks
with one nn.scan over params stacked on a leading `layers` axis, so compile time does not grow
with depth.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigflax import attention
from bigflax.config import ModelConfig
from bigflax.errors import ConfigError
from bigflax.layers import DTYPES, Dropout, Einsum, matmul, ones_init, param_init, zeros_init


class SelfAttention(nn.Module):
  """Attention of each token to the earlier tokens of its own segment (causal), or to all of them.

  With decode=True the keys and values are also written into a preallocated "cache" collection
  ([batch, block_size, kv_heads, head_dim], slot = position) and the queries attend to every
  cached slot at or before their position: one call can prefill a prompt or add one token."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids, *, deterministic: bool):
    cfg = self.cfg

    def project(name, heads, heads_axis):
      y = Einsum("ble,ehd->blhd", (cfg.embed_dim, heads, cfg.head_dim),
                 ("embed", heads_axis, "head_dim"), _hidden_std(cfg), cfg, name=name)(x)
      return nn.with_logical_constraint(y, ("batch", "length", heads_axis, "head_dim"))

    q = project("query", cfg.num_heads, "heads")
    k = project("key", cfg.kv_heads, "kv_heads")
    v = project("value", cfg.kv_heads, "kv_heads")
    q, k = POSITIONS[cfg.positions].rotate(q, k, positions, cfg)

    if self.decode:
      k, v = self._write_cache(k, v, positions)
    out = attention.attend(q, k, v, segment_ids, cfg, deterministic=deterministic,
                           decode_positions=positions if self.decode else None,
                           initializing=self.is_initializing())
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))
    return Einsum("blhd,hde->ble", (cfg.num_heads, cfg.head_dim, cfg.embed_dim),
                  ("heads", "head_dim", "embed"), _residual_std(cfg), cfg, name="out")(out)

  def _write_cache(self, k, v, positions):
    """Stores k, v [batch, length, kv_heads, head_dim] at their positions; returns whole caches."""
    shape = (k.shape[0], self.cfg.block_size, *k.shape[2:])
    rows = jnp.arange(k.shape[0])[:, None]
    caches = []
    for name, new in (("cached_key", k), ("cached_value", v)):
      cache = self.variable("cache", name, jnp.zeros, shape, new.dtype)
      # Positions past the cache are dropped (JAX's out-of-bounds scatter semantics).
      cache.value = cache.value.at[rows, positions].set(new)
      caches.append(cache.value)
    return caches


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    cfg = self.cfg
    activation, gated = MLPS[cfg.mlp]

    def up(name):
      return Einsum("ble,em->blm", (cfg.embed_dim, cfg.mlp_dim), ("embed", "mlp"),
                    _hidden_std(cfg), cfg, name=name)(x)

    h = activation(up("gate")) * up("up") if gated else activation(up("up"))
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = Einsum("blm,me->ble", (cfg.mlp_dim, cfg.embed_dim), ("mlp", "embed"), _residual_std(cfg),
               cfg, name="down")(h)
    return Dropout(cfg.dropout)(h, deterministic=deterministic)


class Block(nn.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)).

  Takes and returns (x, _) so the same module runs in a Python loop or under nn.scan."""
  cfg: ModelConfig
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    cfg, deterministic = self.cfg, self.deterministic
    h = SelfAttention(cfg, self.decode, name="attn")(
        NORMS[cfg.norm](cfg, "norm_attn")(x), positions, segment_ids,
        deterministic=deterministic)
    x = x + Dropout(cfg.dropout)(h, deterministic=deterministic)
    x = x + MLP(cfg, name="mlp")(NORMS[cfg.norm](cfg, "norm_mlp")(x),
                                 deterministic=deterministic)
    return nn.with_logical_constraint(x, ("batch", "length", "embed")), None


class Transformer(nn.Module):
  """tokens [batch, length] int32 → logits [batch, length, vocab] (f32: the loss's precision), or
  with num_labels > 0 one row of label logits per sequence, [batch, num_labels].

  positions [batch, length] (default 0, 1, …) index the position embedding or rotation;
  segment_ids [batch, length] (default all one; 0 = padding) keep packed documents apart: a token
  attends only to (earlier) tokens with its own segment id. decode=True reads and writes the
  "cache" collection (see SelfAttention); then positions say where each token goes.
  hidden=True (a language model) returns (the final states [batch, length, embed], head): head
  maps states to their f32 logits as a pure function of the params, so a loss can compute the
  logits a chunk at a time (bigflax.objective, config.loss_chunk)."""
  cfg: ModelConfig

  def __post_init__(self):
    check_options(self.cfg)
    super().__post_init__()

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, *, deterministic: bool = True,
               decode: bool = False, hidden: bool = False):
    cfg = self.cfg
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if decode and not cfg.generates:
      raise ConfigError("only a causal language model generates text; this one is "
                        + ("a classifier" if cfg.num_labels else "bidirectional (model.causal="
                           "False)") + ", so sample from a causal LM run instead")
    if tokens.shape[1] > cfg.block_size:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds model.block_size "
                       f"{cfg.block_size}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    token_embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, dtype=dtype, param_dtype=param_dtype,
                           embedding_init=param_init(0.02, ("vocab", "embed")),
                           name="token_embed")
    x = POSITIONS[cfg.positions].embed(token_embed(tokens), positions, cfg)
    x = Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

    block = _block_class(cfg)
    if cfg.scan_layers:
      blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                       metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = blocks(cfg, deterministic, decode, name="blocks")(x, positions, segment_ids)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, deterministic, decode, name=f"block_{i}")(x, positions, segment_ids)

    # μP's output multiplier (base/width; 1 under standard) on the head's input: for a linear head
    # that is the logits' multiplier, and with tied embeddings the shared readout x·Eᵀ·base/width.
    x = NORMS[cfg.norm](cfg, "norm_final")(x) * cfg.width_ratio
    if cfg.num_labels:
      # One state per sequence: a decoder's last real token has read the whole sequence; an
      # encoder's first token reads everything anyway (BERT's [CLS] place).
      last = jnp.max(jnp.where(segment_ids > 0, jnp.arange(x.shape[1]), 0), axis=1)
      pooled = x[jnp.arange(x.shape[0]), last if cfg.causal else 0][:, None]
      logits = Einsum("ble,en->bln", (cfg.embed_dim, cfg.num_labels), ("embed", None), 0.02, cfg,
                      result_dtype=jnp.float32, name="classifier")(pooled)
      return logits[:, 0]
    if hidden:
      return x, output_head(cfg, self.variables["params"])
    logits = _output_head(cfg, token_embed.embedding)(x)
    return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _output_head(cfg: ModelConfig, embedding, **module_args):
  """states [batch, length, embed] → f32 logits: x·Eᵀ with the token embedding E when tied, else
  the lm_head projection."""
  if cfg.tie_embeddings:
    return lambda x: matmul("ble,ve->blv", x, embedding, DTYPES[cfg.dtype])
  return Einsum("ble,ev->blv", (cfg.embed_dim, cfg.vocab_size), ("embed", "vocab"), 0.02, cfg,
                use_bias=False, result_dtype=jnp.float32, name="lm_head", **module_args)


def output_head(cfg: ModelConfig, params):
  """The LM head of a model with `params` (unboxed) as a function of the final states alone: no
  module is bound, so it can run under jax.checkpoint or a scan."""
  head = _output_head(cfg, params["token_embed"]["embedding"], parent=None)
  if cfg.tie_embeddings:
    return head
  return lambda x: head.apply({"params": params["lm_head"]}, x)


def _hidden_std(cfg: ModelConfig) -> float:
  # GPT-2 init: N(0, 0.02). Under μP a hidden matrix's init variance goes as 1/fan_in, and every
  # hidden fan-in grows with embed_dim: × base/width, equal to GPT-2's at the base width.
  return 0.02 * cfg.width_ratio ** 0.5


def _residual_std(cfg: ModelConfig) -> float:
  # The projections that write into the residual stream are scaled by 1/sqrt(2 * num_layers) so
  # the residual variance does not grow with depth (GPT-2).
  return _hidden_std(cfg) / (2 * cfg.num_layers) ** 0.5


def _block_class(cfg: ModelConfig):
  if REMAT_POLICIES[cfg.remat] is None:
    return Block
  # Inside nn.scan the loop already stops XLA from merging recomputation with the forward pass;
  # prevent_cse is only needed (and only costs) for unrolled layers.
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


# ---- The options, by name ----------------------------------------------------------------------

def _layer_norm(cfg: ModelConfig, name: str) -> nn.Module:
  return nn.LayerNorm(epsilon=cfg.norm_eps, use_bias=cfg.use_bias, dtype=DTYPES[cfg.dtype],
                      param_dtype=DTYPES[cfg.param_dtype], scale_init=ones_init(("embed",)),
                      bias_init=zeros_init(("embed",)), name=name)


def _rms_norm(cfg: ModelConfig, name: str) -> nn.Module:
  return nn.RMSNorm(epsilon=cfg.norm_eps, dtype=DTYPES[cfg.dtype],
                    param_dtype=DTYPES[cfg.param_dtype], scale_init=ones_init(("embed",)),
                    name=name)


NORMS = {"layernorm": _layer_norm, "rmsnorm": _rms_norm}

# name → (activation, gated). A gated MLP computes act(gate(x)) * up(x) (SwiGLU, Shazeer 2020).
MLPS = {
    "gelu": (functools.partial(nn.gelu, approximate=False), False),
    "gelu_tanh": (functools.partial(nn.gelu, approximate=True), False),
    "swiglu": (nn.silu, True),
}

# How much of a block's forward pass the backward pass keeps instead of recomputing.
REMAT_POLICIES = {
    "none": None,  # keep every activation: no nn.remat at all
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def rotary(x, positions, theta: float):
  """Rotary position embedding of x [batch, length, heads, head_dim] at positions [batch, length].

  Uses the "rotate half" layout of GPT-NeoX and Hugging Face Llama: dimension i is paired with
  i + head_dim/2, so HF checkpoints load without permuting their q/k weights."""
  half = x.shape[-1] // 2
  inv_freq = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [batch, length, half]
  cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class LearnedPositions:
  """GPT: a table of block_size position vectors added to the token embeddings."""

  @staticmethod
  def embed(x, positions, cfg: ModelConfig):
    table = nn.Embed(cfg.block_size, cfg.embed_dim, dtype=DTYPES[cfg.dtype],
                     param_dtype=DTYPES[cfg.param_dtype],
                     embedding_init=param_init(0.02, (None, "embed")), name="position_embed")
    return x + table(positions)

  @staticmethod
  def rotate(q, k, positions, cfg: ModelConfig):
    del positions, cfg
    return q, k


class RotaryPositions:
  """Llama (RoFormer): queries and keys rotated by their position, `rope_theta` the base."""

  @staticmethod
  def embed(x, positions, cfg: ModelConfig):
    del positions, cfg
    return x

  @staticmethod
  def rotate(q, k, positions, cfg: ModelConfig):
    return rotary(q, positions, cfg.rope_theta), rotary(k, positions, cfg.rope_theta)


POSITIONS = {"learned": LearnedPositions, "rope": RotaryPositions}


def check_options(cfg: ModelConfig) -> None:
  """Each option of `cfg` names an entry of its registry; ConfigError naming the field if not."""
  for field, registry in (("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS),
                          ("remat", REMAT_POLICIES), ("dtype", DTYPES), ("param_dtype", DTYPES),
                          ("attention", attention.IMPLEMENTATIONS)):
    if getattr(cfg, field) not in registry:
      raise ConfigError(f"config.model.{field}={getattr(cfg, field)!r} is unknown; choose one "
                        f"of {sorted(registry)}")
  if cfg.lora_rank and "gate" in cfg.lora_targets and not MLPS[cfg.mlp][1]:
    raise ConfigError(f"config.finetune.lora_targets names 'gate', which config.model.mlp="
                      f"{cfg.mlp!r} has not (only a gated MLP, swiglu, has); drop it")


def abstract_params(model: nn.Module, length: int):
  """Shapes, dtypes and logical partitioning of the params, without allocating them."""
  tokens = jnp.zeros((1, length), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]


def stack_layers(tree, num_layers: int):
  """Unscanned params (or grads, or caches) → the scanned layout: block_0 … block_{n-1} become
  one `blocks` subtree whose leaves have a leading layers dimension."""
  tree = dict(tree)
  layers = [tree.pop(f"block_{i}") for i in range(num_layers)]
  tree["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return tree


def unstack_layers(tree):
  """The scanned layout → unscanned: the inverse of stack_layers."""
  tree = dict(tree)
  blocks = tree.pop("blocks")
  num_layers = jax.tree.leaves(blocks)[0].shape[0]
  for i in range(num_layers):
    tree[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return tree
