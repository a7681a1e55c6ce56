"""optax optimizers and learning-rate schedules, chosen by name from `config.optimizer`."""

import jax
import optax

from bigflax.config import ModelConfig, require
from bigflax.errors import ConfigError


def _cosine(c, steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      decay_steps=c.decay_steps or steps, end_value=c.end_learning_rate)


def _exponential(c, steps):
  del steps
  return optax.warmup_exponential_decay_schedule(
      init_value=0.0, peak_value=c.learning_rate, warmup_steps=c.warmup_steps,
      transition_steps=c.decay_transition_steps, decay_rate=c.decay_rate,
      end_value=c.end_learning_rate)


def _constant(c, steps):
  del steps
  return optax.join_schedules(
      [optax.linear_schedule(0.0, c.learning_rate, c.warmup_steps),
       optax.constant_schedule(c.learning_rate)], [c.warmup_steps])


SCHEDULES = {"cosine": _cosine, "exponential": _exponential, "constant": _constant}


def decay_mask(params, exclude):
  """True for the parameters weight decay applies to: every leaf whose name is not in `exclude`.

  The defaults exclude norm scales, biases and embeddings: decaying them toward zero fights the
  normalisation and shrinks rare tokens' embeddings, with no regularising benefit.
  """
  def name(path):  # the last dict key: boxed (logically partitioned) leaves end in `.value`
    return [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
  return jax.tree_util.tree_map_with_path(lambda path, _: name(path) not in exclude, params)


def _adamw(c, lr):
  return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                     mask=lambda p: decay_mask(p, tuple(c.weight_decay_exclude)))


def _adam(c, lr):
  return optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps)


def _sgd(c, lr):
  return optax.sgd(lr, momentum=c.momentum or None, nesterov=c.nesterov)


# Muon's matrices: kernels of these modules, by their axes (optax.contrib.MuonDimensionNumbers).
# Negative axes, so a scanned stack's leading `layers` axis is a batch axis: one
# orthogonalisation per layer. Attention's [embed, heads, head_dim] and [heads, head_dim, embed]
# kernels are the matrices [embed, heads·head_dim] and [heads·head_dim, embed].
_MUON_AXES = {"query": (-3, (-2, -1)), "key": (-3, (-2, -1)), "value": (-3, (-2, -1)),
              "out": ((-3, -2), -1)}
_MUON_DEFAULT_AXES = (-2, -1)  # MLP up/gate/down and any other [in, out] kernel
# The output layers map the residual stream onto a fixed number of outputs (vocabulary, labels).
_OUTPUT_LAYERS = ("lm_head", "classifier")


def is_hidden_matrix(names: tuple[str, ...]) -> bool:
  """Whether the param at a path (its module and param names) is a hidden weight matrix: a
  projection kernel outside the output layers, whose fan-in and fan-out both grow with the
  model's width. Embeddings, norms, biases, LoRA adapters and the output layers are not; Muon
  orthogonalises the hidden matrices and μP scales their learning rates.

  By names, not shapes or logical axes: a scanned stack adds a leading axis, and the optimizer
  sees unboxed params (no logical axes) in every update and when re-initialised for init_from."""
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] not in _OUTPUT_LAYERS


def muon_dimension_numbers(params):
  """For each leaf: its optax.contrib.MuonDimensionNumbers when Muon orthogonalises it (a ≥2-D
  hidden weight matrix), else None (AdamW)."""
  def spec(path, leaf):
    names = _names(path)
    if not is_hidden_matrix(names):
      return None
    reduction, output = _MUON_AXES.get(names[-2], _MUON_DEFAULT_AXES)
    rank = len(leaf.shape)
    axes = [a for group in (reduction, output) for a in (group if isinstance(group, tuple)
                                                          else (group,))]
    if rank < max(2, len(axes)):
      return None
    return optax.contrib.MuonDimensionNumbers(reduction_axis=reduction, output_axis=output)
  return jax.tree_util.tree_map_with_path(spec, params)


