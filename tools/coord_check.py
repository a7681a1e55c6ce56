"""μP's coordinate check and learning-rate transfer (Yang et al. 2022, "Tensor Programs V").

    python tools/coord_check.py coord [--widths 64,128,256,512,1024] [--steps 10] [--out PNG]
    python tools/coord_check.py transfer [--widths 128,512] [--lrs 2.4e-4,...] [--steps 200]

Both train small GPTs (depth 2, block 64, num_heads fixed so head_dim grows with the width) under
config.model.parametrization standard and mup (mup_base_width = --base-width) on --data (a text
file, char-level; default the embedded corpus, the standard library's sources, byte-level), with
the same seed and batches at every width.

coord: the mean |activation| of the token embedding, each block's output and the logits in the
forward pass of each of the first --steps steps (step 1: at init) at constant learning rate
--lr. Under standard the later steps' activations grow with the width (the logits fastest); under
μP they stay flat. Prints the table and plots it (rows: parametrization, columns: layer, x: width,
one line per step).

transfer: a sweep of peak learning rates (warmup, cosine decay to a tenth) at each width,
printing the final val losses and the best learning rate's grid index per width. μP's claim: the
best rate at the base width stays best (within a grid step) at the larger width; standard's moves.
"""

import argparse
import dataclasses
import math
import sys

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bigflax import data, train  # noqa: E402
from bigflax.config import base  # noqa: E402
from bigflax.errors import ConfigError, UserError  # noqa: E402

PARAMETRIZATIONS = ("standard", "mup")
# A log₂ grid, 2^-12 … 2^-7, around the best rate at width 128 of the default transfer study
# (2^-9 ≈ 2e-3: measured, 200 steps of 8 × 64 bytes).
DEFAULT_LRS = tuple(2.0 ** k for k in range(-12, -6))


@dataclasses.dataclass
class Setup:
  """What every run of a study shares: everything but the width, parametrization and rate."""
  data: str = ""  # a text file (char tokenizer); "" = the embedded corpus (bytes)
  base_width: int = 128
  num_heads: int = 4
  depth: int = 2
  block_size: int = 64
  batch_size: int = 16
  seed: int = 0


def make_config(setup: Setup, width: int, parametrization: str, lr: float, steps: int,
                schedule: str = "constant", warmup: int = 0):
  c = base()
  c.name = f"{parametrization}_{width}"
  c.seed = setup.seed
  if setup.data:
    c.data.path, c.data.tokenizer = setup.data, "char"
  c.data.batching = "windows"
  c.steps, c.batch_size = steps, setup.batch_size
  c.eval_batches = 10
  m = c.model
  m.embed_dim, m.num_heads, m.num_layers, m.block_size = (width, setup.num_heads, setup.depth,
                                                          setup.block_size)
  m.parametrization, m.mup_base_width = parametrization, setup.base_width
  o = c.optimizer
  o.learning_rate, o.schedule, o.warmup_steps = lr, schedule, warmup
  o.end_learning_rate = lr / 10
  return c


def trainer(config, corpus) -> train.Trainer:
  return train.Trainer(config, corpus=corpus, devices=jax.devices()[:1])


# ---- coord: mean |activation| per layer over the first steps ----------------------------------

def _captured(module, method_name: str) -> bool:
  """The modules whose outputs the coordinate check reads: the model itself (the logits), the
  token embedding and each (unscanned) block."""
  return method_name == "__call__" and (module.name is None or module.name == "token_embed"
                                        or module.name.startswith("block_"))


def layer_names(depth: int) -> list[str]:
  return ["token_embed", *(f"block_{i}" for i in range(depth)), "logits"]


def activation_sizes(t: train.Trainer):
  """A jitted (params, batch) → {layer: mean |output|} of `t`'s model, through flax's
  capture_intermediates."""
  model = t.run.model

  def sizes(params, batch):
    _, state = model.apply({"params": params}, batch["inputs"], batch.get("positions"),
                           batch.get("segment_ids"), capture_intermediates=_captured,
                           mutable=["intermediates"])
    found = state["intermediates"]
    outputs = {"token_embed": found["token_embed"]["__call__"][0],
               "logits": found["__call__"][0]}
    for i in range(t.config.model.num_layers):
      outputs[f"block_{i}"] = found[f"block_{i}"]["__call__"][0][0]  # a block returns (x, None)
    return {name: jnp.mean(jnp.abs(x.astype(jnp.float32))) for name, x in outputs.items()}
  return jax.jit(sizes)


