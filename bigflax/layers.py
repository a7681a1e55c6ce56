"""Building blocks chosen for speed, so bigflax/model.py can read as the architecture alone.

`Einsum` is a linear map whose matmul runs on [tokens, features] with f32 accumulation (and, when
the model's LoRA config names it, a low-rank adapter beside it), `Dropout` draws its keep-mask
from random bytes, and `param_init` creates a parameter with its logical axes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_init(stddev: float, axes):
  """N(0, stddev²) init of a parameter whose dimensions carry the logical names `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev), axes)


def zeros_init(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def matmul(equation: str, x, kernel, dtype):
  """x [batch, length, ...] times a kernel, by an einsum whose operands both start with "bl".

  The result is f32 whatever the compute dtype: accurate accumulation, and on CPUs with bf16 units
  bf16 inputs with an f32 result are XLA's fast path. Batch and length are merged into one token
  axis first: the weight gradient then contracts over a single major axis, which XLA:CPU feeds to
  its GEMM without the strided 3-D transposes it otherwise inserts (the reshape itself is free).
  """
  inputs, out = equation.split("->")
  x_axes, kernel_axes = inputs.split(",")
  assert x_axes[:2] == out[:2] == "bl", equation
  y = jnp.einsum(f"t{x_axes[2:]},{kernel_axes}->t{out[2:]}",
                 x.reshape(-1, *x.shape[2:]).astype(dtype), kernel.astype(dtype),
                 preferred_element_type=jnp.float32)
  return y.reshape(*x.shape[:2], *y.shape[1:])


class Einsum(nn.Module):
  """A linear map written as an einsum, so the kernel keeps its per-head shape (and logical axes)
  instead of being flattened to 2-D; the bias covers the output's trailing dimensions."""
  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  stddev: float
  cfg: object  # bigflax.config.ModelConfig: dtype, param_dtype, use_bias
  use_bias: bool = True  # and cfg.use_bias
  result_dtype: jnp.dtype | None = None  # None = the compute dtype

  @nn.compact
  def __call__(self, x):
    dtype, param_dtype = DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
    result_dtype = self.result_dtype or dtype
    kernel = self.param("kernel", param_init(self.stddev, self.kernel_axes), self.kernel_shape,
                        param_dtype)
    y = matmul(self.equation, x, kernel, dtype)
    if self.cfg.lora_rank and self.name in self.cfg.lora_targets:
      y += self._adapter(x)
    y = y.astype(result_dtype)
    if self.use_bias and self.cfg.use_bias:
      out_rank = len(self.equation.split("->")[1]) - 2  # all but batch and length
      y += self.param("bias", zeros_init(self.kernel_axes[-out_rank:]),
                      self.kernel_shape[-out_rank:], param_dtype).astype(result_dtype)
    return y

  def _adapter(self, x):
    """LoRA (Hu et al. 2021): x·A·B × alpha/rank beside the frozen kernel. A [inputs…, rank] is
    random and B [rank, outputs…] zero, so training starts from the base model; each is sharded
    over its side of the kernel's axes, the rank unsplit."""
    cfg, param_dtype = self.cfg, DTYPES[self.cfg.param_dtype]
    inputs, out = self.equation.split("->")
    x_axes = inputs.split(",")[0][2:]
    n_in, rank = len(x_axes), cfg.lora_rank
    fan_in = int(np.prod(self.kernel_shape[:n_in]))
    a = self.param("lora_a", param_init(fan_in ** -0.5, (*self.kernel_axes[:n_in], "lora")),
                   (*self.kernel_shape[:n_in], rank), param_dtype)
    b = self.param("lora_b", zeros_init(("lora", *self.kernel_axes[n_in:])),
                   (rank, *self.kernel_shape[n_in:]), param_dtype)
    dtype = DTYPES[cfg.dtype]
    h = matmul(f"bl{x_axes},{x_axes}r->blr", x, a, dtype).astype(dtype)
    return matmul(f"blr,r{out[2:]}->{out}", h, b, dtype) * (cfg.lora_alpha / rank)


def merge_lora(params, cfg):
  """Params with their LoRA adapters folded into the kernels (kernel + A·B × alpha/rank) and
  removed: the params of the same model without adapters, giving the same outputs."""
  scale = cfg.lora_alpha / max(cfg.lora_rank, 1)
  lead = "z" if cfg.scan_layers else ""  # a scanned stack's leading layers axis

  def fold(a, b):  # A [lead, in…, r] · B [lead, r, out…] → [lead, in…, out…]
    n_in, n_out = a.ndim - 1 - len(lead), b.ndim - 1 - len(lead)
    ins, outs = "abcdefgh"[:n_in], "abcdefgh"[n_in:n_in + n_out]
    return jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}", a.astype(jnp.float32),
                      b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)

  def walk(tree):
    if not isinstance(tree, dict):
      return tree
    tree = {k: walk(v) for k, v in tree.items()}
    if "lora_a" in tree:
      a, b = tree.pop("lora_a"), tree.pop("lora_b")
      tree["kernel"] = (tree["kernel"] + fold(a, b) * scale).astype(tree["kernel"].dtype)
    return tree
  return walk(params)


class Dropout(nn.Module):
  """Inverted dropout with a keep-mask of random bytes, four cut from each 32-bit random word.

  jax.random spends a whole threefry word per element; attention-weight masks are the largest
  random draws in a step, and bytes make them several times cheaper on a CPU. The rate is
  rounded to a multiple of 1/256 and kept values are scaled by exactly that keep probability, so
  expectations are unchanged. Draws only along the last axis are packed, so sharded batch dims stay put."""
  rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    if deterministic or self.rate == 0:
      return x
    threshold = min(max(round((1 - self.rate) * 256), 1), 256)
    words = jax.random.bits(self.make_rng("dropout"), (*x.shape[:-1], -(-x.shape[-1] // 4)),
                            jnp.uint32)
    random_bytes = jax.lax.bitcast_convert_type(words, jnp.uint8)  # [..., words, 4]
    random_bytes = random_bytes.reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]
    keep = random_bytes.astype(jnp.int32) < threshold
    return jnp.where(keep, x / (threshold / 256), 0).astype(x.dtype)
