"""The training core: train state, the jitted train and eval steps, and the loop that runs them."""

import functools
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax.training import train_state

from bigflax import checkpoint, data, decode, flops, hardware, optim, sharding
from bigflax.config import profile_steps, validate
from bigflax.errors import NonFiniteError
from bigflax import rundir
from bigflax.rundir import MetricsWriter
from bigflax.model import DTYPES, ModelConfig, Transformer
from bigflax.objective import next_token_loss

TrainState = train_state.TrainState


def _state_initializer(model: nn.Module, tx: optax.GradientTransformation, block_size: int):
  """rng → TrainState whose params carry their logical axis names (boxed)."""
  tokens = jnp.zeros((1, block_size), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, block_size: int,
                         mesh, rules) -> tuple[TrainState, TrainState]:
  """(shapes and dtypes of the state as ShapeDtypeStructs carrying their shardings, the
  shardings). Optimizer-state shardings follow the params they belong to. Nothing is allocated:
  this is what ahead-of-time compilation for a pod needs."""
  init = _state_initializer(model, tx, block_size)
  boxed_state = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_shardings(nn.get_partition_spec(boxed_state), mesh, rules)
  sharding.check_divisible(nn.unbox(boxed_state.params), shardings.params, mesh, "parameter")
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed_state), shardings)
  return abstract, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng, block_size: int,
                       mesh, rules) -> tuple[TrainState, TrainState]:
  """The state, created directly in its shardings (never whole on one device), and those
  shardings."""
  _, shardings = abstract_train_state(model, tx, block_size, mesh, rules)
  init = _state_initializer(model, tx, block_size)
  with sharding.activate(mesh, rules):
    state = jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=shardings)(rng)
  return state, shardings


