"""`bigflax sweep`: a hyper-parameter search with Optuna, each trial an ordinary run.

    WORKDIR/                  (--workdir; default runs/sweeps/<study>)
      sweep.json              the study's name, experiment and base config: who may join
      study.db                the Optuna study (SQLite): every trial, its params and losses
      trials/<n>/             trial n: an ordinary run directory (resumable, sampleable) and
        experiment.py         the experiment file it trained (the base plus the chosen fields)
        train.log             its `bigflax train` output
      best_experiment.py      the best trial's fields on the base experiment, ready to train
      sweep.png               the objective over trials and the parameter importances

The search space is a Python file defining `space(trial, config)` that sets config fields from
`trial.suggest_*`. Each trial trains in a `bigflax train` subprocess; its eval losses are reported
to Optuna as they appear in metrics.jsonl, and a pruned trial gets SIGTERM, so it checkpoints
and stops like a preempted run. The objective is the final eval_loss (minimised).

Workers (`--workers K` processes here, or `bigflax sweep` on other hosts sharing WORKDIR) pull
trials from the same study until it has `--trials` finished ones. Each running trial's worker
records a heartbeat; a trial whose worker died (a killed sweep) goes stale after HEARTBEAT_GRACE
seconds, is failed and re-queued with its params, and the next worker resumes it in the same
trials/<n>/ from its checkpoint, so it is neither lost nor run twice.

Optuna is an optional extra (`pip install "bigflax[sweep]"`); nothing else in bigflax imports it.
"""

import contextlib
import copy
import ctypes
import fcntl
import json
import multiprocessing
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings
import zlib

import ml_collections

from bigflax import config as config_lib
from bigflax.errors import UserError

HEARTBEAT_INTERVAL = 5  # seconds between a running trial's heartbeats
HEARTBEAT_GRACE = 15  # seconds without one after which the trial's worker counts as dead
POLL_SECONDS = 0.25  # how often a worker reads its trial's metrics.jsonl
OBJECTIVE = "eval_loss"  # the final value of this metric is minimised


def _optuna():
  try:
    import optuna  # noqa: PLC0415 - an optional extra, imported only by this command
  except ImportError:
    raise UserError('bigflax sweep needs Optuna, which is not installed; pip install '
                    '"bigflax[sweep]"') from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own lines
  warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
  # The heartbeat is kept by the worker's own loop (Sweep.heartbeat), not Study.optimize's.
  warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
  return optuna


def _pruners(optuna, startup_trials: int):
  """--pruner's choices (bigflax/cli.py lists their names)."""
  return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=startup_trials),
          "none": optuna.pruners.NopPruner}


def load_space(path: str):
  """The `space(trial, config)` function of a search-space file; UserError naming the file."""
  module = config_lib.load_python_file(path, "--space", "a Python file defining "
                                       "space(trial, config)")
  if not callable(getattr(module, "space", None)):
    raise UserError(f"--space {path} defines no space(trial, config); a search-space file "
                    "defines space(trial, config) setting config fields with trial.suggest_*, "
                    "e.g. config.optimizer.learning_rate = trial.suggest_float('lr', 1e-4, 1e-2, "
                    "log=True)")
  return module.space


