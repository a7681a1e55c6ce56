"""One run, built from a config: mesh, rules, model, optimizer, state and batch shardings, and the
jitted train and eval steps.

The Trainer, `bigflax aot`, tools/bench.py and the tests all build their steps here, so the step
compiled for a TPU slice ahead of time is the step that trains.
"""

import copy
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding

from bigflax import config as config_lib, data, model as model_lib, optim, sharding
from bigflax.config import ModelConfig
from bigflax.errors import ConfigError
from bigflax.objective import next_token_loss

TrainState = train_state.TrainState

# The fields of a train batch by config.data.batching (bigflax.data makes them): packed rows also
# say where each document starts (segment ids) and its positions; a window is one document.
BATCH_FIELDS = {
    "packed": {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32,
               "segment_ids": jnp.int32, "positions": jnp.int32},
    "windows": {"inputs": jnp.int32, "targets": jnp.int32, "loss_mask": jnp.float32},
}


def check(config) -> None:
  """Every section checked by the module that reads it; ConfigError names the first bad field."""
  config_lib.validate(config)
  model_lib.check_options(ModelConfig.from_config(config.model))
  data.check_config(config.data)
  optim.check_config(config.optimizer)
  optim.check_schedule(config.optimizer, config.steps)
  sharding.rules_of(config.mesh)


def resolve(config, tokenizer):
  """A copy of `config` with what the data decides filled in (the char tokenizer's charset, the
  vocabulary size rounded up to whole TPU lanes): what config.json records, so it alone rebuilds
  model and tokenizer. The caller's config is left as it was."""
  resolved = copy.deepcopy(config)
  with resolved.unlocked():
    resolved.data.charset = getattr(tokenizer, "charset", "")
    if not resolved.model.vocab_size:
      resolved.model.vocab_size = data.padded_vocab_size(tokenizer.vocab_size)
  if resolved.model.vocab_size < tokenizer.vocab_size:
    raise ConfigError(f"config.model.vocab_size={resolved.model.vocab_size} is smaller than the "
                      f"tokenizer's {tokenizer.vocab_size} ids; raise it or set it to 0 (the "
                      "tokenizer's, rounded up to a multiple of 128)")
  return resolved


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
  """Summed NLL, correct predictions and token count, so metrics over many batches are exact
  token means."""
  logits = state.apply_fn({"params": state.params}, batch["inputs"], batch.get("positions"),
                          batch.get("segment_ids"))
  loss, metrics = next_token_loss(logits, batch["targets"], batch["loss_mask"])
  n = metrics["num_tokens"]
  return {"loss_sum": loss * n, "correct": metrics["accuracy"] * n, "num_tokens": n}


def eval_summary(totals: dict) -> dict[str, float]:
  """eval_step's outputs summed over an eval's batches → its metrics (token means)."""
  loss = float(totals["loss_sum"]) / max(float(totals["num_tokens"]), 1.0)
  return {"loss": loss, "perplexity": float(np.exp(loss)),
          "accuracy": float(totals["correct"]) / max(float(totals["num_tokens"]), 1.0)}


def make_optimizer(config) -> optax.GradientTransformation:
  tx = optim.make_optimizer(config.optimizer, config.steps)
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
    shape = (batch_size or self.config.batch_size, self.config.model.block_size)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
            for name, dtype in BATCH_FIELDS[self.config.data.batching].items()}

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
  model = model_lib.Transformer(ModelConfig.from_config(config.model))
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
  step = jax.jit(
      functools.partial(train_step, grad_accum_steps=config.grad_accum_steps, schedule=schedule,
                        z_loss=config.z_loss),
      in_shardings=(state_shardings, batch_sharding, replicated),
      out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  evaluate = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                     out_shardings=replicated)
  return Run(config, mesh, rules, model, tx, abstract_state, state_shardings, batch_sharding,
             step, evaluate)
