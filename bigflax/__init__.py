"""bigflax: pretraining transformer language models with JAX and Flax, from one CPU to a pod."""

from bigflax import host

__version__ = "0.1.0"

host.prepare()
