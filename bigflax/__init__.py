"""bigflax: pretraining transformer language models with JAX and Flax, from one CPU to a pod."""

__version__ = "0.1.0"

from bigflax import hardware

hardware.skip_absent_tpu()  # before any backend starts: libtpu (for `bigflax aot`) probes for TPUs
