"""`bigflax COMMAND [flags]`: argument handling only; the work is in bigflax.train, decode, aot."""

import pathlib
import sys

from absl import flags, logging
from ml_collections import config_flags

from bigflax import config as config_lib
from bigflax.errors import UserError

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<experiment name>).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "train: replace a finished model (config.json "
                               "and params/, no checkpoint) in --workdir instead of refusing; "
                               "predict: replace an existing --output; "
                               "eval: replace an existing eval_<step>.json.")
_PROMPT = flags.DEFINE_string("prompt", None, "sample: text to continue (default: the run's "
                              "config.sample.prompt).")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", None, "sample: tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "sample: softmax temperature; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", None, "sample: keep the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", None, "sample: nucleus probability mass in (0, 1]; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_STEP = flags.DEFINE_integer("step", None, "sample, eval: read checkpoint STEP instead of the "
                             "final params (default: params/, else the latest checkpoint).")
_TASKS = flags.DEFINE_string("tasks", "", "eval: lm-evaluation-harness tasks to run too, "
                             "comma-separated (hellaswag,lambada_openai; needs bigflax[eval]).")
_INPUT = flags.DEFINE_string("input", None, "predict: a JSON-lines or CSV file of texts to "
                             "classify (the run's text field; a label there is optional).")
_OUTPUT = flags.DEFINE_string("output", None, "predict: the JSON-lines file to write (default: "
                              "stdout); export: the new run directory.")
_MERGE = flags.DEFINE_bool("merge", False, "export: fold LoRA adapters into the weights (a run "
                           "with adapters needs it).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "aot: a TPU topology (v5p:4x4x4, v5e:16x16) or "
                                "slice name (v5e-256, v5p-64).")
_SPACE = flags.DEFINE_string("space", None, "sweep: a Python file defining space(trial, config) "
                             "that sets config fields with trial.suggest_*.")
_STUDY = flags.DEFINE_string("study", None, "sweep: the study's name (its directory defaults to "
                             "runs/sweeps/NAME; a killed sweep resumes from there).")
_TRIALS = flags.DEFINE_integer("trials", 20, "sweep: finished trials the study runs to "
                               "(default 20).")
_WORKERS = flags.DEFINE_integer("workers", 1, "sweep: worker processes here, each running one "
                                "trial at a time (default 1; other hosts may join the same "
                                "directory).")
_PRUNER = flags.DEFINE_enum("pruner", "median", ["median", "none"], "median (default): stop a "
                            "trial whose eval_loss is worse than the median of the earlier "
                            "trials' at that step.")
_STARTUP_TRIALS = flags.DEFINE_integer("startup_trials", 5, "sweep: trials that finish before "
                                       "the pruner judges any (default 5).")

COMMON_FLAGS = """\
  --config FILE[:VARIANT]   an experiment file defining get_config() (default: the embedded
                            byte-level GPT on the Python standard library, bigflax/config.py)
  --config.FIELD=VALUE      override any config field (`bigflax config` lists them all)
  --workdir DIR             the run directory (default: runs/<experiment name>)"""


def _experiment_name(config, config_spec: str | None) -> str:
  if config.name:
    return config.name
  return pathlib.Path(config_spec.partition(":")[0]).stem if config_spec else "stdlib_bytes"


def _workdir(config, config_spec) -> str:
  return _WORKDIR.value or str(pathlib.Path("runs") / _experiment_name(config, config_spec))


def _train(config, config_spec) -> None:
  from bigflax import distributed, train  # imported here so `bigflax --help` stays fast
  config_lib.validate(config)
  workdir = _workdir(config, config_spec)
  if not config.name:
    with config.unlocked():
      config.name = _experiment_name(config, config_spec)
  with distributed.fail_fast():
    distributed.initialize(config.distributed)  # before anything starts a JAX backend
    distributed.check_shared_workdir(workdir)
    with distributed.stdout_from_process_zero():
      train.train(config, workdir, overwrite=_OVERWRITE.value)