def jit_train_step(state_shardings, batch_sharding, *, grad_accum_steps: int, schedule,
                   z_loss: float = 0.0):
  """train_step compiled with explicit in/out shardings; the old state's buffers are donated."""
  replicated = sharding.replicated(batch_sharding.mesh)
  return jax.jit(
      functools.partial(train_step, grad_accum_steps=grad_accum_steps, schedule=schedule,
                        z_loss=z_loss),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def _microbatch_grads(state: TrainState, batch, rng, z_loss: float):
  """Summed (not averaged) next-token NLL and its gradient over one (micro)batch."""
  def summed_loss(params):
    logits = state.apply_fn({"params": params}, batch["inputs"], batch.get("positions"),
                            batch.get("segment_ids"), deterministic=False, rngs={"dropout": rng})
    loss, metrics = next_token_loss(logits, batch["targets"], batch["loss_mask"], z_loss)
    return loss * metrics["num_tokens"], metrics
  (_, metrics), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
  return grads, metrics


def train_step(state: TrainState, batch, rng, *, grad_accum_steps: int, schedule,
               z_loss: float = 0.0):
  """One optimizer update on the mean next-token loss of `batch`.

  With grad_accum_steps=k the batch is cut into k microbatches run one after another (lax.scan);
  their summed gradients are divided by the total number of real tokens, so the update equals the
  one a single batch of all rows would give, at 1/k of the activation memory."""
  rng = jax.random.fold_in(rng, state.step)  # dropout differs per step, and resumes identically
  if grad_accum_steps == 1:
    grads, metrics = _microbatch_grads(state, batch, rng, z_loss)
    loss_sum, num_tokens = metrics["loss"] * metrics["num_tokens"], metrics["num_tokens"]
    correct = metrics["accuracy"] * num_tokens
  else:
    micro = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
        batch)

    def accumulate(carry, inputs):
      i, microbatch = inputs
      grads, metrics = _microbatch_grads(state, microbatch, jax.random.fold_in(rng, i), z_loss)
      g, loss_sum, correct, n = carry
      n_i = metrics["num_tokens"]
      return (jax.tree.map(jnp.add, g, grads), loss_sum + metrics["loss"] * n_i,
              correct + metrics["accuracy"] * n_i, n + n_i), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, correct, num_tokens), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro))
  denominator = jnp.maximum(num_tokens, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  metrics = {"loss": loss_sum / denominator, "accuracy": correct / denominator,
             "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
  state = state.apply_gradients(grads=grads)
  if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # config.skip_nonfinite
    metrics["skipped_updates"] = state.opt_state.total_notfinite
  return state, metrics


def eval_step(state: TrainState, batch):
  """Summed NLL and token count, so eval loss over many batches is an exact token mean."""
  logits = state.apply_fn({"params": state.params}, batch["inputs"], batch.get("positions"),
                          batch.get("segment_ids"))
  loss, metrics = next_token_loss(logits, batch["targets"], batch["loss_mask"])
  return {"loss_sum": loss * metrics["num_tokens"], "num_tokens": metrics["num_tokens"]}


class Trainer:
  """Everything one run needs, built from a validated config: mesh, data, model, jitted steps."""

  def __init__(self, config, corpus: data.Corpus | None = None, devices=None):
    validate(config)
    self.config = config
    self.corpus = corpus or data.load_corpus(config.data, config.model.block_size)
    self._data = {}
    # The config records what the data decided, so config.json alone rebuilds model and tokenizer.
    with config.unlocked():
      config.data.charset = getattr(self.corpus.tokenizer, "charset", "")
      config.model.vocab_size = (config.model.vocab_size
                                 or data.padded_vocab_size(self.corpus.tokenizer.vocab_size))
    # Fail now, not after training, if the closing sample cannot be encoded.
    self.corpus.tokenizer.encode(config.sample.prompt, "config.sample.prompt")
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules_of(config.mesh)
    self.model = Transformer(ModelConfig.from_config(config.model))
    self.schedule = optim.learning_rate_schedule(config.optimizer, config.steps)
    tx = optim.make_optimizer(config.optimizer, config.steps)
    if config.skip_nonfinite:  # a NaN/Inf gradient leaves params and optimizer state as they were
      tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    sharding.check_batch_size(config, self.batch_sharding)
    rng = jax.random.key(config.seed)
    self.state, self.state_shardings = create_train_state(
        self.model, tx, rng, config.model.block_size, self.mesh, self.rules)
    self.dropout_rng = jax.random.fold_in(rng, 1)
    replicated = sharding.replicated(self.mesh)
    self._train_step = jit_train_step(self.state_shardings, self.batch_sharding,
                                      grad_accum_steps=config.grad_accum_steps,
                                      schedule=self.schedule, z_loss=config.z_loss)
    self._eval_step = jax.jit(eval_step, in_shardings=(self.state_shardings,
                                                       self.batch_sharding),
                              out_shardings=replicated)

  def _batches(self, split: int, batch_size: int) -> data.Batches:
    """This process's rows of the global batches of `split`, built on first use."""
    key = (split, batch_size)
    if key not in self._data:
      rows = sharding.process_rows(self.batch_sharding, batch_size)
      self._data[key] = data.make_batches(self.corpus, self.config, split, batch_size, rows)
    return self._data[key]

  def batch(self, split: int, index: int, batch_size: int):
    local = self._batches(split, batch_size).batch(index)
    return sharding.global_batch(local, self.batch_sharding)

  def data_state(self) -> dict:
    """Where the train batches are (small, JSON-able): saved with a checkpoint, so a resumed run
    continues with the same batches at O(1) cost."""
    return self._batches(data.TRAIN, self.config.batch_size).get_state()

  def set_data_state(self, state: dict) -> None:
    self._batches(data.TRAIN, self.config.batch_size).set_state(state)

  def step(self, index: int):
    with sharding.activate(self.mesh, self.rules):
      self.state, metrics = self._train_step(
          self.state, self.batch(data.TRAIN, index, self.config.batch_size), self.dropout_rng)
    return metrics

  def evaluate(self) -> dict[str, float]:
    """Mean next-token loss over `eval_batches` fixed batches of val windows (same every time)."""
    totals = []
    with sharding.activate(self.mesh, self.rules):
      for i in range(self.config.eval_batches):
        totals.append(self._eval_step(self.state, self.batch(data.VAL, i,
                                                             self.config.batch_size)))
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    num_tokens = sum(float(t["num_tokens"]) for t in totals)
    eval_loss = loss_sum / num_tokens
    return {"eval_loss": eval_loss, "eval_perplexity": float(np.exp(eval_loss))}

  def sample(self, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int) -> str:
    return decode.sample_text(
        self.model, self.state.params, self.corpus.tokenizer, prompt,
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


def train(config, workdir: str, *, print_fn=print, devices=None) -> dict:
  """Trains until `config.steps`, resuming from the latest checkpoint in `workdir` if there is one.

  Evaluates every `eval_every` steps and at the end; checkpoints every `checkpoint_every` steps, at
  the end, and on SIGTERM/SIGINT (then returns early, the checkpoint written); writes config.json,
  metrics.jsonl, TensorBoard events and the final params. Returns the last eval."""
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  trainer = Trainer(config, devices=devices)
  checkpointer = checkpoint.Checkpointer(workdir, config)
  try:
    return _train_loop(trainer, checkpointer, workdir, print_fn)
  finally:
    checkpointer.close()  # a save still in flight completes, even when the loop raised


def _train_loop(trainer: Trainer, checkpointer: checkpoint.Checkpointer, workdir: str,
                print_fn) -> dict:
  config, is_main = trainer.config, jax.process_index() == 0
  latest = checkpointer.latest_step()
  if latest is not None:
    checkpointer.restore(trainer, latest)
  start = latest or 0
  if is_main:
    rundir.write_config(config, workdir)
    rundir.trim_metrics(workdir, start)
    num_params = sum(x.size for x in jax.tree.leaves(trainer.state.params))
    print_fn(f"data: {trainer.corpus.description}")
    print_fn(f"model: {num_params / 1e6:.2f}M params; mesh {dict(trainer.mesh.shape)} over "
             f"{trainer.mesh.size} {jax.devices()[0].platform} devices; workdir {workdir}")
    if latest is not None:
      print_fn(f"resuming from step {start} of {config.steps} "
               f"(checkpoint {checkpointer.step_dir(latest)})")
  writer = MetricsWriter(workdir, enabled=is_main, resumed_at=latest)
  guard = NumericsGuard(enabled=not config.skip_nonfinite)
  tokens_per_step = config.batch_size * config.model.block_size
  # MFU = achieved model FLOP/s ÷ peak of all devices (the datasheet; on a CPU, measured now).
  flops_per_step = tokens_per_step * flops.train_flops_per_token(trainer.state.params,
                                                                 config.model)
  peak = hardware.peak_flops(DTYPES[config.model.dtype])[0] * jax.process_count()
  profiler = Profiler(workdir, profile_steps(config))
  progress = tqdm.tqdm(total=config.steps, initial=start, disable=not is_main, unit="step",
                       dynamic_ncols=True)
  last_eval, preempted = {}, False
  last_time, last_step = time.perf_counter(), start
  with checkpoint.stop_signals() as stop_requested:
    for index in range(start, config.steps):
      profiler.before(index + 1)
      metrics = trainer.step(index)
      step = index + 1
      profiler.after(step, metrics)
      guard.add(step, metrics)
      preempted = stop_requested() or checkpointer.reached_preemption(step)
      final = step == config.steps
      if step % config.log_every == 0 or final:
        metrics = jax.device_get(metrics)  # with the guard's check, the step loop's only host sync
        now = time.perf_counter()
        steps_per_sec = (step - last_step) / (now - last_time)
        last_time, last_step = now, step
        tokens_per_sec = tokens_per_step * steps_per_sec
        writer.write({"step": step, **metrics, "tokens_per_sec": tokens_per_sec,
                      "mfu": flops_per_step * steps_per_sec / peak})
        progress.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}")
        guard.check()
      if step % config.eval_every == 0 or final:
        last_eval = trainer.evaluate()
        writer.write({"step": step, **last_eval})
        if is_main:
          progress.write(f"step {step}: eval_loss {last_eval['eval_loss']:.4f} "
                         f"(perplexity {last_eval['eval_perplexity']:.2f})")
        last_time = time.perf_counter()  # eval time is not training throughput
      if index == start:  # nor is compilation: throughput is timed from the first step's end
        jax.block_until_ready(metrics)
        last_time, last_step = time.perf_counter(), step
      if preempted or final or checkpointer.should_save(step):
        guard.check()
        checkpointer.save(trainer, step)
      progress.update(1)
      if preempted:
        break
  progress.close()
  profiler.stop()
  writer.close()
  if preempted:
    checkpointer.wait()
    if is_main:
      print_fn(f"stopped by a preemption signal after step {step}; checkpoint "
               f"{checkpointer.step_dir(step)} written; run the same command again to resume")
    return last_eval
  rundir.export_params(workdir, trainer.state.params)
  s = config.sample  # every process samples (params may be sharded across hosts); one prints
  text = trainer.sample(s.prompt, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                        top_k=s.top_k, top_p=s.top_p, seed=config.seed)
  if is_main:
    print_fn(f"\nsample ({s.prompt!r} →):\n{s.prompt}{text}")
  return last_eval