def coord_check(setup: Setup, widths, steps: int, lr: float, corpus=None) -> dict:
  """{parametrization: {layer: array [steps, widths]}}: mean |activation| in the forward pass of
  step s (row s; row 0 at init) at each width."""
  corpus = corpus or load(setup)
  results = {}
  for parametrization in PARAMETRIZATIONS:
    table = {name: np.zeros((steps, len(widths))) for name in layer_names(setup.depth)}
    for w, width in enumerate(widths):
      t = trainer(make_config(setup, width, parametrization, lr, steps), corpus)
      sizes = activation_sizes(t)
      for s in range(steps):
        measured = sizes(t.state.params, t.local_batch(data.TRAIN, s))
        for name, value in measured.items():
          table[name][s, w] = float(value)
        t.step(s)
    results[parametrization] = table
  return results


def print_coord_table(results: dict, widths, steps: int) -> None:
  for parametrization, table in results.items():
    print(f"\n{parametrization}: mean |activation| (rows: layer @ step; columns: width)")
    print(f"{'':>18}" + "".join(f"{w:>10}" for w in widths))
    for name, values in table.items():
      for s in (0, steps // 2, steps - 1):
        print(f"{name:>12} @ {s + 1:>3}" + "".join(f"{v:>10.4g}" for v in values[s]))


def plot_coord(results: dict, widths, out: str) -> None:
  names = list(next(iter(results.values())))
  fig, axes = plt.subplots(len(results), len(names), figsize=(3.2 * len(names), 3 * len(results)),
                           squeeze=False)
  for row, (parametrization, table) in enumerate(results.items()):
    for col, name in enumerate(names):
      ax = axes[row][col]
      values = table[name]
      colors = plt.cm.viridis(np.linspace(0, 1, len(values)))
      for s, (line, color) in enumerate(zip(values, colors)):
        ax.plot(widths, line, "o-", color=color, markersize=3, label=f"step {s + 1}")
      ax.set(xscale="log", yscale="log", title=f"{parametrization}: {name}", xlabel="width")
      ax.set_xticks(widths, [str(w) for w in widths])
      ax.set_xticks([], minor=True)
      if col == 0:
        ax.set_ylabel("mean |activation|")
  fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=8)
  fig.tight_layout(rect=(0, 0, 0.92, 1))
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


# ---- transfer: the best learning rate at each width ------------------------------------------

