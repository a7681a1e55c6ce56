from bigflax.errors import UserError


class InteropError(UserError):
  """A checkpoint or model that has no counterpart on the other side; says which field."""
