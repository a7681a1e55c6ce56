"""Run an experiment over its seeds and check the target in its docstring.

    python tools/reproduce.py experiments/shakespeare_char.py [--seeds N] [--config.FIELD=VALUE ...]
        [--workdir DIR]

Trains the experiment with `bigflax train` once per seed (0 … N-1; N = the module's TARGET_SEEDS,
default 1), then compares the mean of the final eval losses in metrics.jsonl with the module's
TARGET_EVAL_LOSS: single runs are noise, a mean over seeds is a claim. Exits 0 when the target is
reached, 1 when it is missed.
"""

import argparse
import importlib.util
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from bigflax.rundir import read_metrics


def experiment_module(experiment: str):
  spec = importlib.util.spec_from_file_location("experiment", experiment.partition(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "TARGET_EVAL_LOSS"):
    raise SystemExit(f"error: {experiment} defines no TARGET_EVAL_LOSS to reproduce")
  return module


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(
      description="Train an experiment once per seed and check that the mean final eval loss "
                  "reaches the experiment's TARGET_EVAL_LOSS; exit 1 when it does not.")
  parser.add_argument("experiment", help="an experiment file, e.g. experiments/shakespeare_char.py")
  parser.add_argument("--workdir", default=None, help="parent of the per-seed run directories "
                      "(default: a new temporary directory)")
  parser.add_argument("--seeds", type=int, default=None, help="how many seeds (0 … N-1) to run "
                      "(default: the experiment's TARGET_SEEDS, or 1)")
  args, overrides = parser.parse_known_args(argv)
  module = experiment_module(args.experiment)
  target, seeds = module.TARGET_EVAL_LOSS, args.seeds or getattr(module, "TARGET_SEEDS", 1)
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="reproduce_"))
  losses, start = [], time.time()
  for seed in range(seeds):
    workdir = root / f"seed{seed}"
    subprocess.run([sys.executable, "-m", "bigflax", "train", f"--config={args.experiment}",
                    f"--config.seed={seed}", *overrides, f"--workdir={workdir}"], check=True)
    final = [r for r in read_metrics(workdir) if "eval_loss" in r][-1]
    losses.append(final["eval_loss"])
    print(f"seed {seed}: eval_loss {final['eval_loss']:.4f} at step {final['step']}")
  mean = statistics.mean(losses)
  spread = f" ± {statistics.stdev(losses):.4f}" if len(losses) > 1 else ""
  reached = mean <= target
  print(f"{pathlib.Path(args.experiment).stem}: mean eval_loss {mean:.4f}{spread} over {seeds} "
        f"seed(s) (target ≤ {target}) in {(time.time() - start) / 60:.1f} min: "
        f"{'REACHED' if reached else 'MISSED'}")
  return 0 if reached else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