def _flat(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Every field as "a.b" → the Python literal of its value."""
  flat = {}

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = repr(value)
  walk(config, "")
  return flat


def changed_fields(experiment: ml_collections.ConfigDict,
                   config: ml_collections.ConfigDict) -> dict[str, str]:
  """The fields `config` sets differently from `experiment` (field → Python literal)."""
  before = _flat(experiment)
  return {k: v for k, v in _flat(config).items() if before.get(k) != v}


def experiment_source(spec: str | None, fields: dict[str, str], doc: str, where) -> str:
  """An experiment file (to be written in directory `where`) whose get_config() is experiment
  `spec` (None: the embedded default) with `fields` set."""
  if spec is None:
    start = "c = bigflax_config.get_config()"
  else:
    path, _, variant = spec.partition(":")
    relative = os.path.relpath(pathlib.Path(path).absolute(), pathlib.Path(where).absolute())
    suffix = f' + ":{variant}"' if variant else ""
    start = f"c = bigflax_config.load_experiment(str(pathlib.Path(__file__).parent / " \
            f"{relative!r}){suffix})"
  body = "".join(f"  c.{name} = {value}\n" for name, value in sorted(fields.items()))
  return (f'"""{doc}"""\n\nimport pathlib\n\nfrom bigflax import config as bigflax_config\n\n\n'
          f"def get_config():\n  {start}\n{body}  return c\n")


def _write_atomic(path: pathlib.Path, text: str) -> None:
  partial = path.with_name(f".{path.name}.{os.getpid()}")
  partial.write_text(text, encoding="utf-8")
  partial.replace(path)


class Sweep:
  """One study in one directory: the base config, the space and the Optuna storage."""

  def __init__(self, directory, study: str, spec: str | None, config, space_path: str,
               trials: int, pruner: str = "median", startup_trials: int = 5):
    self.directory = pathlib.Path(directory)
    self.study_name, self.spec, self.config = study, spec, config
    self.space_path, self.trials = space_path, trials
    self.pruner, self.startup_trials = pruner, startup_trials

  def settings(self) -> dict:
    """What a worker process needs to rebuild this Sweep (picklable: the config keeps its
    tuples, which JSON would turn into lists)."""
    return {"directory": str(self.directory), "study": self.study_name, "spec": self.spec,
            "config": self.config, "space_path": self.space_path, "trials": self.trials,
            "pruner": self.pruner, "startup_trials": self.startup_trials}

  def experiment(self) -> ml_collections.ConfigDict:
    """The base experiment without the command line's overrides."""
    return config_lib.load_experiment(self.spec) if self.spec else config_lib.get_config()

  def claim_directory(self) -> None:
    """Creates the sweep directory, or checks that the one there holds this very study."""
    self.directory.mkdir(parents=True, exist_ok=True)
    (self.directory / "trials").mkdir(exist_ok=True)
    meta = {"study": self.study_name, "experiment": self.config.name,
            "spec": self.spec or "(the embedded default)", "fields": _flat(self.config)}
    path = self.directory / "sweep.json"
    with self.lock():
      if not path.exists():
        _write_atomic(path, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return
    there = json.loads(path.read_text(encoding="utf-8"))
    where = f"--workdir {self.directory}"
    if there["experiment"] != meta["experiment"] or there["study"] != meta["study"]:
      raise UserError(
          f"{where} holds study {there['study']!r} of experiment {there['experiment']!r} "
          f"({there['spec']}), not study {self.study_name!r} of experiment "
          f"{self.config.name!r} ({meta['spec']}); choose another --workdir or --study")
    # Fields one side lacks (a newer bigflax added them) have their defaults: not compared.
    differ = sorted(k for k in set(there["fields"]) & set(meta["fields"])
                    if there["fields"][k] != meta["fields"][k])
    if differ:
      k = differ[0]
      raise UserError(
          f"{where} holds study {self.study_name!r} of experiment {self.config.name!r} with "
          f"config.{k}={there['fields'].get(k)}, not {meta['fields'].get(k)}: trials would not "
          f"compare; use the same --config.FIELD overrides, or another --study")

  @contextlib.contextmanager
  def lock(self):
    """An exclusive lock on the sweep directory (workers on this host; on shared file systems
    that honour flock, other hosts too)."""
    with open(self.directory / ".lock", "a") as handle:
      fcntl.flock(handle, fcntl.LOCK_EX)
      try:
        yield
      finally:
        fcntl.flock(handle, fcntl.LOCK_UN)

  def study(self, seed: int | None = None):
    optuna = _optuna()
    self.storage = optuna.storages.RDBStorage(
        f"sqlite:///{(self.directory / 'study.db').absolute()}",
        engine_kwargs={"connect_args": {"timeout": 60}},  # workers wait for each other's writes
        heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=HEARTBEAT_GRACE,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
            inherit_intermediate_values=True))
    return optuna.create_study(
        study_name=self.study_name, storage=self.storage, load_if_exists=True,
        direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=_pruners(optuna, self.startup_trials)[self.pruner]())

  def heartbeat(self, trial) -> None:
    """Tells the other workers that `trial`'s worker is alive."""
    study_id = self.storage.get_study_id_from_name(self.study_name)
    self.storage.record_heartbeat(
        self.storage.get_trial_id_from_study_id_trial_number(study_id, trial.number))

  @staticmethod
  def frozen(study, trial):
    return next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)

  # -- one worker ------------------------------------------------------------------------------

  def work(self, worker: int = 0, print_fn=print) -> None:
    """Runs trials until the study has self.trials finished ones (waiting for other workers'
    running trials, and resuming those whose worker died)."""
    optuna = _optuna()
    with self.lock():
      count = len(self.study().trials)
    # Deterministic for a given study history, and different for each worker of this sweep.
    study = self.study(seed=zlib.crc32(f"{self.study_name}/{count}/{worker}".encode()))
    state = optuna.trial.TrialState
    space = load_space(self.space_path)
    while True:
      with self.lock():
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        waiting = sum(t.state == state.WAITING for t in trials)
        running = sum(t.state == state.RUNNING for t in trials)
        if not waiting and finished(trials, optuna) + running >= self.trials:
          trial = None
        else:
          trial = study.ask()
          self.heartbeat(trial)
      if trial is None:
        if not running:
          return
        time.sleep(HEARTBEAT_INTERVAL)  # another worker's trial: finished or stale, then retried
        continue
      self._run_trial(study, trial, space, print_fn)

  def _run_trial(self, study, trial, space, print_fn) -> None:
    optuna = _optuna()
    retried = self.frozen(study, trial).system_attrs.get("failed_trial")
    number = trial.user_attrs.get("directory", trial.number)
    workdir = self.directory / "trials" / str(number)
    config = copy.deepcopy(self.config)
    try:
      space(trial, config)
    except Exception as e:  # noqa: BLE001 - the user's space function: one line
      study.tell(trial, state=optuna.trial.TrialState.FAIL)
      raise UserError(f"--space {self.space_path}: space(trial, config) failed "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); fix "
                      "it and run the sweep again (the study resumes)") from None
    if config.metrics.wandb_project and not config.metrics.wandb_name:
      config.metrics.wandb_name = f"{self.study_name}/{number}"  # one W&B run per trial
    fields = changed_fields(self.experiment(), config)
    trial.set_user_attr("directory", number)
    trial.set_user_attr("fields", fields)
    workdir.mkdir(parents=True, exist_ok=True)
    experiment_file = workdir / "experiment.py"
    _write_atomic(experiment_file, experiment_source(
        self.spec, fields, f"Trial {number} of sweep {self.study_name!r}.", workdir))
    chosen = ", ".join(f"{k}={v}" for k, v in trial.params.items()) or "(no suggested params)"
    again = f" (resuming trial {retried}, whose worker stopped)" if retried is not None else ""
    print_fn(f"trial {number}{again}: {chosen}")
    with open(workdir / "train.log", "a", encoding="utf-8") as log, \
         self._trial_lock(trial, workdir, print_fn) as lock:
      # The trainer inherits the lock: should this worker die, the lock is held until the trainer
      # it leaves behind has stopped too, so a retry never trains beside it in the same directory.
      process = subprocess.Popen(
          [sys.executable, "-m", "bigflax", "train", f"--config={experiment_file}",
           f"--workdir={workdir}"], stdout=log, stderr=subprocess.STDOUT,
          pass_fds=(lock.fileno(),), preexec_fn=_die_with_parent)
      pruned = self._watch(study, trial, process, workdir, config.eval_every)
    if pruned is not None:
      study.tell(trial, state=optuna.trial.TrialState.PRUNED)
      print_fn(f"trial {number}: pruned at step {pruned} (its eval_loss was worse than the "
               "median of the earlier trials')")
      return
    final = [r for r in read_records(workdir) if r.get(OBJECTIVE) is not None]
    if process.returncode == 0 and final and final[-1]["step"] == config.steps:
      study.tell(trial, final[-1][OBJECTIVE])
      print_fn(f"trial {number}: {OBJECTIVE} {final[-1][OBJECTIVE]:.4f}")
      return
    error = _last_error(workdir / "train.log")
    trial.set_user_attr("error", error)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    print_fn(f"trial {number}: failed ({error}); see {workdir / 'train.log'}")

  @contextlib.contextmanager
  def _trial_lock(self, trial, workdir: pathlib.Path, print_fn):
    """An exclusive lock on the trial's directory, waited for (heartbeating) while a trainer
    left there by a dead worker finishes."""
    with open(workdir / ".trial.lock", "a") as lock:
      waiting = False
      while True:
        try:
          fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          if not waiting:
            print_fn(f"waiting for the trainer a stopped worker left in {workdir} to stop")
            waiting = True
          self.heartbeat(trial)
          time.sleep(1)
      yield lock

  def _watch(self, study, trial, process, workdir, eval_every: int) -> int | None:
    """Reports each new eval loss of the running trial and keeps its heartbeat; returns the
    step at which it was pruned (after stopping it), or None when it ended by itself."""
    reported = set(self.frozen(study, trial).intermediate_values)  # a retry inherits them
    beat = time.monotonic()
    while True:
      done = process.poll() is not None
      for record in read_records(workdir):
        step, value = record.get("step"), record.get(OBJECTIVE)
        if value is None or step in reported or step % eval_every:
          continue  # the final eval (off the eval_every grid) decides, it is not a report
        trial.report(value, step)
        reported.add(step)
        if not done and trial.should_prune():
          process.send_signal(signal.SIGTERM)  # checkpoints and exits like a preempted run
          process.wait()
          return step
      if done:
        return None
      if time.monotonic() - beat >= HEARTBEAT_INTERVAL:
        self.heartbeat(trial)
        beat = time.monotonic()
      time.sleep(POLL_SECONDS)

  # -- the end ---------------------------------------------------------------------------------

  def summarize(self, print_fn=print) -> None:
    """Prints the best trial; writes best_experiment.py and sweep.png."""
    optuna = _optuna()
    study = self.study()
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    counts = {s.name.lower(): sum(t.state == s for t in trials) for s in optuna.trial.TrialState
              if any(t.state == s for t in trials)}
    print_fn(f"study {self.study_name!r}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if not complete:
      print_fn("no trial completed; nothing to report")
      return
    best = study.best_trial
    number = best.user_attrs.get("directory", best.number)
    chosen = ", ".join(f"{k}={v}" for k, v in best.params.items())
    print_fn(f"best: trial {number}, {OBJECTIVE} {best.value:.4f}" + (f" ({chosen})" if chosen
                                                                       else ""))
    fields = best.user_attrs.get("fields", {})
    for name, value in sorted(fields.items()):
      print_fn(f"  config.{name} = {value}")
    path = self.directory / "best_experiment.py"
    _write_atomic(path, experiment_source(
        self.spec, fields, f"The best trial ({number}, {OBJECTIVE} {best.value:.4f}) of sweep "
        f"{self.study_name!r}: {chosen or 'no suggested params'}; its run is "
        f"{self.directory / 'trials' / str(number)}.\n\nThe fields below are those that differ "
        f"from the experiment.\n\n    bigflax train --config {path}\n", self.directory))
    print_fn(f"wrote {path} (bigflax train --config {path})")
    plot = self.directory / "sweep.png"
    write_plot(study, plot, optuna)
    print_fn(f"wrote {plot}")


def finished(trials, optuna) -> int:
  """Trials that count toward --trials: complete, pruned, or failed on their own (a trial failed
  because its worker died is re-queued and counts once, as its retry)."""
  state = optuna.trial.TrialState
  return sum(t.state in (state.COMPLETE, state.PRUNED)
             or (t.state == state.FAIL and "error" in t.user_attrs) for t in trials)


def write_plot(study, path: pathlib.Path, optuna) -> None:
  """The objective of each trial (and the best so far) beside the parameter importances."""
  import matplotlib  # noqa: PLC0415 - only the summary plots
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  state = optuna.trial.TrialState
  complete = [t for t in study.get_trials(deepcopy=False) if t.state == state.COMPLETE]
  pruned = [t for t in study.get_trials(deepcopy=False)
            if t.state == state.PRUNED and t.intermediate_values]
  figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  left.plot([t.number for t in complete], [t.value for t in complete], "o", label="complete")
  if pruned:
    left.plot([t.number for t in pruned],
              [t.intermediate_values[max(t.intermediate_values)] for t in pruned], "x",
              color="gray", label="pruned (last report)")
  best, best_so_far = float("inf"), []
  for t in complete:
    best = min(best, t.value)
    best_so_far.append(best)
  left.step([t.number for t in complete], best_so_far, where="post", label="best so far")
  left.set(xlabel="trial", ylabel=f"final {OBJECTIVE}", title="objective")
  left.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  left.legend()
  try:
    importances = optuna.importance.get_param_importances(study) if len(complete) > 1 else {}
  except (RuntimeError, ValueError):  # e.g. every trial has the same params
    importances = {}
  if importances:
    names = list(importances)[::-1]
    right.barh(names, [importances[n] for n in names])
    right.set(xlabel="importance (fANOVA)", title="parameter importances")
  else:
    right.text(0.5, 0.5, "importances need ≥ 2 complete trials\nwith varied params",
               ha="center", va="center")
    right.set_axis_off()
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)


