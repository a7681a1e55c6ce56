"""Every error caused by input the user can fix: one hierarchy, at the bottom of the import graph.

The CLI prints these as one line, without a traceback; anything else is a bug and keeps its
traceback. Each message names the problem and the fix."""


def first_line(error: Exception) -> str:
  """An exception as one line, for the one-line messages below: the first non-empty line of its
  text (Orbax's, TensorStore's and TFDS's run to many), or its type when it has none."""
  return next((line.strip() for line in str(error).splitlines() if line.strip()),
              type(error).__name__)


class UserError(ValueError):
  """Bad input; the message names the problem and the fix."""


class ConfigError(UserError):
  """A config value that cannot work; the message names the field and the fix."""


class DataError(UserError):
  """Input data that cannot be used; the message says what is wrong and how to fix it."""


class ShardingError(UserError):
  """A mesh or rule setting that cannot work; the message names the config field to change."""


class CheckpointError(UserError):
  """A checkpoint or export that cannot be used as asked; the message names it and the way out."""


class NonFiniteError(UserError):
  """Training produced NaN/Inf; nothing non-finite is checkpointed."""
  FIX = ("lower config.optimizer.learning_rate (or raise warmup_steps / clip harder with "
         "config.optimizer.clip_norm), or set config.skip_nonfinite=True to skip such updates")


class DistributedError(UserError):
  """The processes of a run could not form one system; the message names the field to check."""


class InteropError(UserError):
  """A checkpoint or model that has no counterpart on the other side; says which field."""
