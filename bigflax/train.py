"""The training loop: a Trainer (data + the run's jitted steps + the state) and `train`, which
resumes, steps, logs, evaluates, checkpoints and finishes."""

import dataclasses
import pathlib
import time

import jax
import numpy as np
import tqdm

from bigflax import (checkpoint, data, decode, evaluation, flops, hardware, pretrained, rundir,
                     run as run_lib, sharding)
from bigflax.config import profile_steps
from bigflax.errors import NonFiniteError, UserError
from bigflax.layers import DTYPES


class Trainer:
  """One run's data, compiled steps and state, built from a config (which it does not modify:
  `self.config` is the resolved copy, with what the data decided filled in)."""

  def __init__(self, config, corpus: data.Corpus | None = None, devices=None, *,
               resuming: bool = False):
    """resuming: a checkpoint of this run is about to be restored. It holds the params that
    train, so config.init_from is read again only when the others are frozen (`self.base`,
    checkpoint.frozen_base): its checkpoints leave them out."""
    self.base = checkpoint.frozen_base(config)
    if resuming and self.base and self.base["init_from"]:
      try:
        pretrained.parse(config.init_from)
      except UserError as e:
        raise checkpoint.base_unreadable("this run", self.base, e) from None
    config = pretrained.apply(config)  # config.init_from's model and tokenizer fields
    run_lib.check(config)
    self.corpus = corpus or data.load_corpus(config.data, config.model.block_size, config.task)
    self.config = run_lib.resolve(config, self.corpus.tokenizer, self.corpus.labels or None)
    # Fail now, not after training, if the closing sample cannot be encoded.
    self.corpus.tokenizer.encode(config.sample.prompt, "config.sample.prompt")
    self.run = run_lib.build(self.config, devices)
    rng = jax.random.key(self.config.seed)
    self.state = self.run.init_state(rng)
    if self.config.init_from and (self.base or not resuming):
      params = pretrained.load_params(self.config.init_from, self.run, self.state.params)
      self.state = self.state.replace(params=params)
      if not resuming:  # step 0: optimizer state for these params, not the init's
        with self.run.activate():
          opt_state = jax.jit(self.run.tx.init,
                              out_shardings=self.run.state_shardings.opt_state)(params)
        self.state = self.state.replace(opt_state=opt_state)
    self.dropout_rng = jax.random.fold_in(rng, 1)
    self._data = {}
    self._eval = None  # the eval sets' evaluation.Evaluator, built on first use

  @property
  def mesh(self):
    return self.run.mesh

  def batches(self, split: int, batch_size: int) -> data.Batches:
    """This process's rows of the global batches of `split`, built on first use."""
    key = (split, batch_size)
    if key not in self._data:
      rows = sharding.process_rows(self.run.batch_sharding, batch_size)
      self._data[key] = data.make_batches(self.corpus, self.config, split, batch_size, rows)
    return self._data[key]

  def local_batch(self, split: int, index: int, batch_size: int | None = None) -> dict:
    """This process's rows of global batch `index` of `split`, as numpy arrays."""
    return self.batches(split, batch_size or self.config.batch_size).batch(index)

  def batch(self, split: int, index: int, batch_size: int | None = None) -> dict:
    """Global batch `index` of `split`, laid out over the mesh."""
    return sharding.global_batch(self.local_batch(split, index, batch_size),
                                 self.run.batch_sharding)

  def data_state(self) -> dict:
    """Where the train batches are (small, JSON-able): saved with a checkpoint, so a resumed run
    continues with the same batches at O(1) cost."""
    return self.batches(data.TRAIN, self.config.batch_size).get_state()

  def set_data_state(self, state: dict) -> None:
    self.batches(data.TRAIN, self.config.batch_size).set_state(state)

  def state_item(self) -> dict:
    """What a checkpoint stores: the params (only those that train when the base is frozen),
    optimizer state, step and dropout key."""
    return checkpoint.state_item(self.state, self.dropout_rng, self.run.mesh, self.base)

  def save(self, checkpointer: checkpoint.Checkpointer, step: int) -> None:
    checkpointer.save(step, self.state_item(), self.data_state(), self.config.to_dict(),
                      self.base)

  def restore(self, checkpointer: checkpoint.Checkpointer, step: int) -> None:
    """Checkpoint `step`'s state (straight into this run's shardings) and data position; frozen
    params the checkpoint leaves out stay as they are (the base they were frozen at)."""
    item, data_state = checkpointer.restore(
        step, checkpoint.abstract_state_item(self.run.abstract_state, self.run.mesh, self.base),
        self.config.to_dict(), self.base)
    self.state = self.state.replace(params=checkpoint.with_frozen(item["params"],
                                                                  self.state.params),
                                    opt_state=item["opt_state"], step=item["step"])
    self.dropout_rng = jax.random.wrap_key_data(
        item["rng"], impl=jax.random.key_impl(self.dropout_rng))
    self.set_data_state(data_state)

  def step(self, index: int):
    local = self.local_batch(data.TRAIN, index)
    with self.run.activate():
      self.state, metrics = self.run.train_step(
          self.state, sharding.global_batch(local, self.run.batch_sharding), self.dropout_rng)
    if "segment_ids" in local:  # packed rows: the share of padding (this process's rows)
      metrics = {**metrics, "padding": float(np.mean(local["segment_ids"] == 0))}
    return metrics

  def evaluator(self) -> evaluation.Evaluator:
    """The eval sets of config.eval.sets (the same batches every evaluation), built on first
    use."""
    if self._eval is None:
      self._eval = evaluation.Evaluator(self.run, self.corpus.tokenizer, evaluation.open_sets(
          self.config, self.corpus.tokenizer, self.run.batch_sharding, self.corpus))
    return self._eval

  def evaluate_sets(self) -> dict[str, dict[str, float]]:
    """{eval set: its loss, perplexity, accuracy and bits per byte (and, for packed sets, how
    many documents the batches cover)} on the current params."""
    with self.run.activate():
      return self.evaluator().evaluate(lambda batch: self.run.eval_step(self.state, batch))

  def evaluate(self) -> dict[str, float]:
    """evaluate_sets' numbers as one metrics record's fields (evaluation.EvalSet.key): eval_loss,
    … for the val split, eval/NAME/loss, … for the others."""
    return self.evaluator().record(self.evaluate_sets())

  def harness(self) -> dict[str, float]:
    """config.eval.harness_tasks through lm-evaluation-harness on the current params, as
    harness/TASK/METRIC fields."""
    return evaluation.harness_record(evaluation.run_harness(
        self.run, self.state.params, self.corpus.tokenizer, self.config.eval,
        batch_size=self.config.batch_size))

  def sample(self, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int) -> str:
    return decode.sample_text(
        self.run.model, self.state.params, self.corpus.tokenizer, prompt,
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        seed=seed)