def read_records(workdir) -> list[dict]:
  """metrics.jsonl's records while a run may be writing it: a line not yet complete is skipped."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text(encoding="utf-8").splitlines():
    with contextlib.suppress(json.JSONDecodeError):
      records.append(json.loads(line))
  return records


def _last_error(log: pathlib.Path) -> str:
  lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace")
           .replace("\r", "\n").splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith("error:")]
  return (errors or lines or ["no output"])[-1]


def _die_with_parent() -> None:
  """Runs in the trial's process before it starts: when the worker dies (even SIGKILLed), Linux
  sends the trial SIGTERM, so it checkpoints and stops instead of training on unwatched. (Some
  sandboxed kernels ignore this; the trial lock still keeps its retry from starting beside it.)"""
  if sys.platform == "linux":
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_process(settings: dict, worker: int) -> None:
  try:
    Sweep(**settings).work(worker, print_fn=lambda line: print(line, flush=True))
  except UserError as e:
    sys.exit(f"error: worker {worker}: {e}")
  except KeyboardInterrupt:
    pass


def run(sweep: Sweep, workers: int = 1, print_fn=print) -> None:
  """Joins the study with `workers` worker processes (this one included), then summarizes."""
  _optuna()
  load_space(sweep.space_path)  # a bad space file is refused before anything is written
  if "val" not in (part.strip().split("=")[0] for part in sweep.config.eval.sets.split(";")):
    raise UserError(f"the sweep minimises the final {OBJECTIVE} of the val set, which "
                    f"config.eval.sets={sweep.config.eval.sets!r} leaves out; add val to it")
  sweep.claim_directory()
  print_fn(f"sweep {sweep.study_name!r}: {sweep.trials} trials of {sweep.config.name} in "
           f"{sweep.directory} ({workers} worker{'s' * (workers > 1)} here; pruner "
           f"{sweep.pruner})")
  context = multiprocessing.get_context("spawn")  # no JAX or SQLite state shared by forking
  others = [context.Process(target=_worker_process, args=(sweep.settings(), worker), daemon=True)
            for worker in range(1, workers)]
  for process in others:
    process.start()
  try:
    sweep.work(0, print_fn)
  finally:
    for process in others:
      process.join()
  sweep.summarize(print_fn)
