"""One run, built from a config: mesh, rules, model, optimizer, state and batch shardings, and the
jitted train and eval steps.

The Trainer, `bigflax aot`, tools/bench.py and the tests all build their steps here, so the step
compiled for a TPU slice ahead of time is the step that trains.
"""

import copy
import dataclasses
import functools
import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding

from bigflax import config as config_lib, data, model as model_lib, objective, optim, sharding
from bigflax.config import ModelConfig
from bigflax.errors import ConfigError

TrainState = train_state.TrainState

# The fields of a train batch by config.data.batching (bigflax.data makes them): packed rows also
# say where each document starts (segment ids) and its positions; a window is one document. A
# classify batch holds one example per row, right-padded (segment id 0), and its label.
BATCH_FIELDS = {
    "packed": {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
               "segment_ids": jnp.int32, "positions": jnp.int32},
    "windows": {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32},
    "classify": {"inputs": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32,
                 "labels": jnp.int32},
}
ROW_FIELDS = ("labels",)  # one value per row ([batch]; −1 = a padding row), not per token

# XLA:CPU hands dots, reductions and elementwise ops to YNNPACK by default (jaxlib 0.10); its own
# Eigen and loop emitters run the train step faster here: tools/bench.py --against torch at the
# Shakespeare CPU shape 0.84-0.88x of PyTorch with YNNPACK, 0.90-0.93x without (three interleaved
# rounds each); the baby shape's step 11.7 s -> 10.2 s. Older jaxlibs may not know the option.
CPU_COMPILER_OPTIONS = ({"xla_cpu_experimental_ynn_fusion_type": ""}
                        if jax.__version_info__ >= (0, 10) else {})

# The key every evaluation masks its MLM tokens with: the same masks each time, so evals compare.
EVAL_MASKING_KEY = 0
# fold_in constant giving an objective's own random stream beside the step's dropout key.
OBJECTIVE_STREAM = 0x6F626A


def _lm_loss(logits_fn, batch, rng, config):
  loss, m = objective.OBJECTIVES[config.objective].loss(logits_fn, batch, rng, config)
  return loss, {"loss": m["loss"], "accuracy": m["accuracy"], "count": m["num_tokens"]}


def _lm_eval(logits_fn, batch, config):
  _, m = objective.OBJECTIVES[config.objective].loss(
      logits_fn, batch, jax.random.key(EVAL_MASKING_KEY), config)
  n = m["num_tokens"]
  return {"loss_sum": m["loss"] * n, "correct": m["accuracy"] * n, "num_tokens": n}


def _lm_summary(totals) -> dict[str, float]:
  loss = float(totals["loss_sum"]) / max(float(totals["num_tokens"]), 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "accuracy": float(totals["correct"]) / max(float(totals["num_tokens"]), 1.0)}


def _classify_loss(logits_fn, batch, rng, config):
  del rng, config
  loss, m = objective.classification_loss(logits_fn(batch["inputs"]), batch["labels"])
  return loss, {"loss": m["loss"], "accuracy": m["accuracy"], "count": m["num_examples"]}


def _classify_eval(logits_fn, batch, config):
  del config
  _, m = objective.classification_loss(logits_fn(batch["inputs"]), batch["labels"])
  return {"loss_sum": m["loss"] * m["num_examples"], "num_examples": m["num_examples"],
          "confusion": m["confusion"]}


def _classify_summary(totals) -> dict[str, float]:
  """Accuracy and macro-F1 (the mean over labels of 2TP / (2TP + FP + FN), over the labels that
  occur as truth or prediction, as scikit-learn's f1_score(average="macro"))."""
  confusion = np.asarray(totals["confusion"], np.float64)
  n = max(float(totals["num_examples"]), 1.0)
  tp = np.diag(confusion)
  truth, predicted = confusion.sum(1), confusion.sum(0)
  seen = (truth + predicted) > 0
  f1 = 2 * tp[seen] / (truth[seen] + predicted[seen])
  return {"loss": float(totals["loss_sum"]) / n, "accuracy": float(tp.sum()) / n,
          "macro_f1": float(f1.mean()) if seen.any() else 0.0}


