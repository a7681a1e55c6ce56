"""Run an experiment and check it reaches the target in its docstring.

    python tools/reproduce.py experiments/shakespeare_char.py [--config.FIELD=VALUE ...]
        [--workdir DIR]

Trains with `bigflax train`, then compares the final eval loss in metrics.jsonl with the
experiment module's TARGET_EVAL_LOSS. Exits 0 when reached, 1 when missed.
"""

import argparse
import importlib.util
import pathlib
import subprocess
import sys
import tempfile
import time

from bigflax.rundir import read_metrics


def target_of(experiment: str) -> float:
  spec = importlib.util.spec_from_file_location("experiment", experiment)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "TARGET_EVAL_LOSS"):
    raise SystemExit(f"{experiment} defines no TARGET_EVAL_LOSS to reproduce")
  return module.TARGET_EVAL_LOSS


def main(argv: list[str]) -> int:
  if not argv or argv[0].startswith("-"):
    raise SystemExit(__doc__)
  parser = argparse.ArgumentParser()
  parser.add_argument("experiment")
  parser.add_argument("--workdir", default=None)
  args, overrides = parser.parse_known_args(argv)
  experiment = args.experiment
  target = target_of(experiment)
  workdir = args.workdir or tempfile.mkdtemp(prefix="reproduce_")
  overrides.append(f"--workdir={workdir}")
  start = time.time()
  subprocess.run([sys.executable, "-m", "bigflax", "train", f"--config={experiment}",
                  *overrides], check=True)
  minutes = (time.time() - start) / 60
  evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
  final = evals[-1]
  reached = final["eval_loss"] <= target
  print(f"{pathlib.Path(experiment).stem}: eval_loss {final['eval_loss']:.4f} at step "
        f"{final['step']} (target ≤ {target}) in {minutes:.1f} min: "
        f"{'REACHED' if reached else 'MISSED'}")
  return 0 if reached else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
