"""optax optimizers and learning-rate schedules, chosen by name from `config.optimizer`."""

import jax
import optax

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


OPTIMIZERS = {"adamw": _adamw, "adam": _adam, "sgd": _sgd}


def learning_rate_schedule(c, steps: int) -> optax.Schedule:
  return SCHEDULES[c.schedule](c, steps)


def make_optimizer(c, steps: int) -> optax.GradientTransformation:
  """`c` is `config.optimizer`; `steps` the run length (the default cosine decay horizon)."""
  transforms = []
  if c.clip_norm:
    transforms.append(optax.clip_by_global_norm(c.clip_norm))
  transforms.append(OPTIMIZERS[c.name](c, learning_rate_schedule(c, steps)))
  return optax.chain(*transforms)


def check_config(c) -> None:
  """Raises ConfigError naming the first field of `config.optimizer` that cannot work."""
  def need(ok, message):
    if not ok:
      raise ConfigError(message)
  need(c.name in OPTIMIZERS, f"config.optimizer.name={c.name!r} is unknown; choose one of "
       f"{sorted(OPTIMIZERS)}")
  need(c.schedule in SCHEDULES, f"config.optimizer.schedule={c.schedule!r} is unknown; choose "
       f"one of {sorted(SCHEDULES)}")
  need(c.learning_rate > 0, "config.optimizer.learning_rate must be positive")
  need(c.warmup_steps >= 0, "config.optimizer.warmup_steps must be >= 0")
  need(c.clip_norm >= 0, "config.optimizer.clip_norm must be >= 0 (0 = off)")
  need(0 <= c.b1 < 1 and 0 <= c.b2 < 1 and c.eps >= 0,
       "config.optimizer: need 0 <= b1 < 1, 0 <= b2 < 1 and eps >= 0")


def check_schedule(c, steps: int) -> None:
  """The cosine schedule must decay over more steps than it warms up."""
  horizon = c.decay_steps or steps
  if c.schedule == "cosine" and horizon <= c.warmup_steps:
    raise ConfigError(
        f"the cosine schedule decays over {horizon} steps (config.optimizer.decay_steps, or "
        f"config.steps when 0), which must exceed config.optimizer.warmup_steps="
        f"{c.warmup_steps}; lower the warmup or lengthen the decay")