class NumericsGuard:
  """Finds the first step whose loss or gradient norm is NaN/Inf without a host sync per step: the
  steps' scalar metrics stay on device until the loop syncs anyway (to log or checkpoint)."""

  def __init__(self, enabled: bool):
    self.enabled = enabled
    self._pending = []

  def add(self, step: int, metrics) -> None:
    if self.enabled:
      self._pending.append((step, metrics["loss"], metrics["grad_norm"]))

  def check(self) -> None:
    pending, self._pending = jax.device_get(self._pending), []
    for step, loss, grad_norm in pending:
      if not (np.isfinite(loss) and np.isfinite(grad_norm)):
        raise NonFiniteError(
            f"step {step}: loss {loss}, grad_norm {grad_norm}; training stopped and the state "
            f"was not checkpointed; {NonFiniteError.FIX}")


class Profiler:
  """A jax.profiler trace of train steps first..last (1-based) into WORKDIR/profile/."""

  def __init__(self, workdir: str, steps: tuple[int, int] | None):
    self.directory = str(pathlib.Path(workdir) / "profile")
    self.steps, self.active = steps, False

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0]:
      jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, metrics) -> None:
    if self.active and step == self.steps[1]:
      jax.block_until_ready(metrics)  # the trace must hold the steps' device work, not dispatch
      self.stop()

  def stop(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


class Throughput:
  """Steps per second of training alone: timed from the end of the first step (compilation is
  not training) and paused over evaluations."""

  def __init__(self):
    self._since = self._step = None

  def started(self, step: int, metrics) -> None:
    """Called after the run's first step: the clock starts once its work is done."""
    jax.block_until_ready(metrics)
    self._since, self._step = time.perf_counter(), step

  def restart(self) -> None:
    """Forget the time since the last mark (an evaluation ran), keeping the step count."""
    if self._since is not None:
      self._since = time.perf_counter()

  def steps_per_sec(self, step: int) -> float | None:
    """Since the last call (None before any step was timed); the caller has synced."""
    if self._since is None or step == self._step:
      return None
    now = time.perf_counter()
    rate = (step - self._step) / (now - self._since)
    self._since, self._step = now, step
    return rate


@dataclasses.dataclass
class _Loop:
  """What the loop's periodic work needs besides the trainer."""
  trainer: Trainer
  checkpointer: checkpoint.Checkpointer
  workdir: str
  writer: rundir.MetricsWriter
  progress: tqdm.tqdm
  is_main: bool
  guard: NumericsGuard
  throughput: Throughput
  flops_per_step: float
  peak_flops: float
  last_eval: dict = dataclasses.field(default_factory=dict)

  def log(self, step: int, metrics) -> None:
    metrics = jax.device_get(metrics)  # with the guard's check, the step loop's only host sync
    record = {"step": step, **metrics}
    steps_per_sec = self.throughput.steps_per_sec(step)
    if steps_per_sec is not None:
      tokens_per_step = self.trainer.config.batch_size * self.trainer.config.model.block_size
      record["tokens_per_sec"] = tokens_per_step * steps_per_sec
      record["mfu"] = self.flops_per_step * steps_per_sec / self.peak_flops
      self.progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                tok_s=f"{record['tokens_per_sec']:,.0f}")
    else:
      self.progress.set_postfix(loss=f"{metrics['loss']:.4f}")
    self.writer.write(record)
    self.guard.check()

  def evaluate(self, step: int) -> None:
    results = self.trainer.evaluate_sets()
    self.last_eval = self.trainer.evaluator().record(results)
    self._write(step, self.last_eval, f"step {step}: {evaluation.progress_line(results)}")

  def harness(self, step: int) -> None:
    """lm-evaluation-harness tasks on every process (the params may be sharded over hosts);
    process 0 writes the results."""
    record = self.trainer.harness()
    self._write(step, record, f"step {step}: " + ", ".join(
        f"{key.removeprefix('harness/')} {value:.4f}" for key, value in record.items()
        if isinstance(value, float)))

  def _write(self, step: int, record: dict, line: str) -> None:
    if record:
      self.writer.write({"step": step, **record})
      if self.is_main:
        self.progress.write(line)
    self.throughput.restart()  # eval time is not training throughput

  def save(self, step: int) -> None:
    self.guard.check()
    self.trainer.save(self.checkpointer, step)