def _muon(c, lr):
  """Muon (optax.contrib.muon: momentum orthogonalised by Newton-Schulz) on the hidden weight
  matrices, AdamW as configured on everything else. Muon's peak rate is muon_learning_rate, on
  the same schedule; its decoupled weight decay shrinks the matrices by as much per step as
  AdamW would (weight_decay × learning_rate)."""
  ratio = c.muon_learning_rate / c.learning_rate

  def labels(params):
    specs = muon_dimension_numbers(params)
    is_spec = lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers)
    if not any(s is not None for s in jax.tree.leaves(specs, is_leaf=is_spec)):
      raise ConfigError("config.optimizer.name='muon' found no weight matrices (≥2-D kernels "
                        "outside the output layer) to orthogonalise; use "
                        "config.optimizer.name='adamw'")
    return jax.tree.map(lambda s: "adamw" if s is None else "muon", specs, is_leaf=is_spec)

  muon = optax.contrib.muon(
      lambda step: lr(step) * ratio, beta=c.muon_momentum,
      weight_decay=c.weight_decay * c.learning_rate / c.muon_learning_rate,
      weight_decay_mask=lambda p: decay_mask(p, tuple(c.weight_decay_exclude)),
      muon_weight_dimension_numbers=muon_dimension_numbers)
  tx = optax.multi_transform({"muon": muon, "adamw": _adamw(c, lr)}, labels)
  return optax.GradientTransformation(lambda params: _drop_empty_boxes(tx.init(params)),
                                      tx.update)


def _drop_empty_boxes(state):
  """Each partition's state holds an empty optax MaskedNode for the other partition's leaves: from
  boxed params, a MaskedNode inside a flax box, which would get a sharding of its own. Unboxed:
  the same tree as the unboxed state, with no leaf there to shard."""
  from flax.core import meta  # flax boxes the params; only their state needs it
  return jax.tree.map(
      lambda x: x.value if isinstance(x, meta.Partitioned) and not jax.tree.leaves(x.value)
      else x, state, is_leaf=lambda x: isinstance(x, meta.Partitioned))


OPTIMIZERS = {"adamw": _adamw, "adam": _adam, "sgd": _sgd, "muon": _muon}
# The optimizers whose μP (config.model.parametrization=mup) mup_learning_rates implements.
MUP_OPTIMIZERS = ("adam", "adamw")


def mup_learning_rates(width_ratio: float) -> optax.GradientTransformation:
  """μP for Adam (Yang et al. 2022, Tensor Programs V, table 3), after the optimizer: the
  updates of hidden weight matrices × base/width (`width_ratio`), embeddings, norms, biases and
  the output layers unchanged. Adam's step is lr-sized per entry whatever the gradient's scale,
  so a hidden matrix's step moves its outputs by lr × fan_in: the ratio keeps that constant as
  the width grows. It scales the whole step, AdamW's decoupled weight decay included (tied to
  the learning rate)."""
  labels = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: "hidden" if is_hidden_matrix(_names(path)) else "other", params)
  return optax.multi_transform({"hidden": optax.scale(width_ratio), "other": optax.identity()},
                               labels)


_ADAPTERS = ("lora_a", "lora_b")
_HEAD = "classifier"

# config.finetune.trainable → whether a param (by the module and param names on its path) trains.
TRAINABLE = {
    "all": lambda names: True,
    "lora": lambda names: names[-1] in _ADAPTERS or _HEAD in names,
    "head": lambda names: _HEAD in names,
}


def _names(path) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def trainable_mask(params, trainable: str):
  """For each leaf of `params` (boxed or not): True when config.finetune.trainable trains it."""
  return jax.tree_util.tree_map_with_path(lambda path, _: TRAINABLE[trainable](_names(path)),
                                          params)


def freeze(tx: optax.GradientTransformation, trainable: str) -> optax.GradientTransformation:
  """`tx` on the params `trainable` names; the others get zero updates and no optimizer state
  (optax.multi_transform gives `tx` only the trainable leaves)."""
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen",
                                       trainable_mask(params, trainable))
  frozen = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return optax.GradientTransformation(lambda params: _drop_empty_boxes(frozen.init(params)),
                                      frozen.update)


