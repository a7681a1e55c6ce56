"""Train-step throughput and MFU of an experiment on this machine.

    python tools/bench.py --config experiments/shakespeare_char.py:baby [--config.FIELD=VALUE]
        [--steps 20] [--compare FIELD=VALUE[,FIELD=VALUE] ...]

Reports, after compilation: the median (min, max) step time over --steps steps, the training
loop's time per step (input pipeline and dispatch included) and its overhead, tokens/s, model
FLOPs per token (bigflax/flops.py's formula, checked against XLA's cost_analysis of the same
compiled step), achieved FLOP/s and MFU — against the accelerator's datasheet peak, or on a CPU
against this machine's XLA matmul ceiling measured in the same run (f32 and bf16→f32; MFU uses the
model's compute dtype).

--compare runs variants of the config side by side: their steps alternate with the base config's,
so a shared machine's changing load hits all of them alike, and the ratio of median step times is
what to quote (e.g. --compare model.attention_chunk=0 --compare model.dtype=bfloat16).
"""

import copy
import dataclasses
import functools
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags

from bigflax import config as config_lib, data, flops, hardware
from bigflax.layers import DTYPES
from bigflax.train import Trainer

_CONFIG = config_flags.DEFINE_config_file("config", config_lib.__file__, lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 20, "timed steps (after the compiling one)")
_COMPARE = flags.DEFINE_multi_string("compare", [], "a variant to time side by side: "
                                     "comma-separated FIELD=VALUE overrides of the config")


@dataclasses.dataclass
class Run:
  """One config's trainer, its step compiled once (the executable every timing calls), and the
  times of its steps."""
  name: str
  config: object
  trainer: Trainer
  step: object
  compile_seconds: float
  times: list[float] = dataclasses.field(default_factory=list)

  @classmethod
  def build(cls, name: str, config) -> "Run":
    trainer = Trainer(config)
    batch = trainer.batch(data.TRAIN, 0, config.batch_size)
    start = time.perf_counter()
    with trainer.run.activate():
      step = trainer.run.train_step.lower(trainer.state, batch, trainer.dropout_rng).compile()
    return cls(name, config, trainer, step, time.perf_counter() - start)

  def time_step(self, batch) -> None:
    """The step alone: inputs already on the device, synced at its end."""
    start = time.perf_counter()
    self.trainer.state, metrics = self.step(self.trainer.state, batch, self.trainer.dropout_rng)
    metrics["loss"].block_until_ready()
    self.times.append(time.perf_counter() - start)

  def loop_seconds_per_step(self, steps: int) -> float:
    """The training loop's way (Trainer.step with this executable): input pipeline, dispatch,
    no sync until the end. Beyond the step alone, that is the framework's overhead."""
    t, batch_size = self.trainer, self.config.batch_size
    start = time.perf_counter()
    for i in range(steps):
      t.state, metrics = self.step(t.state, t.batch(data.TRAIN, i, batch_size), t.dropout_rng)
    metrics["loss"].block_until_ready()
    return (time.perf_counter() - start) / steps


def variant(config, overrides: str):
  """config with "FIELD=VALUE,…" applied, each value read as its field's type."""
  config, changes = copy.deepcopy(config), {}
  for override in overrides.split(","):
    field, _, text = override.strip().partition("=")
    current = functools.reduce(lambda node, part: node[part], field.split("."), config)
    changes[field] = (text.lower() in ("1", "true") if isinstance(current, bool)
                      else type(current)(text))
  config.update_from_flattened_dict(changes)
  return config


def main(argv):
  del argv
  config = _CONFIG.value
  runs = [Run.build("base", config)] + [Run.build(o, variant(config, o)) for o in _COMPARE.value]
  base, m = runs[0], config.model
  tokens_per_step = config.batch_size * m.block_size
  # On a shared CPU the ceiling moves with the neighbours' load: it is measured before and after
  # the timed steps and the higher figure kept (the lower MFU).
  peak, source = hardware.peak_flops(DTYPES[m.dtype])
  batches = [[r.trainer.batch(data.TRAIN, i, config.batch_size) for r in runs]
             for i in range(_STEPS.value + 1)]
  for step_batches in batches:  # the runs take turns, step by step
    for run, batch in zip(runs, step_batches):
      run.time_step(batch)
  loop = base.loop_seconds_per_step(_STEPS.value)
  if hardware.chip_of(jax.devices()[0]) is None:
    peak = max(peak, hardware.measure_matmul_flops(DTYPES[m.dtype]))

  first, times = base.times[0], base.times[1:]  # the first run also warms caches and allocators
  median = statistics.median(times)
  cost = base.step.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  per_token = flops.train_flops_per_token(base.trainer.state.params, m)
  achieved = per_token * tokens_per_step / median
  print(f"config: {config.name or 'default'}; {m.num_layers} layers × {m.embed_dim} dims, "
        f"block {m.block_size}, batch {config.batch_size}, dtype {m.dtype}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  print(f"step time: median {median * 1e3:.1f} ms (min {min(times) * 1e3:.1f}, max "
        f"{max(times) * 1e3:.1f}) over {len(times)} steps; compile {base.compile_seconds:.1f} s, "
        f"first step {first * 1e3:.1f} ms")
  print(f"training loop: {loop * 1e3:.1f} ms/step (mean of {_STEPS.value}, data pipeline and "
        f"dispatch included): {(loop - statistics.mean(times)) * 1e3:+.1f} ms over the step's "
        f"mean {statistics.mean(times) * 1e3:.1f} ms")
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
  for run in runs[1:]:
    other = statistics.median(run.times[1:])
    print(f"side by side, {run.name}: median {other * 1e3:.1f} ms; base is "
          f"{other / median:.2f}× as fast")


if __name__ == "__main__":
  app.run(main)