@dataclasses.dataclass(frozen=True)
class Task:
  """What config.task trains: its batch fields, its loss (mean, with metrics loss, accuracy and
  the count they average over), its summed eval outputs and the metrics they give."""
  batch_fields: typing.Callable  # config → {field: dtype}
  loss: typing.Callable  # (logits_fn, batch, rng, config) → (loss, metrics)
  eval_sums: typing.Callable  # (logits_fn, batch, config) → summable outputs
  eval_keys: frozenset  # the keys of eval_sums' outputs: say which task summed them
  summary: typing.Callable  # summed eval outputs → metrics


TASKS = {
    "lm": Task(lambda c: BATCH_FIELDS[c.data.batching], _lm_loss, _lm_eval,
               frozenset({"loss_sum", "correct", "num_tokens"}), _lm_summary),
    "classify": Task(lambda c: BATCH_FIELDS["classify"], _classify_loss, _classify_eval,
                     frozenset({"loss_sum", "num_examples", "confusion"}), _classify_summary),
}


def check(config) -> None:
  """Every section checked by the module that reads it; ConfigError names the first bad field."""
  config_lib.validate(config)
  model_config = ModelConfig.from_config(config.model, config.finetune)
  model_lib.check_options(model_config)
  if config.task not in TASKS:
    raise ConfigError(f"config.task={config.task!r} is unknown; choose one of {sorted(TASKS)}")
  if config.task == "lm" and config.model.num_labels:
    raise ConfigError(f"config.model.num_labels={config.model.num_labels} puts a classifier in "
                      "place of the LM head; set config.task=classify, or num_labels=0")
  objective.check_config(config)
  optim.check_trainable(config.finetune, config.task)
  data.check_config(config.data)
  optim.check_config(config.optimizer)
  optim.check_schedule(config.optimizer, config.steps)
  sharding.rules_of(config.mesh)


def resolve(config, tokenizer, labels=None):
  """A copy of `config` with what the data decides filled in (the char tokenizer's charset, the
  vocabulary size rounded up to whole TPU lanes, an MLM's [MASK] id past the tokenizer's, a
  classifier's labels and their number, what trains): what config.json records, so it alone
  rebuilds model and tokenizer. `labels`: the classification data's (train split), if any. The
  caller's config is left as it was."""
  resolved = copy.deepcopy(config)
  needed = tokenizer.vocab_size
  with resolved.unlocked():
    resolved.data.charset = getattr(tokenizer, "charset", "")
    if resolved.task == "lm" and resolved.objective == "mlm":
      resolved.mlm.mask_token_id = tokenizer.vocab_size  # reserved in the padded vocabulary
      needed += 1
    if not resolved.model.vocab_size:
      resolved.model.vocab_size = data.padded_vocab_size(needed)
    if labels is not None:
      resolved.data.labels = tuple(labels)
    if resolved.task == "classify":
      known = tuple(resolved.data.get("labels", ()))
      if not known:
        raise ConfigError("config.task='classify' found no labels in the train split; give "
                          "classification data whose examples carry a label")
      resolved.model.num_labels = resolved.model.num_labels or len(known)
      if resolved.model.num_labels != len(known):
        raise ConfigError(f"config.model.num_labels={resolved.model.num_labels} but the train "
                          f"split has {len(known)} labels; set it to 0 (the data's)")
    resolved.finetune.trainable = optim.trainable_of(resolved.finetune)
  if resolved.model.vocab_size < needed:
    mask = " plus the [MASK] id config.objective='mlm' reserves" if needed > tokenizer.vocab_size \
        else ""
    raise ConfigError(f"config.model.vocab_size={resolved.model.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} ids{mask}; raise it or set it to 0 "
                      "(the tokenizer's, rounded up to a multiple of 128)")
  return resolved


def _logits_fn(state: TrainState, params, batch, **kwargs):
  """inputs → the model's outputs on them, at the batch's positions and segments (keywords: the
  model's, e.g. hidden=True)."""
  return lambda inputs, **more: state.apply_fn({"params": params}, inputs, batch.get("positions"),
                                               batch.get("segment_ids"), **kwargs, **more)