def trainable_of(f) -> str:
  """config.finetune.trainable (`f` is config.finetune) with "" resolved: lora when there are
  adapters, else all."""
  return f.trainable or ("lora" if f.lora_rank else "all")


def check_trainable(f, task: str) -> None:
  """config.finetune.trainable names a choice that has something to train."""
  choice = trainable_of(f)
  if choice not in TRAINABLE:
    raise ConfigError(f"config.finetune.trainable={f.trainable!r} is unknown; choose one of "
                      f"{sorted(TRAINABLE)} (or '' for lora with adapters, else all)")
  if choice == "lora" and not f.lora_rank:
    raise ConfigError("config.finetune.trainable='lora' trains the LoRA adapters, but "
                      "config.finetune.lora_rank=0 adds none; set a rank (e.g. 8)")
  if choice == "head" and task != "classify":
    raise ConfigError("config.finetune.trainable='head' trains the classifier, which only "
                      "config.task='classify' has; choose all or lora")


def learning_rate_schedule(c, steps: int) -> optax.Schedule:
  return SCHEDULES[c.schedule](c, steps)


def make_optimizer(c, steps: int, model: ModelConfig | None = None
                   ) -> optax.GradientTransformation:
  """`c` is `config.optimizer`; `steps` the run length (the default cosine decay horizon);
  `model` the model's config, whose parametrization (μP) scales the hidden learning rates."""
  transforms = []
  if c.clip_norm:
    transforms.append(optax.clip_by_global_norm(c.clip_norm))
  transforms.append(OPTIMIZERS[c.name](c, learning_rate_schedule(c, steps)))
  if model is not None and model.parametrization == "mup":
    require(c.name in MUP_OPTIMIZERS, f"config.model.parametrization='mup' is μP for Adam, not "
            f"config.optimizer.name={c.name!r}; choose one of {sorted(MUP_OPTIMIZERS)} (or "
            "parametrization='standard')")
    transforms.append(mup_learning_rates(model.width_ratio))
  return optax.chain(*transforms)


def check_config(c) -> None:
  """Raises ConfigError naming the first field of `config.optimizer` that cannot work."""
  require(c.name in OPTIMIZERS, f"config.optimizer.name={c.name!r} is unknown; choose one of "
          f"{sorted(OPTIMIZERS)}")
  require(c.schedule in SCHEDULES, f"config.optimizer.schedule={c.schedule!r} is unknown; choose "
          f"one of {sorted(SCHEDULES)}")
  require(c.learning_rate > 0, "config.optimizer.learning_rate must be positive")
  require(c.warmup_steps >= 0, "config.optimizer.warmup_steps must be >= 0")
  require(c.clip_norm >= 0, "config.optimizer.clip_norm must be >= 0 (0 = off)")
  require(0 <= c.b1 < 1 and 0 <= c.b2 < 1 and c.eps >= 0,
          "config.optimizer: need 0 <= b1 < 1, 0 <= b2 < 1 and eps >= 0")
  if c.name == "muon":
    require(c.muon_learning_rate > 0, "config.optimizer.muon_learning_rate must be positive "
            "(Muon's peak rate for the weight matrices, e.g. 0.02)")
    require(0 <= c.muon_momentum < 1, "config.optimizer.muon_momentum must be in [0, 1), e.g. 0.95")


def check_schedule(c, steps: int) -> None:
  """The cosine schedule must decay over more steps than it warms up."""
  horizon = c.decay_steps or steps
  if c.schedule == "cosine" and horizon <= c.warmup_steps:
    raise ConfigError(
        f"the cosine schedule decays over {horizon} steps (config.optimizer.decay_steps, or "
        f"config.steps when 0), which must exceed config.optimizer.warmup_steps="
        f"{c.warmup_steps}; lower the warmup or lengthen the decay")
