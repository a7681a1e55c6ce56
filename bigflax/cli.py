"""`bigflax train|sample|aot`: argument handling only; the work is in bigflax.train/decode/aot."""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bigflax import config as config_lib
from bigflax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<experiment name>).")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text to continue (default: the run's "
                              "config.sample.prompt).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "sample: tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sample: softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample: keep the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", None, "sample: nucleus probability mass; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "aot: a TPU topology (v5p:4x4x4, v5e:16x16) or "
                                "slice name (v5e-256, v5p-64).")

USAGE = "usage: bigflax {train,sample,aot} [--config FILE] [--config.FIELD=VALUE ...] [--workdir DIR]"


def _experiment_name(config) -> str:
  return config.name or pathlib.Path(config_flags.get_config_filename(flags.FLAGS["config"])).stem


def _train() -> None:
  from bigflax import distributed, train  # imported here so `bigflax --help` stays fast
  config = flags.FLAGS.config
  config_lib.validate(config)
  workdir = _WORKDIR.value or str(pathlib.Path("runs") / _experiment_name(config))
  if not config.name:
    with config.unlocked():
      config.name = _experiment_name(config)
  with distributed.fail_fast():
    distributed.initialize(config.distributed)  # before anything starts a JAX backend
    distributed.check_shared_workdir(workdir)
    with distributed.stdout_from_process_zero():
      train.train(config, workdir)


def _sample() -> None:
  if not _WORKDIR.value:
    raise UserError("bigflax sample needs --workdir DIR, the directory of a finished run")
  from bigflax import decode, rundir
  config, model, params, tokenizer = rundir.load_export(_WORKDIR.value)
  s = config.sample
  print(decode.sample_text(
      model, params, tokenizer, s.prompt if _PROMPT.value is None else _PROMPT.value,
      max_new_tokens=_MAX_NEW_TOKENS.value or s.max_new_tokens,
      temperature=s.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value,
      top_k=s.top_k if _TOP_K.value is None else _TOP_K.value,
      top_p=s.top_p if _TOP_P.value is None else _TOP_P.value, seed=_SEED.value))


def _aot() -> None:
  if not _TOPOLOGY.value:
    raise UserError("bigflax aot needs --topology, e.g. --topology=v5p:4x4x4 or v5e-256")
  from bigflax import aot
  aot.plan_and_report(flags.FLAGS.config, _TOPOLOGY.value)


COMMANDS = {"train": _train, "sample": _sample, "aot": _aot}


def _main(argv) -> None:
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the user's terminal
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command, got {argv[1:]}\n{USAGE}")
  try:
    COMMANDS[argv[1]]()
  except UserError as e:  # bad input: one clear line, no traceback
    sys.exit(f"error: {e}")


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with an unknown --config.FIELD reported as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\n{USAGE}")
  except (AttributeError, KeyError) as e:
    _exit_unknown_field(e, argv)


def _exit_unknown_field(error: Exception, argv: list[str]):
  """ml_collections raises Attribute/KeyError('name\nDid you mean ...') for a missing field."""
  message = str(error).strip("'\"").replace("\\n", "\n").replace("\\", "")
  name, _, hint = message.partition("\n")
  name = name.strip("'\"")
  bad = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
              and name in a.split("=")[0].split(".")), f"--config.…{name}")
  sys.exit(f"error: {bad} names no config field. {hint}".strip())


def main() -> None:
  # config_flags applies --config.FIELD overrides to the default config as soon as the flag is
  # defined, so an unknown field is reported from here.
  try:
    config_flags.DEFINE_config_file(
        "config", config_lib.__file__,
        "Experiment file defining get_config(); override any field with --config.a.b=value.",
        lock_config=True)
  except (AttributeError, KeyError) as e:
    _exit_unknown_field(e, sys.argv)
  app.run(_main, flags_parser=_parse_flags)
