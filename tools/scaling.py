"""Scaling laws: train a grid of model sizes × token budgets, fit Chinchilla's law, plan compute.

    python tools/scaling.py run --config experiments/X.py --widths 32,64,96 \\
        --tokens 1e5,2e5,4e5 [--workdir DIR] [--out results.csv] [--config.FIELD=VALUE ...]
    python tools/scaling.py fit results.csv [--budget 1e18 ...] [--bootstrap 100] [--plot fit.png]

The results file (what `run` writes, what `fit` reads) is a CSV with a header, or a JSON list of
objects, one row per run with at least these columns:

    params  N, the model's non-embedding parameters (every weight but the token and position
            embedding tables and the untied output projection: Kaplan et al.'s count)
    tokens  D, the training tokens (steps × batch_size × block_size)
    loss    the final validation loss (nats per token)

`run` adds width, depth, heads, steps, params_total and workdir; `fit` ignores extra columns.

The law (Hoffmann et al. 2022, "approach 3") is L(N, D) = E + A/N^α + B/D^β, fitted as
log L = LSE(a − α log N, b − β log D, e) with A = e^a, B = e^b, E = e^e by minimising the Huber
loss (δ = 1e-3) of the log-loss residuals with L-BFGS (scipy), started from the best points of
Hoffmann's grid of initialisations. Confidence intervals: refits on bootstrap resamples of the
points. Under the budget C ≈ 6·N·D the loss-minimising allocation is

    N_opt = G·(C/6)^(β/(α+β)),  D_opt = (C/6)^(α/(α+β)) / G,  G = (αA / (βB))^(1/(α+β)).
"""

import argparse
import csv
import itertools
import json
import pathlib
import subprocess
import sys

import numpy as np

NAMES = ("E", "A", "B", "alpha", "beta")
NUM_PARAMS = len(NAMES)  # a fit needs at least this many points
HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of initialisations (approach 3, appendix D.2).
INIT_GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
             "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0),
             "b": np.arange(0.0, 25.1, 5.0)}


class ScalingError(ValueError):
  """Input the user can fix; main prints it as one `error: …` line."""


# ---------------------------------------------------------------------------------------------
# The law and its fit.

def law(theta: dict, n, d):
  """L(N, D) = E + A/N^α + B/D^β."""
  n, d = np.asarray(n, float), np.asarray(d, float)
  return theta["E"] + theta["A"] / n ** theta["alpha"] + theta["B"] / d ** theta["beta"]


def _objective(x, log_n, log_d, log_l, delta):
  """Mean Huber loss of the residuals LSE(a − α log N, b − β log D, e) − log L, and its gradient
  in x = (a, b, e, α, β)."""
  a, b, e, alpha, beta = x
  terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
  top = terms.max(axis=0)
  weights = np.exp(terms - top)
  total = weights.sum(axis=0)
  r = top + np.log(total) - log_l
  weights /= total  # d LSE / d term
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).mean()
  dr = np.clip(r, -delta, delta) / r.size
  grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                   -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
  return loss, grad


def _grid_losses(grid, log_n, log_d, log_l, delta):
  """The objective at every row of grid [k, 5] (a, b, e, α, β), vectorised."""
  a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
  terms = np.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n])
  r = np.logaddexp.reduce(terms, axis=0) - log_l
  return np.where(np.abs(r) <= delta, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).mean(1)


def _init_grid():
  g = INIT_GRID
  return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])))