def train(config, workdir: str, *, print_fn=print, devices=None, overwrite: bool = False) -> dict:
  """Trains until `config.steps`, resuming from the latest checkpoint in `workdir` if there is one.

  Evaluates every `eval_every` steps and at the end; checkpoints every `checkpoint_every` steps, at
  the end, and on SIGTERM/SIGINT (then returns early, the checkpoint written); writes config.json,
  metrics.jsonl, TensorBoard events and the final params. Returns the last eval. A workdir holding
  a finished model and no checkpoint is refused unless `overwrite`."""
  if jax.process_index() == 0:
    rundir.prepare_for_training(workdir, overwrite)
  else:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  resuming = bool(pretrained.checkpoint_steps(pathlib.Path(workdir)))
  trainer = Trainer(config, devices=devices, resuming=resuming)
  checkpointer = checkpoint.Checkpointer(workdir, trainer.config)
  loop = None
  try:
    start = _resume(trainer, checkpointer, workdir, print_fn)
    loop = _start_loop(trainer, checkpointer, workdir, start)
    stopped_at = _run_steps(loop, start)
    return _finish(loop, stopped_at, print_fn)
  finally:
    if loop is not None:  # an error message then starts on its own line, below the bar
      loop.progress.close()
    checkpointer.close()  # a save still in flight completes, even when the loop raised