def lr_sweep(setup: Setup, widths, lrs, steps: int, corpus=None, log=print) -> dict:
  """{parametrization: array [widths, lrs] of final val losses (inf where training diverged)}."""
  corpus = corpus or load(setup)
  results = {}
  for parametrization in PARAMETRIZATIONS:
    losses = np.full((len(widths), len(lrs)), np.inf)
    for w, width in enumerate(widths):
      for i, lr in enumerate(lrs):
        t = trainer(make_config(setup, width, parametrization, lr, steps, schedule="cosine",
                                warmup=max(steps // 10, 1)), corpus)
        for s in range(steps):
          t.step(s)
        loss = t.evaluate()["eval_loss"]
        losses[w, i] = loss if math.isfinite(loss) else np.inf
        log(f"{parametrization} width {width} lr {lr:.3g}: val loss {loss:.4f}", flush=True)
    results[parametrization] = losses
  return results


def print_transfer_table(results: dict, widths, lrs) -> None:
  print("\nfinal val loss (rows: parametrization @ width; columns: peak learning rate)")
  print(f"{'':>16}" + "".join(f"{lr:>10.3g}" for lr in lrs) + "    best")
  for parametrization, losses in results.items():
    for w, width in enumerate(widths):
      best = int(np.argmin(losses[w]))
      print(f"{parametrization:>9} @ {width:>4}" + "".join(f"{v:>10.4f}" for v in losses[w])
            + f"    #{best} ({lrs[best]:.3g})")
    shift = int(np.argmin(losses[-1])) - int(np.argmin(losses[0]))
    print(f"{'':>16}best index moves by {shift:+d} grid steps from width {widths[0]} to "
          f"{widths[-1]}")


def plot_transfer(results: dict, widths, lrs, out: str) -> None:
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), sharey=True,
                           squeeze=False)
  for ax, (parametrization, losses) in zip(axes[0], results.items()):
    for width, line in zip(widths, losses):
      (drawn,) = ax.plot(lrs, np.where(np.isfinite(line), line, np.nan), "o-",
                         label=f"width {width}")
      best = int(np.argmin(line))
      ax.plot(lrs[best], line[best], "*", markersize=14, color=drawn.get_color())  # its best
    ax.set(xscale="log", title=parametrization, xlabel="peak learning rate")
    ax.set_xticks(lrs, [f"{lr:.2g}" for lr in lrs])
    ax.set_xticks([], minor=True)
  axes[0][0].set_ylabel("final val loss")
  axes[0][-1].legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  print(f"wrote {out}")


# ---- the command line --------------------------------------------------------------------------

def load(setup: Setup) -> data.Corpus:
  return data.load_corpus(make_config(setup, setup.base_width, "standard", 1e-3, 1).data,
                          setup.block_size)


def numbers(text: str, kind, flag: str, example: str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(v <= 0 for v in values):
    raise ConfigError(f"{flag}={text!r} must be a comma-separated list of positive numbers, "
                      f"e.g. {flag}={example}")
  return values


def parse(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  for name, help_text, widths, steps, batch_size, out in (
      ("coord", "mean |activation| per layer over the first steps, by width", "64,128,256,512,1024",
       10, 16, "coord_check.png"),
      ("transfer", "a learning-rate sweep at each width", "128,512", 200, 8, "lr_transfer.png")):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--widths", default=widths, help="comma-separated embed widths")
    p.add_argument("--steps", type=int, default=steps, help="training steps per run")
    p.add_argument("--out", default=out, help="the plot (PNG)")
    p.add_argument("--data", default="", help="a text file (char-level); default: the embedded "
                   "corpus (the standard library's sources, byte-level)")
    p.add_argument("--base-width", type=int, default=128, help="config.model.mup_base_width")
    p.add_argument("--heads", type=int, default=4, help="attention heads at every width")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks")
    p.add_argument("--batch-size", type=int, default=batch_size, help="rows per step")
    p.add_argument("--seed", type=int, default=0)
  sub.choices["coord"].add_argument("--lr", type=float, default=1e-2,
                                    help="the (constant) Adam learning rate")
  sub.choices["transfer"].add_argument("--lrs", default=",".join(f"{lr:.3g}" for lr in
                                                                DEFAULT_LRS),
                                       help="comma-separated peak learning rates")
  return parser.parse_args(argv)


def main(argv: list[str]) -> int:
  args = parse(argv)
  try:
    widths = numbers(args.widths, int, "--widths", "64,128,256")
    bad = [w for w in widths if w % args.heads]
    if bad:
      raise ConfigError(f"--widths {bad} are not divisible by --heads={args.heads}; give widths "
                        "that are multiples of it")
    if args.steps < 1:
      raise ConfigError(f"--steps must be a positive integer, got {args.steps}")
    setup = Setup(args.data, args.base_width, args.heads, args.depth, batch_size=args.batch_size,
                  seed=args.seed)
    if args.command == "coord":
      results = coord_check(setup, widths, args.steps, args.lr)
      print_coord_table(results, widths, args.steps)
      plot_coord(results, widths, args.out)
    else:
      lrs = numbers(args.lrs, float, "--lrs", "1e-3,2e-3,4e-3")
      results = lr_sweep(setup, widths, lrs, args.steps)
      print_transfer_table(results, widths, lrs)
      plot_transfer(results, widths, lrs, args.out)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