def fit(n, d, loss, *, delta: float = HUBER_DELTA, starts: int = 32, inits=None) -> dict:
  """The law's parameters fitted to points (N, D, L): L-BFGS from the `starts` best points of
  Hoffmann's initialisation grid (and any extra `inits`, rows of (a, b, e, α, β)); the best
  optimum. Returns E, A, B, alpha, beta, a, b, e and the final objective."""
  from scipy.optimize import minimize
  log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
  log_l = np.log(np.asarray(loss, float))
  if not len(log_n) == len(log_d) == len(log_l):
    raise ScalingError("params, tokens and loss need the same number of points")
  if len(log_n) < NUM_PARAMS:
    raise ScalingError(f"{len(log_n)} points cannot determine the law's {NUM_PARAMS} parameters; "
                       f"give at least {NUM_PARAMS}")
  grid = _init_grid()
  order = np.argsort(_grid_losses(grid, log_n, log_d, log_l, delta))
  candidates = list(grid[order[:starts]])
  if inits is not None:
    candidates = list(np.atleast_2d(inits)) + candidates
  best = None
  for x0 in candidates:
    result = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                      method="L-BFGS-B", options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-10})
    if best is None or result.fun < best.fun:
      best = result
  a, b, e, alpha, beta = best.x
  with np.errstate(over="ignore"):  # a degenerate fit runs off to infinity: inf, not an error
    big_e, big_a, big_b = (float(np.exp(v)) for v in (e, a, b))
  return {"E": big_e, "A": big_a, "B": big_b, "alpha": float(alpha),
          "beta": float(beta), "a": float(a), "b": float(b), "e": float(e),
          "objective": float(best.fun)}


def compute_optimal(theta: dict, flops):
  """(N_opt, D_opt) minimising L(N, D) subject to 6·N·D = flops, in closed form."""
  alpha, beta = theta["alpha"], theta["beta"]
  g = (alpha * theta["A"] / (beta * theta["B"])) ** (1 / (alpha + beta))
  c6 = np.asarray(flops, float) / 6
  return g * c6 ** (beta / (alpha + beta)), c6 ** (alpha / (alpha + beta)) / g


def bootstrap(n, d, loss, theta: dict, *, samples: int = 100, seed: int = 0, budgets=(),
              level: float = 0.9, starts: int = 4) -> dict:
  """Confidence intervals (central `level`) of each parameter, and of N_opt and D_opt at each
  budget, from fits to `samples` resamples (with replacement) of the points, each started from
  the full fit and the `starts` best grid points."""
  n, d, loss = (np.asarray(v, float) for v in (n, d, loss))
  rng = np.random.default_rng(seed)
  x0 = np.array([theta["a"], theta["b"], theta["e"], theta["alpha"], theta["beta"]])
  fits = []
  for _ in range(samples):
    idx = rng.integers(0, len(n), len(n))
    if (len(set(zip(n[idx], d[idx]))) < NUM_PARAMS or len(set(n[idx])) < 2
        or len(set(d[idx])) < 2):
      continue  # a degenerate resample: fewer distinct points than parameters, or one N or D
    refit = fit(n[idx], d[idx], loss[idx], starts=starts, inits=x0)
    if all(np.isfinite(refit[name]) for name in NAMES):
      fits.append(refit)
  if not fits:
    raise ScalingError("every bootstrap resample was degenerate; give more distinct points")
  q = ((1 - level) / 2 * 100, (1 + level) / 2 * 100)
  out = {name: tuple(np.percentile([f[name] for f in fits], q)) for name in NAMES}
  for c in budgets:
    opts = np.array([compute_optimal(f, c) for f in fits])
    out[f"N_opt@{c:g}"] = tuple(np.percentile(opts[:, 0], q))
    out[f"D_opt@{c:g}"] = tuple(np.percentile(opts[:, 1], q))
  out["samples"] = len(fits)
  out["level"] = level
  return out


# ---------------------------------------------------------------------------------------------
# Results files.

