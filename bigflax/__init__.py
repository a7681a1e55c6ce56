"""bigflax: pretraining transformer language models with JAX and Flax, from one CPU to a pod."""

import glob
import importlib.util
import os
import sys

__version__ = "0.1.0"


def _skip_absent_tpu() -> None:
  """Keep JAX from probing for TPUs on a machine that has none.

  libtpu (installed for `bigflax aot`) makes every JAX start look for TPU chips, printing errors
  and querying a metadata server when there are none. With no TPU device node present and no
  platform chosen by the user, JAX is pointed at the GPU (if its plugin is installed) and the
  CPU. Runs before JAX starts a backend, without importing JAX (reading a config must not)."""
  jax = sys.modules.get("jax")
  if ("JAX_PLATFORMS" in os.environ or (jax and jax.config.jax_platforms)
      or importlib.util.find_spec("libtpu") is None
      or glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")):
    return
  gpu = any(importlib.util.find_spec(name) for name in ("jax_cuda12_plugin", "jax_cuda13_plugin"))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if gpu else "cpu"  # read when JAX is imported
  if jax:  # already imported: it consults its config now
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


_skip_absent_tpu()