def _sample(config, config_spec) -> None:
  del config, config_spec  # the run's own config.json decides
  if not _WORKDIR.value:
    raise UserError("bigflax sample needs --workdir DIR, the directory of a run")
  checks = ((_TEMPERATURE, lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
            (_TOP_K, lambda v: v >= 0, "must be >= 0 (0 = off)"),
            (_TOP_P, lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)"),
            (_MAX_NEW_TOKENS, lambda v: v >= 1, "must be >= 1"))
  for flag, ok, rule in checks:
    if flag.value is not None and not ok(flag.value):
      raise UserError(f"--{flag.name}={flag.value} {rule}")
  from bigflax import data, decode, rundir
  config, model, params, tokenizer = rundir.load_run(_WORKDIR.value, _STEP.value)
  # A model's own tokenizer fills its vocabulary up to the padding (and an id or so reserved past
  # it); one far smaller is another model's, whose ids would decode to garbage.
  most = data.padded_vocab_size(tokenizer.vocab_size) + data.tokenizers.VOCAB_MULTIPLE
  if not tokenizer.vocab_size <= model.cfg.vocab_size <= most:
    raise UserError(
        f"the model of {_WORKDIR.value} has {model.cfg.vocab_size} ids but its tokenizer "
        f"(data.tokenizer={config.data.tokenizer!r}) has {tokenizer.vocab_size}: not the "
        "model's own; set data.tokenizer and data.tokenizer_model in "
        f"{rundir.config_path(_WORKDIR.value)} to the tokenizer it was trained with (an imported "
        "model's: data.tokenizer='hf' and the directory of its tokenizer.json)")
  s = config.sample
  prompt = s.prompt if _PROMPT.value is None else _PROMPT.value
  print(prompt + decode.sample_text(
      model, params, tokenizer, prompt,
      max_new_tokens=_MAX_NEW_TOKENS.value or s.max_new_tokens,
      temperature=s.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value,
      top_k=s.top_k if _TOP_K.value is None else _TOP_K.value,
      top_p=s.top_p if _TOP_P.value is None else _TOP_P.value, seed=_SEED.value))


def _eval(config, config_spec) -> None:
  if config_spec:
    raise UserError("bigflax eval reads the run's own config.json; drop --config FILE and "
                    "change fields with --config.FIELD=VALUE")
  if not _WORKDIR.value:
    raise UserError("bigflax eval needs --workdir DIR, the directory of a run (or of a model "
                    "imported with tools/convert_hf.py)")
  from bigflax import distributed, evaluation
  # Only the fields given on the command line replace the run's; the rest are config.json's.
  given = [a.removeprefix("--config.").split("=")[0] for a in sys.argv[1:]
           if a.startswith("--config.")]

  def override(run_config):
    with run_config.unlocked():
      for field in given:
        *parents, leaf = field.split(".")
        target, source = run_config, config
        for part in parents:
          target, source = target[part], source[part]
        target[leaf] = source[leaf]
  with distributed.fail_fast():
    distributed.initialize(evaluation.run_config(_WORKDIR.value, override).distributed)
    with distributed.stdout_from_process_zero():
      evaluation.evaluate_workdir(_WORKDIR.value, _STEP.value, override=override,
                                  tasks=_TASKS.value, overwrite=_OVERWRITE.value)


def _predict(config, config_spec) -> None:
  del config, config_spec  # the run's own config.json decides
  if not _WORKDIR.value or not _INPUT.value:
    raise UserError("bigflax predict needs --workdir DIR (a classifier's run) and --input FILE "
                    "(JSON lines or CSV of texts)")
  from bigflax import finetune
  count = finetune.predict(_WORKDIR.value, _INPUT.value, _OUTPUT.value,
                           overwrite=_OVERWRITE.value, step=_STEP.value)
  if _OUTPUT.value:
    print(f"{count} predictions → {_OUTPUT.value}")


def _export(config, config_spec) -> None:
  del config, config_spec
  if not _WORKDIR.value or not _OUTPUT.value:
    raise UserError("bigflax export needs --workdir DIR (a run) and --output DIR (a new "
                    "directory)")
  from bigflax import finetune
  finetune.export(_WORKDIR.value, _OUTPUT.value, merge=_MERGE.value, step=_STEP.value)
  print(f"exported {_WORKDIR.value} → {_OUTPUT.value}")


def _aot(config, config_spec) -> None:
  del config_spec
  if not _TOPOLOGY.value:
    raise UserError("bigflax aot needs --topology, e.g. --topology=v5p:4x4x4 or v5e-256")
  from bigflax import aot
  aot.plan_and_report(config, _TOPOLOGY.value)


def _sweep(config, config_spec) -> None:
  if not _SPACE.value or not _STUDY.value:
    raise UserError("bigflax sweep needs --space SPACE.py (defining space(trial, config)) and "
                    "--study NAME")
  if _TRIALS.value < 1 or _WORKERS.value < 1 or _STARTUP_TRIALS.value < 0:
    raise UserError("--trials and --workers must be >= 1, --startup_trials >= 0")
  from bigflax import sweep
  config_lib.validate(config)
  if not config.name:
    with config.unlocked():
      config.name = _experiment_name(config, config_spec)
  directory = _WORKDIR.value or str(pathlib.Path("runs") / "sweeps" / _STUDY.value)
  sweep.run(sweep.Sweep(directory, _STUDY.value, config_spec, config, _SPACE.value, _TRIALS.value,
                        _PRUNER.value, _STARTUP_TRIALS.value), workers=_WORKERS.value)


def _show_config(config, config_spec) -> None:
  del config_spec
  from bigflax import run  # every section's checks
  run.check(config)
  print(config_lib.describe(config), end="")


# name → (function, one line of help, the command's own flags)
COMMANDS = {
    "train": (_train, "train (or resume) a model; evaluates, checkpoints, ends with a sample",
              (_OVERWRITE,)),
    "sample": (_sample, "continue a prompt with a trained run's model (final params or a "
               "checkpoint)", (_PROMPT, _MAX_NEW_TOKENS, _TEMPERATURE, _TOP_K, _TOP_P, _SEED,
                               _STEP)),
    "eval": (_eval, "evaluate an export or checkpoint on its eval sets (and lm-eval --tasks)",
             (_STEP, _TASKS, _OVERWRITE)),
    "predict": (_predict, "a classifier's label and probabilities for each text of a file",
                (_INPUT, _OUTPUT, _OVERWRITE, _STEP)),
    "export": (_export, "write a run's params as a new run directory (LoRA folded in: --merge)",
               (_OUTPUT, _MERGE, _STEP)),
    "aot": (_aot, "compile the train step for a TPU slice from any machine: memory, FLOPs, fit",
            (_TOPOLOGY,)),
    "sweep": (_sweep, "search hyper-parameters with Optuna, each trial a run in WORKDIR/trials/<n>",
              (_SPACE, _STUDY, _TRIALS, _WORKERS, _PRUNER, _STARTUP_TRIALS)),
    "config": (_show_config, "print every config field with its value and what it means", ()),
}


def usage(command: str | None = None) -> str:
  lines = ["usage: bigflax COMMAND [--config FILE] [--config.FIELD=VALUE ...] [--workdir DIR] "
           "[flags]", "", "commands:"]
  lines += [f"  {name:8} {line}" for name, (_, line, _) in COMMANDS.items()]
  lines += ["", "common flags:", COMMON_FLAGS]
  for name, (_, _, own) in COMMANDS.items():
    if own and command in (None, name):
      lines += ["", f"{name} flags:"]
      lines += [f"  --{flag.name:22}  {flags.FLAGS[flag.name].help.removeprefix(name + ': ')}"
                for flag in own]
  lines += ["", "examples:", "  bigflax train",
            "  bigflax train --config experiments/shakespeare_char.py --config.steps=500",
            "  bigflax sample --workdir runs/stdlib_bytes --prompt 'def '",
            "  bigflax eval --workdir runs/stdlib_bytes --config.eval.sets='val;doc=text:a.txt'",
            "  bigflax config --config experiments/preset.py:gpt2_124m"]
  return "\n".join(lines)


def _split_config_flag(args: list[str]) -> tuple[str | None, list[str]]:
  """The --config FILE value, and the other arguments (--config.FIELD overrides stay)."""
  spec, rest, i = None, [], 0
  while i < len(args):
    arg = args[i]
    if arg == "--config" and i + 1 < len(args):
      spec, i = args[i + 1], i + 2
      continue
    if arg.startswith("--config="):
      spec = arg.split("=", 1)[1]
    else:
      rest.append(arg)
    i += 1
  return spec, rest


def _exit_unknown_field(error: Exception, argv: list[str]):
  """ml_collections raises Attribute/KeyError('name\\nDid you mean ...') for a missing field."""
  message = str(error).strip("'\"").replace("\\n", "\n").replace("\\", "")
  name, _, hint = message.partition("\n")
  name = name.strip("'\"")
  bad = next((a.split("=")[0] for a in argv if a.startswith("--config.")
              and name in a.split("=")[0].split(".")), f"--config.…{name}")
  sys.exit(f"error: {bad} names no config field. {hint}".strip())


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  if not argv or argv[0] in ("-h", "--help", "help", "--helpshort", "--helpfull"):
    print(usage())
    sys.exit(0)
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    sys.exit(f"error: unknown command {command!r}; choose one of {', '.join(COMMANDS)} "
             "(bigflax --help)")
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in args):
    print(usage(command))
    sys.exit(0)
  logging.set_verbosity(logging.WARNING)  # keep JAX's backend probing out of the user's terminal
  spec, rest = _split_config_flag(args)
  try:
    config = config_lib.load_experiment(spec) if spec else config_lib.get_config()
    # config_flags reads sys.argv when the flag is defined (to apply --config.FIELD overrides),
    # so it must see the arguments without the --config FILE already consumed above.
    sys.argv = ["bigflax", *rest]
    flags.FLAGS.unparse_flags()  # main may run more than once in a process (tests, notebooks)
    for name in [n for n in flags.FLAGS if n == "config" or n.startswith("config.")]:
      delattr(flags.FLAGS, name)
    try:
      config_flags.DEFINE_config_dict("config", config, lock_config=True)
      flags.FLAGS(sys.argv)
    except (AttributeError, KeyError) as e:
      _exit_unknown_field(e, rest)
    except flags.Error as e:
      sys.exit(f"error: {e}\n(bigflax {command} --help lists the flags)")
    COMMANDS[command][0](flags.FLAGS.config, spec)
  except UserError as e:  # bad input: one clear line, no traceback
    sys.exit(f"error: {e}")
