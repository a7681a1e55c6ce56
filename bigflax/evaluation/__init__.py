"""Evaluation: named eval sets (`sets`), `bigflax eval` on an export or any checkpoint (here), and
the lm-evaluation-harness backend (`harness`, which imports lm_eval only when tasks are asked
for: the core does not need it).

`bigflax eval --workdir D [--step N]` rebuilds the run from D/config.json (with the command
line's --config.FIELD overrides: other eval sets, another mesh), restores the params straight
into the run's shardings (bigflax.pretrained), evaluates config.eval.sets and --tasks on every
process, prints a table and writes D/eval_<N>.json (eval_final.json for the params/ export).
"""

import json
import math
import pathlib

import jax

from bigflax import config as config_lib, data, pretrained, rundir, run as run_lib
from bigflax.errors import CheckpointError, UserError
from bigflax.evaluation.sets import (EvalSet, Evaluator, open_sets, parse, progress_line,
                                     summary, target_bytes)


def _tasks(spec) -> list[str]:
  tasks = spec.split(",") if isinstance(spec, str) else list(spec)
  return [t.strip() for t in tasks if t.strip()]


def _harness():
  # Imported when used, not with this package: `python -m bigflax.evaluation.harness` runs that
  # module as __main__, and an earlier import would make it a second copy.
  from bigflax.evaluation import harness  # noqa: PLC0415
  return harness


def check_harness(eval_config, tasks=None) -> None:
  """A UserError now, not after training or the eval sets, for a harness task (`tasks`, default
  config.eval.harness_tasks) that lm_eval does not know."""
  harness = _harness()
  harness.check_tasks(_tasks(eval_config.harness_tasks if tasks is None else tasks),
                      harness.task_manager(eval_config.harness_include or None))


def run_harness(run, params, tokenizer, eval_config, *, tasks=None,
                batch_size: int) -> dict[str, dict[str, float]]:
  """lm-evaluation-harness tasks (`tasks`, a list or "a,b"; default config.eval.harness_tasks)
  on `params`, sharded like `run`, with config.eval's limit and task directory; every process
  calls it. {task: {metric: value}}."""
  e = eval_config
  return _harness().run_tasks(
      run.model, params, tokenizer, _tasks(e.harness_tasks if tasks is None else tasks),
      batch_size=e.harness_batch_size or batch_size, limit=e.harness_limit or None,
      mesh=run.mesh, batch_sharding=run.batch_sharding, rules=run.rules,
      include_path=e.harness_include or None)


def harness_record(results: dict[str, dict[str, float]]) -> dict[str, float]:
  """run_harness' results as metrics.jsonl fields, harness/TASK/METRIC."""
  return {f"harness/{task}/{metric}": value for task, metrics in results.items()
          for metric, value in metrics.items()}


def run_config(workdir: str, override=lambda config: None):
  """The config of the run in `workdir` (its config.json over base(), so a run written before a
  field existed gets its default), with `override(config)` applied. The processes are the
  command's (config.distributed from the command line), and the params come from the workdir
  itself, not from its init_from."""
  config = config_lib.base()
  stored = rundir.read_config(workdir)
  with config.unlocked():
    config.update(stored)
    config.distributed = config_lib.base().distributed  # this command's processes, not training's
  override(config)
  with config.unlocked():
    config.init_from = ""
  return config


def result_path(workdir: str, step: int | None) -> pathlib.Path:
  return pathlib.Path(workdir) / f"eval_{'final' if step is None else step}.json"


def evaluate_workdir(workdir: str, step: int | None = None, *, override=lambda config: None,
                     tasks: str = "", overwrite: bool = False, print_fn=print) -> dict:
  """Evaluates a run's export (`step` None and params/ present) or checkpoint `step` (default
  the latest) on config.eval.sets and `tasks`; process 0 prints a table and writes
  result_path(workdir, step). Returns what it wrote."""
  rundir.read_config(workdir)  # not a run: say so first
  steps = pretrained.checkpoint_steps(pathlib.Path(workdir))
  exported = rundir.params_dir(workdir).is_dir()
  if step is not None and step not in steps:
    held = f"its checkpoints are steps {steps}" if steps else "it has no checkpoints"
    raise CheckpointError(f"--step {step}: {workdir} has no checkpoint of step {step}; {held}"
                          + (" (or drop --step to evaluate its params/ export)" if exported
                             else ""))
  if step is None and not exported:
    step = steps[-1] if steps else None
  source = pretrained.parse(workdir if step is None else f"{workdir}:{step}", "--workdir")
  path = result_path(workdir, source.step)
  if path.exists() and not overwrite:
    raise UserError(f"{path} exists (an earlier bigflax eval of this "
                    f"{'export' if source.step is None else 'checkpoint'}); pass --overwrite to "
                    "replace it, or move it away")
  config = run_config(workdir, override)
  run_lib.check(config)
  if tasks:
    check_harness(config.eval, tasks)
  tokenizer = data.make_tokenizer(config.data)
  config = run_lib.resolve(config, tokenizer)  # a model with fewer ids than the tokenizer: error
  run = run_lib.build(config)
  evaluator = Evaluator(run, tokenizer, open_sets(config, tokenizer, run.batch_sharding))
  state = run.init_state(jax.random.key(config.seed))
  state = state.replace(params=pretrained.load_params(source, run, state.params))
  with run.activate():
    results = evaluator.evaluate(lambda batch: run.eval_step(state, batch))
  harness_results = {}
  if tasks:
    harness_results = run_harness(run, state.params, tokenizer, config.eval, tasks=tasks,
                                  batch_size=config.batch_size)
  written = {"workdir": str(workdir), "step": source.step,
             "params": "export" if source.step is None else "checkpoint",
             "eval_sets": config.eval.sets, "sets": results, "harness": harness_results}
  if jax.process_index() == 0:
    print_fn(table(results, harness_results))
    path.write_text(json.dumps(_strict(written), indent=1, allow_nan=False) + "\n")
    print_fn(f"wrote {path}")
  return written


def _strict(value):
  """NaN/Inf (a diverged model) as null: eval_*.json is strict JSON like metrics.jsonl."""
  if isinstance(value, dict):
    return {k: _strict(v) for k, v in value.items()}
  return None if isinstance(value, float) and not math.isfinite(value) else value


def table(results: dict[str, dict[str, float]], harness_results: dict) -> str:
  columns = list(dict.fromkeys(c for metrics in results.values() for c in metrics))
  width = max([len("set")] + [len(name) for name in results])
  lines = [f"{'set':{width}}  " + "  ".join(f"{c:>10}" for c in columns)]
  for name, metrics in results.items():
    cells = (f"{metrics[c]:>10.4f}" if isinstance(metrics.get(c), float)
             else f"{metrics.get(c, '-'):>10}" for c in columns)
    lines.append(f"{name:{width}}  " + "  ".join(cells))
  for task, metrics in harness_results.items():
    lines.append(f"{task}: " + ", ".join(f"{m} {v:.4f}" if isinstance(v, float) else f"{m} {v}"
                                          for m, v in metrics.items()))
  return "\n".join(lines)


__all__ = ["EvalSet", "Evaluator", "check_harness", "evaluate_workdir", "harness_record",
           "open_sets", "parse", "progress_line", "result_path", "run_config", "run_harness",
           "summary", "table", "target_bytes"]
