"""The host process, set up when bigflax is imported, before JAX starts a backend: which platforms
JAX probes, and whether the C heap keeps the memory a CPU step frees. Imports no JAX: reading a
config must not start it."""

import ctypes
import glob
import importlib.util
import os
import sys

TPU_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*")
GPU_NODES = ("/dev/nvidia[0-9]*",)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def _present(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def _chosen_platforms() -> str:
  """JAX_PLATFORMS as the user (or skip_absent_tpu) set it; "" when JAX picks."""
  jax = sys.modules.get("jax")
  return os.environ.get("JAX_PLATFORMS") or (jax and jax.config.jax_platforms) or ""


def skip_absent_tpu() -> None:
  """Keep JAX from probing for TPUs on a machine that has none.

  libtpu (installed for `bigflax aot`) makes every JAX start look for TPU chips, printing errors
  and querying a metadata server when there are none. With no TPU device node present and no
  platform chosen by the user, JAX is pointed at the GPU (if its plugin is installed) and the
  CPU."""
  if _chosen_platforms() or importlib.util.find_spec("libtpu") is None or _present(TPU_NODES):
    return
  gpu = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"  # read when JAX is imported
  if jax := sys.modules.get("jax"):  # already imported: it consults its config now
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def computes_on_cpu() -> bool:
  """Whether JAX's default backend here will be the CPU: chosen so, or no accelerator present."""
  if platforms := _chosen_platforms():
    return platforms.split(",")[0] == "cpu"
  return not _present(TPU_NODES + GPU_NODES)


def keep_freed_memory() -> bool:
  """Has glibc's malloc keep the memory the process frees, for reuse; returns whether it could
  (False without glibc: macOS, musl).

  XLA:CPU allocates each step's temporaries afresh, in one block (50 MB at the Shakespeare CPU
  shape). glibc serves a block above its mmap threshold (32 MiB at most) from a fresh mapping
  that it unmaps when freed, so every step faulted its working set back in page by page: 13k
  faults, a third of the Shakespeare CPU step spent in the kernel. Served from the heap and
  never trimmed, those pages stay mapped from step to step. Blocks too big for the arena of the
  thread that asks (XLA runs a large step on a worker thread: the baby shape's 6.3 GB) are still
  mapped afresh: one arena for all threads would serve them from the heap too (7.0 s a baby step
  instead of 8.3), but the heap then grew by fragmentation to three times the temporaries as
  other allocations landed between steps. Process-wide and for good: memory freed stays the
  process's."""
  if not sys.platform.startswith("linux"):
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):  # musl
    return False
  # The trim threshold is a size_t: -1 reads as the largest, i.e. never give the heap's top back.
  return all(libc.mallopt(param, value) for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))


def prepare() -> None:
  skip_absent_tpu()
  if computes_on_cpu():
    keep_freed_memory()
