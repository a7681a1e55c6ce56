"""Plot a run's train and eval loss curves: python tools/plot_metrics.py WORKDIR [--out FILE]."""

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from bigflax.rundir import read_metrics  # noqa: E402


def plot(workdir: str, out: str | None = None) -> pathlib.Path:
  records = read_metrics(workdir)
  train = [(r["step"], r["loss"]) for r in records if "loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  if not train and not evals:
    raise SystemExit(f"{workdir}/metrics.jsonl has no loss records to plot")
  fig, ax = plt.subplots(figsize=(7, 4))
  for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
    if points:
      ax.plot(*zip(*points), style, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(pathlib.Path(workdir).absolute().name)
  ax.grid(alpha=0.3)
  ax.legend()
  path = pathlib.Path(out) if out else pathlib.Path(workdir) / "loss.png"
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("workdir")
  parser.add_argument("--out", help="PNG path (default WORKDIR/loss.png)")
  args = parser.parse_args()
  print(plot(args.workdir, args.out))
