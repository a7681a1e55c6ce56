"""Attention, softmax(QKᵀ/√d)V, computed by XLA ops or by a fused kernel (config.model.attention).

- xla: einsums over the materialised, masked [length, keys] f32 scores, in query chunks of
  model.attention_chunk when the rows are longer (checkpointed one by one under remat, so the
  backward holds one chunk's scores); runs everywhere, and is the only path with dropout on the
  attention weights and for decoding (the KV cache's mask depends on each query's position).
- flash: the kernels JAX ships, which never write the scores to memory: on TPU the Pallas splash
  attention (causal and segment-id masks as block sparsity: fully masked blocks are skipped;
  grouped-query heads read their shared K/V in place), on GPU cuDNN's through
  `jax.nn.dot_product_attention`. Where no kernel fits (a CPU, a length splash cannot tile, f32
  on cuDNN) `flash` is a ConfigError saying why.
- flash_interpret: the splash kernel run by the Pallas interpreter on any backend: slow, for
  checking the kernel path on a CPU.
- auto: flash where a kernel fits the backend and shapes, else xla.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from bigflax.config import ModelConfig
from bigflax.errors import ConfigError
from bigflax.layers import DTYPES, Dropout

# Splash tiles queries and keys in blocks of these sizes (multiples of the TPU's 128 lanes);
# the largest that divides the length, since bigger blocks amortise the per-block overhead.
SPLASH_BLOCKS = (512, 256, 128)


def attend(q, k, v, segment_ids, cfg: ModelConfig, *, deterministic: bool,
           decode_positions=None, initializing: bool = False):
  """q [batch, length, heads, head_dim], k and v [batch, keys, kv_heads, head_dim] → like q.

  segment_ids [batch, length] keep packed documents apart (0 = padding); with cfg.causal a
  token reads the earlier tokens of its segment, else all of them. With decode_positions
  [batch, length] the keys are the decoding cache (slot s holds position s) and each query reads
  the slots up to its position: always the xla path. So is `initializing` (model.init): params
  are the same whatever computes attention, and a CPU host traces the init of a TPU run."""
  if decode_positions is not None:
    mask = jnp.arange(k.shape[1])[None, None, :] <= decode_positions[:, :, None]
    return _masked(q, k, v, mask, cfg, deterministic, chunk=0)
  implementation = IMPLEMENTATIONS["xla" if initializing else cfg.attention]
  return implementation(q, k, v, segment_ids, cfg, deterministic)


def _xla(q, k, v, segment_ids, cfg: ModelConfig, deterministic: bool):
  index = jnp.arange(q.shape[1])
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  mask = ((index[None, :, None] >= index[None, None, :]) | (not cfg.causal)) & same_segment
  return _masked(q, k, v, mask, cfg, deterministic, chunk=cfg.attention_chunk)


def _masked(q, k, v, mask, cfg: ModelConfig, deterministic: bool, chunk: int):
  """The xla path for any mask [batch, length, keys]; `chunk` < length: in chunks of queries."""
  # Grouped-query attention: query head h reads kv head h // group (Hugging Face's layout).
  q = q.reshape(*q.shape[:2], cfg.kv_heads, cfg.num_heads // cfg.kv_heads, cfg.head_dim)
  dropout = bool(cfg.dropout) and not deterministic
  length = q.shape[1]
  if chunk and chunk < length:
    attend = _attend
    if cfg.remat != "none" and not dropout:
      # The backward of a rematerialised block recomputes its forward: recomputing each chunk's
      # scores inside that chunk's own backward keeps one chunk's f32 scores and weights live
      # instead of every chunk's (the whole square's worth).
      attend = jax.checkpoint(_attend, static_argnums=(4, 5))
    # A causal chunk [a, b) reads keys [0, b) only, skipping the key blocks the mask would zero
    # anyway — with n chunks, (n + 1) / 2n of the full work.
    ends = [a + chunk if cfg.causal else k.shape[1] for a in range(0, length, chunk)]
    out = jnp.concatenate([
        attend(q[:, a:a + chunk], k[:, :end], v[:, :end], mask[:, a:a + chunk, :end], cfg,
               dropout)
        for a, end in zip(range(0, length, chunk), ends)], axis=1)
  else:
    out = _attend(q, k, v, mask, cfg, dropout)
  return out.reshape(*out.shape[:2], cfg.num_heads, cfg.head_dim)


def _attend(q, k, v, mask, cfg: ModelConfig, dropout: bool):
  """softmax(QKᵀ/√d)V for q [b, q, kv_heads, group, d], k and v [b, s, kv_heads, d], mask [b, q, s],
  with dropout on the weights if `dropout`.

  Scores and softmax in f32 whatever the compute dtype: bf16 logits lose the small differences
  that decide where attention goes."""
  dtype = DTYPES[cfg.dtype]
  scores = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(cfg.attention_scale)
  scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
  weights = softmax(scores).astype(dtype)
  if dropout:
    weights = Dropout(cfg.dropout)(weights, deterministic=False)
  return jnp.einsum("bkgqs,bskd->bqkgd", weights, v.astype(dtype),
                    preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def softmax(scores):
  """jax.nn.softmax over the last axis, whose backward reads the weights alone: y·(g − Σ y·g), one
  reduction. Differentiated as traced (exp, sum, divide), it takes two and a 1/sum² term: ~4% of
  the Shakespeare CPU step."""
  return jax.nn.softmax(scores, axis=-1)


def _softmax_forward(scores):
  weights = jax.nn.softmax(scores, axis=-1)
  return weights, weights


def _softmax_backward(weights, grad):
  return (weights * (grad - jnp.sum(weights * grad, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_forward, _softmax_backward)


# ---- Fused kernels -----------------------------------------------------------------------------

def _splash(q, k, v, segment_ids, cfg: ModelConfig, interpret: bool):
  length = q.shape[1]
  block = next(b for b in SPLASH_BLOCKS if length % b == 0)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  head_mask = (splash.CausalMask if cfg.causal else splash.FullMask)((length, length))

  def per_shard(q, k, v, segment_ids):
    # The kernel takes one sequence, [heads, length, head_dim], and does not scale the scores.
    kernel = splash.make_splash_mha(splash.MultiHeadMask([head_mask] * q.shape[2]),
                                    block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                    interpret=interpret)
    heads_major = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(ids, ids)))(
        heads_major(q * cfg.attention_scale), heads_major(k), heads_major(v), segment_ids)
    return heads_major(out)

  return _per_shard(per_shard, q, k, v, segment_ids)


def _per_shard(fn, q, k, v, segment_ids):
  """fn run on each device's rows and heads of the mesh in context (a Pallas call is opaque to
  XLA's partitioner, which would otherwise gather the whole batch onto every device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, segment_ids)

  def spec(heads):
    batch, _, heads, _ = nn.logical_to_mesh_axes(("batch", "length", heads, "head_dim"))
    return PartitionSpec(batch, None, heads, None)  # whole sequences: the mask spans them

  q_spec, kv_spec = spec("heads"), spec("kv_heads")
  return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec,
                                                PartitionSpec(q_spec[0], None)),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


