"""Building blocks chosen for speed, so bigflax/model.py can read as the architecture alone.

`Einsum` is a linear map whose matmul runs on [tokens, features] with f32 accumulation, `Dropout`
draws its keep-mask from random bytes, and `param` creates a parameter with its logical axes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

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
    y = matmul(self.equation, x, kernel, dtype).astype(result_dtype)
    if self.use_bias and self.cfg.use_bias:
      out_rank = len(self.equation.split("->")[1]) - 2  # all but batch and length
      y += self.param("bias", zeros_init(self.kernel_axes[-out_rank:]),
                      self.kernel_shape[-out_rank:], param_dtype).astype(result_dtype)
    return y


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