def read_results(path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(N, D, L) of a results file: CSV with a header, or a JSON list of objects."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ScalingError(f"{path}: no such file; give the results file `scaling.py run` wrote "
                       "(CSV or JSON with columns params, tokens, loss)")
  text = path.read_text(encoding="utf-8")
  try:
    if path.suffix == ".json":
      rows = json.loads(text)
    else:
      rows = list(csv.DictReader(text.splitlines()))
    columns = [[float(row[k]) for row in rows] for k in ("params", "tokens", "loss")]
  except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
    raise ScalingError(f"{path}: not a results file ({type(e).__name__}: {e}); it needs one row "
                       "per run with numeric columns params, tokens and loss") from None
  n, d, loss = (np.array(c) for c in columns)
  if not (np.all(n > 0) and np.all(d > 0) and np.all(loss > 0)):
    raise ScalingError(f"{path}: params, tokens and loss must all be positive")
  return n, d, loss


def write_results(path, rows: list[dict]) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if path.suffix == ".json":
    path.write_text(json.dumps(rows, indent=1) + "\n")
    return
  with path.open("w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Plot.

def plot(path, n, d, loss, theta: dict, budgets=()) -> None:
  """Left: loss against N for each token budget D, points and fitted law. Right: iso-FLOP
  curves L(N, C/6N) for budgets spanning the data (and `budgets`), their minima marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  grid_n = np.geomspace(n.min() / 2, n.max() * 2, 200)
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(np.unique(d))))
  for color, tokens in zip(colors, np.unique(d)):
    sel = d == tokens
    left.scatter(n[sel], loss[sel], color=color, label=f"D = {tokens:.3g}")
    left.plot(grid_n, law(theta, grid_n, tokens), color=color)
  left.set(xscale="log", xlabel="parameters N", ylabel="loss", title=(
      f"L = {theta['E']:.3g} + {theta['A']:.3g}/N^{theta['alpha']:.3g} + "
      f"{theta['B']:.3g}/D^{theta['beta']:.3g}"))
  left.legend(fontsize="small")
  flops = 6 * n * d
  budget_list = sorted(set(np.geomspace(flops.min(), flops.max(), 5)) | set(budgets))
  colors = plt.cm.plasma(np.linspace(0, 0.9, len(budget_list)))
  for color, c in zip(colors, budget_list):
    n_opt, d_opt = compute_optimal(theta, c)
    ns = np.geomspace(min(n.min(), n_opt) / 10, max(n.max(), n_opt) * 10, 200)
    right.plot(ns, law(theta, ns, c / (6 * ns)), color=color, label=f"C = {c:.2g}")
    right.scatter([n_opt], [law(theta, n_opt, d_opt)], color=color, marker="*", s=80)
  right.set(xscale="log", xlabel="parameters N", ylabel="loss",
            title="iso-FLOP curves (C = 6ND), optima starred")
  right.legend(fontsize="small")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Training the grid.

def model_shape(width: int, head_dim: int, aspect: int) -> dict:
  """The size rule: embed_dim = width, heads of head_dim, depth = width / aspect (at least 1)."""
  if width <= 0 or width % head_dim:
    raise ScalingError(f"--widths: {width} is not a positive multiple of --head_dim={head_dim}; "
                       "choose widths that are")
  return {"embed_dim": width, "num_heads": width // head_dim,
          "num_layers": max(1, round(width / aspect))}


def count_params(config) -> tuple[int, int]:
  """(non-embedding, total) parameters of the model of a resolved config (config.json)."""
  import flax.linen as nn
  import jax
  from bigflax.model import ModelConfig, Transformer, abstract_params
  params = nn.unbox(abstract_params(Transformer(ModelConfig.from_config(config.model)),
                                    config.model.block_size))
  total = embedding = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    size = int(np.prod(leaf.shape))
    total += size
    names = {str(getattr(k, "key", "")) for k in path}
    if names & {"token_embed", "position_embed", "lm_head"}:
      embedding += size
  return total - embedding, total


def _numbers(text: str, flag: str, kind=float) -> list:
  try:
    values = [kind(float(v)) for v in text.split(",") if v.strip()]
  except ValueError:
    raise ScalingError(f"{flag}={text!r}: give comma-separated numbers, e.g. {flag}=1e5,2e5") \
        from None
  if not values or min(values) <= 0:
    raise ScalingError(f"{flag}={text!r}: give at least one positive number")
  return values


def run_grid(args, overrides: list[str]) -> int:
  from bigflax import config as config_lib
  from bigflax.rundir import read_config, read_metrics
  widths = _numbers(args.widths, "--widths", int)
  budgets = _numbers(args.tokens, "--tokens")
  points = len(widths) * len(budgets)
  if points < NUM_PARAMS:
    raise ScalingError(f"a grid of {len(widths)} widths × {len(budgets)} token budgets is "
                       f"{points} runs, fewer than the law's {NUM_PARAMS} parameters; give more "
                       "--widths or --tokens")
  shapes = {w: model_shape(w, args.head_dim, args.aspect) for w in widths}
  config = config_lib.load_experiment(args.config) if args.config else config_lib.base()
  for override in overrides:  # the batch and block size decide the steps: read them too
    key, _, value = override.removeprefix("--config.").partition("=")
    if key in ("batch_size", "model.block_size"):
      section, _, field = key.rpartition(".")
      (config[section] if section else config)[field] = int(value)
  tokens_per_step = config.batch_size * config.model.block_size
  root = pathlib.Path(args.workdir)
  rows = []
  for width, tokens in itertools.product(widths, budgets):
    steps = max(1, round(tokens / tokens_per_step))
    warmup = min(config.optimizer.warmup_steps, steps // 10)
    workdir = root / f"w{width}_t{tokens:g}"
    command = [sys.executable, "-m", "bigflax", "train", *([f"--config={args.config}"]
                                                           if args.config else []),
               *(f"--config.model.{k}={v}" for k, v in shapes[width].items()),
               f"--config.steps={steps}", f"--config.optimizer.warmup_steps={warmup}",
               "--config.optimizer.decay_steps=0", f"--config.eval_every={steps}",
               f"--config.log_every={min(config.log_every, steps)}",
               "--config.checkpoint_every=0", "--config.sample.max_new_tokens=1",
               *overrides, f"--workdir={workdir}", "--overwrite"]
    print(f"scaling: width {width} × {steps} steps ({steps * tokens_per_step:g} tokens) → "
          f"{workdir}", flush=True)
    result = subprocess.run(command, capture_output=not args.verbose, text=True)
    if result.returncode:
      tail = (result.stderr or "").strip().splitlines()[-1:] or ["(no output)"]
      raise ScalingError(f"the run in {workdir} failed: {tail[0]}")
    evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
    non_embedding, total = count_params(read_config(workdir))
    rows.append({"params": non_embedding, "tokens": steps * tokens_per_step,
                 "loss": evals[-1]["eval_loss"], "width": width,
                 "depth": shapes[width]["num_layers"], "heads": shapes[width]["num_heads"],
                 "steps": steps, "params_total": total, "workdir": str(workdir)})
    print(f"scaling: N={non_embedding} D={rows[-1]['tokens']} loss={rows[-1]['loss']:.4f}",
          flush=True)
    write_results(args.out, rows)  # after every run: a stopped grid keeps what it finished
  print(f"scaling: wrote {len(rows)} runs to {args.out}")
  return 0


# ---------------------------------------------------------------------------------------------
# Command line.

def fit_command(args) -> int:
  n, d, loss = read_results(args.results)
  budgets = _numbers(args.budget, "--budget") if args.budget else []
  theta = fit(n, d, loss, starts=args.starts)
  report = {"fit": {k: theta[k] for k in (*NAMES, "objective")}, "points": len(n)}
  print(f"fit of {len(n)} points: L(N, D) = {theta['E']:.4g} + {theta['A']:.4g}/N^"
        f"{theta['alpha']:.4f} + {theta['B']:.4g}/D^{theta['beta']:.4f}")
  residual = np.log(law(theta, n, d)) - np.log(loss)
  print(f"  log-loss residuals: rms {np.sqrt(np.mean(residual ** 2)):.4g}, max "
        f"{np.abs(residual).max():.4g}")
  intervals = bootstrap(n, d, loss, theta, samples=args.bootstrap, seed=args.seed,
                        budgets=budgets) if args.bootstrap else {}
  if intervals:
    report["intervals"] = intervals
    print(f"  {intervals['level']:.0%} bootstrap intervals ({intervals['samples']} resamples):")
    for name in NAMES:
      lo, hi = intervals[name]
      print(f"    {name:6s} {theta[name]:.4g}  [{lo:.4g}, {hi:.4g}]")
  report["compute_optimal"] = []
  for c in budgets:
    n_opt, d_opt = compute_optimal(theta, c)
    entry = {"flops": c, "N_opt": float(n_opt), "D_opt": float(d_opt),
             "loss": float(law(theta, n_opt, d_opt))}
    line = (f"  C = {c:.3g} FLOPs: N_opt = {n_opt:.4g}, D_opt = {d_opt:.4g} "
            f"(D/N = {d_opt / n_opt:.3g}), L = {entry['loss']:.4f}")
    if intervals:
      entry["N_opt_interval"] = intervals[f"N_opt@{c:g}"]
      entry["D_opt_interval"] = intervals[f"D_opt@{c:g}"]
      line += (f"; N_opt in [{entry['N_opt_interval'][0]:.3g}, {entry['N_opt_interval'][1]:.3g}]"
               f", D_opt in [{entry['D_opt_interval'][0]:.3g}, "
               f"{entry['D_opt_interval'][1]:.3g}]")
    report["compute_optimal"].append(entry)
    print(line)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
  if args.plot:
    plot(args.plot, n, d, loss, theta, budgets)
    print(f"  plot: {args.plot}")
  return 0


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("fit", help="fit L(N, D) = E + A/N^α + B/D^β to a results file")
  p.add_argument("results", help="CSV or JSON with columns params, tokens, loss")
  p.add_argument("--budget", default="", help="comma-separated FLOP budgets C to allocate "
                 "(N_opt, D_opt with C = 6ND)")
  p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the "
                 "confidence intervals; 0 = none")
  p.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
  p.add_argument("--starts", type=int, default=32, help="L-BFGS runs, from the best points of "
                 "Hoffmann's grid of initialisations")
  p.add_argument("--plot", default="", help="write the fit and iso-FLOP curves to this PNG")
  p.add_argument("--out", default="", help="write the fit, intervals and allocations as JSON")
  p = sub.add_parser("run", help="train a grid of widths × token budgets, write a results file")
  p.add_argument("--config", default=None, help="experiment file (default: bigflax's base)")
  p.add_argument("--widths", required=True, help="comma-separated model widths (embed_dim)")
  p.add_argument("--tokens", required=True, help="comma-separated training token budgets")
  p.add_argument("--head_dim", type=int, default=16, help="heads = width / head_dim")
  p.add_argument("--aspect", type=int, default=32, help="depth = width / aspect (at least 1)")
  p.add_argument("--workdir", default="runs/scaling", help="parent of the runs' directories")
  p.add_argument("--out", default="", help="the results file (default: WORKDIR/results.csv)")
  p.add_argument("--verbose", action="store_true", help="show the runs' output")
  args, overrides = parser.parse_known_args(argv)
  try:
    if args.command == "fit":
      if overrides:
        raise ScalingError(f"unknown arguments {overrides}; see scaling.py fit --help")
      return fit_command(args)
    bad = [o for o in overrides if not o.startswith("--config.")]
    if bad:
      raise ScalingError(f"unknown arguments {bad}; `run` passes on only --config.FIELD=VALUE")
    args.out = args.out or str(pathlib.Path(args.workdir) / "results.csv")
    return run_grid(args, overrides)
  except ScalingError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except Exception as e:  # bigflax's own user errors (a bad --config) are one line too
    from bigflax.errors import UserError
    if isinstance(e, UserError):
      print(f"error: {e}", file=sys.stderr)
      return 1
    raise


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
