"""How long a checkpoint save blocks the train loop: asynchronous (what `bigflax train` does: the
loop waits while the state is checked for NaN/Inf and copied off the devices, then Orbax writes in
the background) vs blocking (the loop would wait until the checkpoint is committed on disk).

  python tools/bench_checkpoint.py [--trials 7] [--shapes default,100m]

For each model shape it saves the full train state (params + AdamW state + step + RNG) `trials`
times after one warm-up save, timing `Checkpointer.save` returning (blocked) and the save being
committed (`wait`), and prints the median and best of each and their ratio.
"""

import argparse
import statistics
import tempfile
import time

import jax
from absl import logging

from bigflax import checkpoint, config as config_lib, train

SHAPES = {
    "default": {},  # bigflax/config.py: 4 layers × 128, byte vocabulary
    "100m": {"model.num_layers": 14, "model.num_heads": 12, "model.embed_dim": 768,
             "model.block_size": 1024},  # GPT-2-small widths, deep enough for ~100M params
}


def make_trainer(overrides: dict) -> train.Trainer:
  config = config_lib.get_config()
  config.update_from_flattened_dict(overrides)
  return train.Trainer(config, devices=jax.devices()[:1])


def time_saves(trainer: train.Trainer, trials: int) -> tuple[list[float], list[float]]:
  blocked, committed = [], []
  with tempfile.TemporaryDirectory() as workdir:
    config = trainer.config.copy_and_resolve_references()
    config.keep_checkpoints = 1  # old ones are deleted, as in a long run
    saver = checkpoint.Checkpointer(workdir, config)
    for step in range(trials + 1):
      start = time.perf_counter()
      trainer.save(saver, step)
      returned = time.perf_counter()
      saver.wait()
      done = time.perf_counter()
      if step:  # the first save compiles the finiteness check and sets Orbax up
        blocked.append(returned - start)
        committed.append(done - start)
    saver.close()
  return blocked, committed


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--trials", type=int, default=7)
  parser.add_argument("--shapes", default=",".join(SHAPES))
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)  # Orbax warns about our deliberate waits for each commit
  print(f"{'shape':>8} {'params':>8} {'state MB':>9} {'async blocked ms':>22} "
        f"{'blocking save ms':>22} {'ratio':>6}")
  for name in args.shapes.split(","):
    trainer = make_trainer(SHAPES[name])
    leaves = jax.tree.leaves(trainer.state_item())
    num_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    megabytes = sum(x.nbytes for x in leaves) / 2**20
    blocked, committed = time_saves(trainer, args.trials)
    ms = lambda xs: f"{statistics.median(xs) * 1e3:8.1f} (best {min(xs) * 1e3:7.1f})"
    print(f"{name:>8} {num_params / 1e6:7.1f}M {megabytes:9.0f} {ms(blocked):>22} "
          f"{ms(committed):>22} {statistics.median(blocked) / statistics.median(committed):6.2f}")
    del trainer


if __name__ == "__main__":
  main()
