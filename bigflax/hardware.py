"""What the hardware can do: accelerator datasheet figures, and this machine's measured ceiling."""

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  device_kinds: tuple[str, ...]  # what jax reports as device.device_kind
  peak_bf16_flops: float  # dense, per chip (v4/v5p: both TensorCores, i.e. megacore)
  hbm_bytes: int


CHIPS = {
    "v4": Chip(("TPU v4",), 275e12, 32 * GiB),
    "v5e": Chip(("TPU v5 lite", "TPU v5e"), 197e12, 16 * GiB),
    "v5p": Chip(("TPU v5", "TPU v5p"), 459e12, 95 * GiB),
    "v6e": Chip(("TPU v6 lite", "TPU v6e"), 918e12, 32 * GiB),
    "a100": Chip(("NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB"), 312e12, 80 * GiB),
    "h100": Chip(("NVIDIA H100 80GB HBM3",), 989e12, 80 * GiB),
}


def chip_of(device) -> Chip | None:
  """The datasheet entry for a device, or None (a CPU, or an unlisted accelerator)."""
  return next((c for c in CHIPS.values() if device.device_kind in c.device_kinds), None)


def measure_matmul_flops(dtype=jnp.float32, n: int = 2048, trials: int = 10) -> float:
  """This machine's XLA matmul ceiling (FLOP/s, best of `trials`) for square n×n products.

  bf16 inputs accumulate in f32 (preferred_element_type), the fast path on CPUs with AVX-512 bf16.
  """
  a = jnp.ones((n, n), dtype)
  b = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(trials):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


@functools.cache
def peak_flops(dtype=jnp.float32) -> tuple[float, str]:
  """Peak FLOP/s of all local devices, and where the figure comes from.

  On accelerators: the datasheet. On a CPU there is none, so the ceiling is measured (one
  ~1 s matmul benchmark in the compute dtype), once per process and dtype: CPU-MFU is relative to
  what XLA can reach here."""
  devices = jax.local_devices()
  chip = chip_of(devices[0])
  if chip:
    return chip.peak_bf16_flops * len(devices), f"{devices[0].device_kind} datasheet"
  # A CPU's devices share its cores: the measured ceiling is for all of them together.
  return measure_matmul_flops(dtype), f"measured {jnp.dtype(dtype).name} XLA matmul ceiling"