def _resume(trainer: Trainer, checkpointer: checkpoint.Checkpointer, workdir: str,
            print_fn) -> int:
  """Loads the latest checkpoint (if any), writes config.json, drops metrics past the checkpoint;
  returns the step to start from."""
  latest = checkpointer.latest_step()
  if latest is not None:
    trainer.restore(checkpointer, latest)
  start = latest or 0
  eval_sets = trainer.evaluator().sets  # every process: a bad eval set stops the run now
  if trainer.config.eval.harness_tasks:
    evaluation.check_harness(trainer.config.eval)
  if jax.process_index() == 0:
    rundir.write_config(trainer.config, workdir)
    rundir.trim_metrics(workdir, start)
    num_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    print_fn(f"data: {trainer.corpus.description}")
    batches = trainer.batches(data.TRAIN, trainer.config.batch_size)
    print_fn(f"batches: {batches.description}")
    for eval_set in eval_sets:
      print_fn(f"eval {eval_set.name}: {eval_set.description}")
    notices = [n for s in eval_sets if s.info for n in s.info.notices]
    for notice in batches.notices + notices:
      print_fn(f"note: {notice}")
    print_fn(f"model: {num_params / 1e6:.2f}M params; mesh {dict(trainer.mesh.shape)} over "
             f"{trainer.mesh.size} {jax.devices()[0].platform} devices; workdir {workdir}")
    if latest is not None:
      print_fn(f"resuming from step {start} of {trainer.config.steps} "
               f"(checkpoint {checkpointer.step_dir(latest)})")
  return start


def _start_loop(trainer: Trainer, checkpointer, workdir: str, start: int) -> _Loop:
  config, is_main = trainer.config, jax.process_index() == 0
  # MFU = achieved model FLOP/s ÷ peak of all devices (the datasheet; on a CPU, measured now).
  flops_per_step = (config.batch_size * config.model.block_size
                    * flops.train_flops_per_token(trainer.state.params, config.model))
  peak = hardware.peak_flops(DTYPES[config.model.dtype])[0] * jax.process_count()
  return _Loop(
      trainer, checkpointer, workdir,
      rundir.MetricsWriter(workdir, enabled=is_main, resumed_at=start or None, config=config),
      tqdm.tqdm(total=config.steps, initial=start, disable=not is_main, unit="step",
                dynamic_ncols=True),
      is_main, NumericsGuard(enabled=not config.skip_nonfinite), Throughput(), flops_per_step,
      peak)


def _run_steps(loop: _Loop, start: int) -> int | None:
  """Steps from `start` to config.steps with the periodic log, eval and checkpoint; returns the
  step a stop signal (or the preemption service) ended the run at, or None when it completed."""
  trainer, config = loop.trainer, loop.trainer.config
  profiler = Profiler(loop.workdir, profile_steps(config))
  with checkpoint.stop_signals() as stop_requested:
    for index in range(start, config.steps):
      step = index + 1
      profiler.before(step)
      metrics = trainer.step(index)
      profiler.after(step, metrics)
      loop.guard.add(step, metrics)
      if index == start:
        loop.throughput.started(step, metrics)
      preempted = stop_requested() or loop.checkpointer.reached_preemption(step)
      final = step == config.steps
      if step % config.log_every == 0 or final:
        loop.log(step, metrics)
      if step % config.eval_every == 0 or final:
        loop.evaluate(step)
      if config.eval.harness_tasks and (
          step % (config.eval.harness_every or config.eval_every) == 0 or final):
        loop.harness(step)
      if preempted or final or loop.checkpointer.should_save(step):
        loop.save(step)
      loop.progress.update(1)
      if preempted:
        profiler.stop()
        return step
  profiler.stop()
  return None


def _finish(loop: _Loop, stopped_at: int | None, print_fn) -> dict:
  """Closes the writers; a completed run exports its params and prints a sample."""
  loop.progress.close()
  loop.writer.close()
  trainer = loop.trainer
  if stopped_at is not None:
    loop.checkpointer.wait()
    if loop.is_main:
      print_fn(f"stopped by a preemption signal after step {stopped_at}; checkpoint "
               f"{loop.checkpointer.step_dir(stopped_at)} written; run the same command again "
               "to resume")
    return loop.last_eval
  rundir.export_params(loop.workdir, trainer.state.params)
  if not trainer.run.model.cfg.generates:  # a classifier or a bidirectional encoder
    return loop.last_eval
  s = trainer.config.sample  # every process samples (params may be sharded across hosts); one prints
  text = trainer.sample(s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, seed=trainer.config.seed)
  if loop.is_main:
    print_fn(f"\nsample ({s.prompt!r} →):\n{s.prompt}{text}")
  return loop.last_eval
