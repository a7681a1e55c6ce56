"""The base of every error caused by input the user can fix (config, data, mesh, checkpoints).

The CLI prints these as one line, without a traceback; anything else is a bug and keeps its
traceback."""


class UserError(ValueError):
  """Bad input; the message names the problem and the fix."""
