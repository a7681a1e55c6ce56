"""Plot a run's train and eval loss curves: python tools/plot_metrics.py WORKDIR [--out FILE]."""

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402

from bigflax.errors import UserError  # noqa: E402
from bigflax.rundir import metrics_path  # noqa: E402

DESCRIPTION = ("Plots the train and eval loss curves of a run from its metrics.jsonl. The plot "
               "is written to WORKDIR/loss.png unless --out names another PNG file.")


def read_records(workdir: str) -> list[dict]:
  """metrics.jsonl's records; a last line cut short by a crash is left out."""
  path = metrics_path(workdir)
  if not pathlib.Path(workdir).is_dir():
    raise UserError(f"{workdir} is not a run directory (no such directory); give the --workdir "
                    "of a run")
  if not path.is_file():
    raise UserError(f"{workdir} has no metrics.jsonl (the run has logged nothing yet); give the "
                    "--workdir of a run that has trained for at least config.log_every steps")
  lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if number == len(lines):  # cut short by a crash mid-write
        break
      raise UserError(f"{path} line {number} is not JSON; it was not written by bigflax, or was "
                      "edited: remove that line") from None
    if isinstance(record, dict) and isinstance(record.get("step"), int | float):
      records.append(record)
  return records


def plot(workdir: str, out: str | None = None) -> pathlib.Path:
  records = read_records(workdir)
  # A non-finite loss is logged as null (rundir.MetricsWriter): a gap in the curve.
  number = lambda value: isinstance(value, int | float) and not isinstance(value, bool)
  train = [(r["step"], r["loss"]) for r in records if number(r.get("loss"))]
  evals = [(r["step"], r["eval_loss"]) for r in records if number(r.get("eval_loss"))]
  if not train and not evals:
    raise UserError(f"{metrics_path(workdir)} has no loss records to plot; train the run for at "
                    "least config.log_every steps first")
  path = pathlib.Path(out) if out else pathlib.Path(workdir) / "loss.png"
  if not path.parent.is_dir():
    raise UserError(f"the directory of --out {out} does not exist; create it or give another "
                    "--out")
  fig, ax = plt.subplots(figsize=(7, 4))
  for points, label, style in ((train, "train loss", "-"), (evals, "eval loss", "o-")):
    if points:
      ax.plot(*zip(*points), style, label=label)
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(pathlib.Path(workdir).absolute().name)
  ax.grid(alpha=0.3)
  ax.legend()
  try:
    fig.savefig(path, dpi=120, bbox_inches="tight")
  except OSError as e:
    raise UserError(f"cannot write {path} ({e.strerror or e}); give a writable --out") from None
  except ValueError as e:  # an extension matplotlib has no writer for
    raise UserError(f"cannot write {path} ({e}); give an --out ending in .png") from None
  finally:
    plt.close(fig)
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  parser.add_argument("workdir", help="The run directory, which holds metrics.jsonl.")
  parser.add_argument("--out", help="The PNG file to write (default: WORKDIR/loss.png).")
  args = parser.parse_args(argv)
  try:
    print(plot(args.workdir, args.out))
  except UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