def _microbatch_grads(state: TrainState, batch, rng, task: Task, config, trainable):
  """Summed (not averaged) loss and its gradient over one (micro)batch; frozen params (False in
  `trainable`) get none, so their backward matmuls are never computed."""
  def summed_loss(params):
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    logits_fn = _logits_fn(state, params, batch, deterministic=False, rngs={"dropout": rng})
    loss, metrics = task.loss(logits_fn, batch, jax.random.fold_in(rng, OBJECTIVE_STREAM),
                              config)
    return loss * metrics["count"], metrics
  (_, metrics), grads = jax.value_and_grad(summed_loss, has_aux=True)(state.params)
  return grads, metrics


def train_step(state: TrainState, batch, rng, *, grad_accum_steps: int, schedule, config,
               trainable):
  """One optimizer update on the mean loss of config.task over `batch` (per token for a language
  model, per example for a classifier).

  With grad_accum_steps=k the batch is cut into k microbatches run one after another (lax.scan);
  their summed gradients are divided by the total count (tokens or examples), so the update
  equals the one a single batch of all rows would give, at 1/k of the activation memory."""
  task = TASKS[config.task]
  rng = jax.random.fold_in(rng, state.step)  # dropout differs per step, and resumes identically
  if grad_accum_steps == 1:
    grads, metrics = _microbatch_grads(state, batch, rng, task, config, trainable)
    loss_sum, count = metrics["loss"] * metrics["count"], metrics["count"]
    correct = metrics["accuracy"] * count
  else:
    micro = jax.tree.map(
        lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
        batch)

    def accumulate(carry, inputs):
      i, microbatch = inputs
      grads, metrics = _microbatch_grads(state, microbatch, jax.random.fold_in(rng, i), task,
                                         config, trainable)
      g, loss_sum, correct, n = carry
      n_i = metrics["count"]
      return (jax.tree.map(jnp.add, g, grads), loss_sum + metrics["loss"] * n_i,
              correct + metrics["accuracy"] * n_i, n + n_i), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (grads, loss_sum, correct, count), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0, 0.0), (jnp.arange(grad_accum_steps), micro))
  denominator = jnp.maximum(count, 1.0)
  grads = jax.tree.map(lambda g: g / denominator, grads)
  metrics = {"loss": loss_sum / denominator, "accuracy": correct / denominator,
             "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state.step)}
  state = state.apply_gradients(grads=grads)
  if isinstance(state.opt_state, optax.ApplyIfFiniteState):  # config.skip_nonfinite
    metrics["skipped_updates"] = state.opt_state.total_notfinite
  return state, metrics


def eval_step(state: TrainState, batch, *, config):
  """config.task's summed eval outputs (a language model: NLL, correct predictions and tokens; a
  classifier: NLL, examples and the confusion matrix), so metrics over many batches are exact."""
  task = TASKS[config.task]
  return task.eval_sums(_logits_fn(state, state.params, batch), batch, config)


def eval_summary(totals: dict) -> dict[str, float]:
  """eval_step's outputs summed over an eval's batches → its metrics (a language model: token
  means and perplexity; a classifier: loss, accuracy, macro_f1). The outputs' keys say which
  task made them."""
  task = next(t for t in TASKS.values() if t.eval_keys <= totals.keys())
  return task.summary(totals)


def make_optimizer(config) -> optax.GradientTransformation:
  tx = optim.make_optimizer(config.optimizer, config.steps,
                            ModelConfig.from_config(config.model, config.finetune))
  trainable = optim.trainable_of(config.finetune)
  if trainable != "all":  # frozen params: no update and no optimizer state
    tx = optim.freeze(tx, trainable)
  if config.skip_nonfinite:  # a NaN/Inf gradient leaves params and optimizer state as they were
    tx = optax.apply_if_finite(tx, max_consecutive_errors=np.iinfo(np.int32).max)
  return tx


@dataclasses.dataclass(frozen=True)
class Run:
  """What one config compiles to on one mesh. `abstract_state` holds the state's shapes and dtypes
  as ShapeDtypeStructs carrying their shardings: enough to compile without allocating."""
  config: object
  mesh: Mesh
  rules: tuple
  model: model_lib.Transformer
  tx: optax.GradientTransformation
  abstract_state: TrainState
  state_shardings: TrainState
  batch_sharding: NamedSharding
  train_step: object  # jitted (state, batch, rng) → (state, metrics); donates the state
  eval_step: object  # jitted (state, batch) → summed metrics

  def batch_spec(self, batch_size: int | None = None) -> dict:
    return batch_spec(self.config, self.batch_sharding, batch_size)

  def rng_spec(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                sharding=sharding.replicated(self.mesh))

  def activate(self):
    """The context in which the steps are traced and run (mesh and logical rules)."""
    return sharding.activate(self.mesh, self.rules)

  def init_state(self, rng) -> TrainState:
    """The state, created directly in its shardings (never whole on one device)."""
    init = _state_initializer(self.model, self.tx, self.config.model.block_size)
    with self.activate():
      return jax.jit(lambda rng: nn.unbox(init(rng)), out_shardings=self.state_shardings)(rng)

  def lower_train_step(self):
    """The train step lowered for the abstract state and batch: what AOT compilation reads."""
    with self.activate():
      return self.train_step.lower(self.abstract_state, self.batch_spec(), self.rng_spec())


def batch_spec(config, batch_sharding: NamedSharding, batch_size: int | None = None) -> dict:
  """The batch of config.task as ShapeDtypeStructs: [batch, block_size] fields, and [batch] for
  the per-row ones (labels), each sharded on the batch axes."""
  rows = batch_size or config.batch_size
  return {name: jax.ShapeDtypeStruct(
              (rows,) if name in ROW_FIELDS else (rows, config.model.block_size), dtype,
              sharding=sharding.field_sharding(batch_sharding, 1 if name in ROW_FIELDS else 2))
          for name, dtype in TASKS[config.task].batch_fields(config).items()}


def _state_initializer(model: nn.Module, tx: optax.GradientTransformation, block_size: int):
  """rng → TrainState whose params carry their logical axis names (boxed)."""
  tokens = jnp.zeros((1, block_size), jnp.int32)

  def init(rng):
    params = model.init(rng, tokens)["params"]
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  return init


def build(config, devices=None) -> Run:
  """The run of a checked, resolved config (model.vocab_size set) on `devices` (default: all).
  Optimizer-state shardings follow the params they belong to."""
  if not config.model.vocab_size:
    raise ConfigError("config.model.vocab_size is 0: resolve it from the tokenizer first "
                      "(bigflax.run.resolve), or set --config.model.vocab_size when no data is "
                      "read (bigflax aot)")
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.rules_of(config.mesh)
  model = model_lib.Transformer(ModelConfig.from_config(config.model, config.finetune))
  tx = make_optimizer(config)
  boxed = jax.eval_shape(_state_initializer(model, tx, config.model.block_size),
                         jax.random.key(0))
  state_shardings = sharding.logical_shardings(nn.get_partition_spec(boxed), mesh, rules)
  sharding.check_divisible(nn.unbox(boxed.params), state_shardings.params, mesh, "parameter")
  # weak_type too: the step counter is a weakly typed int, and a strongly typed stand-in would
  # compile a slightly different program (extra converts) from the one that trains.
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s, weak_type=x.weak_type),
      nn.unbox(boxed), state_shardings)
  batch_sharding = sharding.batch_sharding(mesh, rules)
  sharding.check_batch_size(config, batch_sharding)
  replicated = sharding.replicated(mesh)
  schedule = optim.learning_rate_schedule(config.optimizer, config.steps)
  batch_shardings = {name: spec.sharding
                     for name, spec in batch_spec(config, batch_sharding).items()}
  trainable = optim.trainable_mask(abstract_state.params, optim.trainable_of(config.finetune))
  options = CPU_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None
  step = jax.jit(
      functools.partial(train_step, grad_accum_steps=config.grad_accum_steps, schedule=schedule,
                        config=config, trainable=trainable),
      in_shardings=(state_shardings, batch_shardings, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,), compiler_options=options)
  evaluate = jax.jit(functools.partial(eval_step, config=config),
                     in_shardings=(state_shardings, batch_shardings), out_shardings=replicated,
                     compiler_options=options)
  return Run(config, mesh, rules, model, tx, abstract_state, state_shardings, batch_sharding,
             step, evaluate)
