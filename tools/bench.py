"""Train-step throughput and MFU of an experiment on this machine.

    python tools/bench.py --config experiments/shakespeare_char_baby.py [--config.FIELD=VALUE]
        [--steps 20]

Reports, after compilation: the median (min, max) step time over --steps steps, tokens/s, model
FLOPs per token (bigflax/flops.py's formula, checked against XLA's cost_analysis of the same
compiled step), achieved FLOP/s and MFU — against the accelerator's datasheet peak, or on a CPU
against this machine's XLA matmul ceiling measured in the same run (f32 and bf16→f32; MFU uses the
model's compute dtype).
"""

import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from bigflax import config as config_lib, data, flops, hardware, sharding
from bigflax.model import DTYPES
from bigflax.train import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.__file__, lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after the compiling one)")


def main(argv):
  del argv
  config = _CONFIG.value
  trainer = Trainer(config)
  m = config.model
  tokens_per_step = config.batch_size * m.block_size
  batch = trainer.batch(data.TRAIN, 0, config.batch_size)
  with sharding.activate(trainer.mesh, trainer.rules):
    compiled = trainer._train_step.lower(trainer.state, batch, trainer.dropout_rng).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  per_token = flops.train_flops_per_token(
      trainer.state.params, tie_embeddings=m.tie_embeddings, num_layers=m.num_layers,
      seq_len=m.block_size, num_heads=m.num_heads, head_dim=m.embed_dim // m.num_heads)

  start = time.perf_counter()
  trainer.step(0)["loss"].block_until_ready()
  first = time.perf_counter() - start
  times = []
  for i in range(1, _STEPS.value + 1):
    start = time.perf_counter()
    trainer.step(i)["loss"].block_until_ready()
    times.append(time.perf_counter() - start)
  median = statistics.median(times)

  peak, source = hardware.peak_flops(DTYPES[m.dtype])
  achieved = per_token * tokens_per_step / median
  print(f"config: {config.name or 'default'}; {m.num_layers} layers × {m.embed_dim} dims, "
        f"block {m.block_size}, batch {config.batch_size}, dtype {m.dtype}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"step time: median {median * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}) over {len(times)} steps; first step {first:.1f} s")
  print(f"tokens/s: {tokens_per_step / median:,.0f}")
  print(f"model FLOPs/token: {per_token / 1e6:.2f} M (6N + 12·L·T·d); XLA cost_analysis: "
        f"{cost['flops'] / tokens_per_step / 1e6:.2f} M/token (ratio "
        f"{cost['flops'] / tokens_per_step / per_token:.3f})")
  print(f"achieved: {achieved / 1e9:.1f} GFLOP/s; peak {peak / 1e9:.1f} GFLOP/s ({source})")
  if hardware.chip_of(jax.devices()[0]) is None:
    other = jnp.bfloat16 if m.dtype == "float32" else jnp.float32
    print(f"  (for reference, {jnp.dtype(other).name} ceiling: "
          f"{hardware.measure_matmul_flops(other) / 1e9:.1f} GFLOP/s)")
  print(f"MFU: {100 * achieved / peak:.1f}%")


if __name__ == "__main__":
  app.run(main)