def _cudnn(q, k, v, segment_ids, cfg: ModelConfig, interpret: bool):
  del interpret
  # jax.nn.dot_product_attention takes no segment ids: the segment mask goes in as a boolean
  # [batch, 1, length, length] array (1 byte per score, beside cuDNN's fused softmax).
  same_segment = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=same_segment, is_causal=cfg.causal,
                                      scale=cfg.attention_scale, implementation="cudnn")


def _splash_unfit(cfg: ModelConfig, length: int) -> str:
  if length % SPLASH_BLOCKS[-1]:
    return (f"splash attention tiles the sequence in blocks of {SPLASH_BLOCKS[-1]}, and the "
            f"length {length} is no multiple of it")
  return ""


def _cudnn_unfit(cfg: ModelConfig, length: int) -> str:
  del length
  if cfg.dtype == "float32":
    return "cuDNN's fused attention needs config.model.dtype=bfloat16 (it has no float32 kernel)"
  if cfg.head_dim % 8 or cfg.head_dim > 128:
    return (f"cuDNN's fused attention needs a head dimension that is a multiple of 8 up to 128, "
            f"not {cfg.head_dim}")
  return ""


# platform → (kernel, why a config cannot use it: "" if it can)
KERNELS = {"tpu": (_splash, _splash_unfit), "gpu": (_cudnn, _cudnn_unfit)}


def _platform() -> str:
  """The backend the step is traced for: the mesh's devices (a TPU topology under `bigflax aot`
  from a CPU), else JAX's default."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device else jax.default_backend()


def _fused(q, k, v, segment_ids, cfg: ModelConfig, deterministic: bool, *, interpret: bool,
           fallback):
  """A kernel for this backend, or `fallback` (None: a ConfigError saying why there is none)."""
  platform = "tpu" if interpret else _platform()
  if platform not in KERNELS:
    why = (f"there is no fused attention kernel for the {platform} backend (on a CPU the TPU "
           "kernel runs only interpreted: config.model.attention=flash_interpret, slow)")
  elif cfg.dropout and not deterministic:
    why = (f"dropout on attention weights (config.model.dropout={cfg.dropout}) cannot run inside "
           "a fused kernel")
  else:
    why = KERNELS[platform][1](cfg, q.shape[1])
  if not why:
    return KERNELS[platform][0](q, k, v, segment_ids, cfg, interpret)
  if fallback is None:
    raise ConfigError(f"config.model.attention={cfg.attention!r}: {why}; use attention=auto "
                      "(falls back to xla) or xla")
  return fallback(q, k, v, segment_ids, cfg, deterministic)


# config.model.attention → fn(q, k, v, segment_ids, cfg, deterministic)
IMPLEMENTATIONS = {
    "auto": lambda *args: _fused(*args, interpret=False, fallback=_xla),
    "xla": _xla,
    "flash": lambda *args: _fused(*args, interpret=False, fallback=None),
    "flash_interpret": lambda *args: _fused(*args, interpret=True, fallback=None),
}
