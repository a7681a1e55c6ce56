"""Starting from trained params (`config.init_from`): another run or a Hugging Face model.

    --config.init_from=RUN_DIR        its params/ export (else its latest checkpoint)
    --config.init_from=RUN_DIR:STEP   its checkpoint STEP
    --config.init_from=HF_DIR         config.json + *.safetensors (GPT-2, Llama) + tokenizer.json

`apply` takes the model and tokenizer fields from the source, keeping the experiment's overrides
of fields that leave the source's params as they are (dropout, dtypes, remat, scan_layers, a
classifier head, LoRA, …); `load_params` restores the source's params straight into a run's
shardings, converting the layout (scanned or not) on the devices. The run starts at step 0 with
a fresh optimizer; once it has a checkpoint of its own, resuming reads that instead.
"""

import copy
import dataclasses
import pathlib
import re

import flax.linen as nn
import jax

from bigflax import checkpoint, interop, rundir, sharding
from bigflax.config import FINETUNE_FIELDS, ModelConfig, base
from bigflax.errors import CheckpointError, ConfigError
from bigflax.model import Transformer, abstract_params, stack_layers, unstack_layers

# Model fields that fix which params exist and their shapes: the source decides them, and an
# experiment that overrides one with another value asks for a different model (an error).
# block_size is among them only for learned positions, and only upwards: a shorter context reads
# the first rows of the source's position table.
ARCHITECTURE_FIELDS = ("vocab_size", "block_size", "num_layers", "num_heads", "num_kv_heads",
                       "embed_dim", "mlp_dim", "use_bias", "tie_embeddings", "norm", "positions",
                       "mlp", "parametrization", "mup_base_width")
TOKENIZER_FIELDS = ("tokenizer", "tokenizer_model", "charset")  # of config.data
_POSITION_TABLE = "position_embed/embedding"
_STEP = re.compile(r"(.+):(\d+)")


@dataclasses.dataclass(frozen=True)
class Source:
  """A parsed `init_from`: a bigflax run (export, or checkpoint `step`) or a transformers dir."""
  spec: str
  path: pathlib.Path
  kind: str  # "run" | "hf" (RESTORERS)
  step: int | None = None


def checkpoint_steps(path: pathlib.Path) -> list[int]:
  """The steps of a run directory's checkpoints, ascending (none: [])."""
  directory = checkpoint.checkpoints_dir(path)
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.is_dir()) else []


def parse(spec: str, field: str = "config.init_from") -> Source:
  """`PATH[:STEP]` as a Source, checked: the directory exists and is a run (config.json with
  params/ or checkpoints) or a transformers model (config.json and *.safetensors), and STEP is
  one of the run's checkpoints. `field` names the setting in errors."""
  match = _STEP.fullmatch(spec)
  text, step = (match.group(1), int(match.group(2))) if match else (spec, None)
  path = pathlib.Path(text).expanduser()
  what = ("a bigflax run directory (config.json with params/ or checkpoints/; DIR:STEP for a "
          "checkpoint) or a Hugging Face model directory (config.json and *.safetensors)")
  if not path.is_dir():
    state = "is not a directory" if path.exists() else "does not exist"
    raise ConfigError(f"{field}={spec!r}: {path} {state}; give {what}")
  is_run = rundir.config_path(path).is_file() and (
      rundir.params_dir(path).is_dir() or bool(checkpoint_steps(path)))
  if is_run:
    steps = checkpoint_steps(path)
    if step is not None and step not in steps:
      held = f"its checkpoints are steps {steps}" if steps else "it has no checkpoints"
      raise CheckpointError(f"{field}={spec!r}: {path} has no checkpoint of step {step}; {held} "
                            f"(or drop :{step} to read its params/ export)")
    return Source(spec, path, "run", step)
  if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
    if step is not None:
      raise ConfigError(f"{field}={spec!r}: {path} is a Hugging Face model, which holds one set "
                        f"of weights; drop :{step}")
    return Source(spec, path, "hf")
  raise ConfigError(f"{field}={spec!r}: {path} is neither kind of model directory; give {what}")


def _known_fields(fields: dict) -> dict:
  """Those of `fields` that are ModelConfig's own architecture (a source written by an older
  bigflax may lack newer fields, which then keep their defaults)."""
  names = {f.name for f in dataclasses.fields(ModelConfig)} - set(FINETUNE_FIELDS)
  return {k: v for k, v in fields.items() if k in names}


def describe(source: Source) -> tuple[dict, dict | None]:
  """(the source's config.model fields, resolved; its config.data tokenizer fields, or None when
  it has no tokenizer of its own: a transformers directory without tokenizer.json)."""
  if source.kind == "run":
    config = rundir.read_config(source.path)
    fields = _known_fields(config.model.to_dict())
    tokenizer = {name: config.data[name] for name in TOKENIZER_FIELDS}
  else:
    _, fields = interop.model_fields(source.path)
    has_tokenizer = (source.path / "tokenizer.json").is_file()
    tokenizer = ({"tokenizer": "hf", "tokenizer_model": str(source.path.absolute()),
                  "charset": ""} if has_tokenizer else None)
  try:
    resolved = dataclasses.asdict(ModelConfig(**_known_fields(fields)))
  except ConfigError as e:
    raise ConfigError(f"config.init_from={source.spec!r}: its model cannot be built ({e})"
                      ) from None
  return {name: resolved[name] for name in fields if name in resolved}, tokenizer


def _cast(default, value):
  """`value` in the type of the config field (JSON and transformers write 10000 for 10000.0)."""
  return type(default)(value) if isinstance(default, bool | int | float | str) else value


def apply(config):
  """A copy of `config` whose model and tokenizer fields come from `config.init_from`'s source
  (`config` itself when it is empty). An experiment's value differing from both base()'s default
  and the source's is kept when it leaves the source's params as they are, and is a ConfigError
  naming the field when it would change them (ARCHITECTURE_FIELDS) or the tokenizer."""
  if not config.get("init_from"):  # also a config.json written before the field existed
    return config
  source = parse(config.init_from)
  model_fields, tokenizer_fields = describe(source)
  defaults, result = base(), copy.deepcopy(config)
  where = f"config.init_from={config.init_from!r}"
  for name, value in model_fields.items():
    if name not in config.model or name in FINETUNE_FIELDS:
      continue
    current = config.model[name]
    if current in (defaults.model[name], value):
      result.model[name] = _cast(defaults.model[name], value)
      continue
    shorter_context = name == "block_size" and (
        model_fields.get("positions") == "rope" or current <= value)
    if name in ARCHITECTURE_FIELDS and not shorter_context:
      raise ConfigError(
          f"config.model.{name}={current!r} differs from the {value!r} of the model in {where}, "
          f"whose params have that shape; drop the --config.model.{name} override (the model "
          "comes from the source) or train from scratch without config.init_from")
  if tokenizer_fields is None:
    if config.data.tokenizer == defaults.data.tokenizer:
      raise ConfigError(
          f"{where}: {source.path} holds no tokenizer.json, so its model's tokenizer is unknown; "
          "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json) there, or "
          "name them with --config.data.tokenizer=hf --config.data.tokenizer_model=DIR")
    return result
  for name, value in tokenizer_fields.items():
    current = config.data[name]
    if current not in (defaults.data[name], value):
      raise ConfigError(
          f"config.data.{name}={current!r} differs from the {value!r} the model in {where} was "
          f"trained with; drop the --config.data.{name} override (a model reads text only "
          "through its own tokenizer)")
    result.data[name] = value
  return result


def _path(key_path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _flat(tree) -> dict:
  return {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _source_model(source: Source) -> ModelConfig:
  """The model that wrote the source's params, LoRA adapters included (a fine-tuned run's)."""
  fields, _ = describe(source)
  finetune = {}
  if source.kind == "run":
    config = rundir.read_config(source.path)
    finetune = {name: config.finetune[name] for name in FINETUNE_FIELDS
                if name in config.get("finetune", {})}
  return ModelConfig(**_known_fields(fields), **finetune)


def _restore_run(source: Source, abstract):
  return rundir.read_params(source.path, abstract, source.step)


def _restore_hf(source: Source, abstract):
  """Each device reads only its shards of each converted host array (also across hosts)."""
  _, host = interop.load_hf(source.path)
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda index: x[index]),
      host, abstract)


RESTORERS = {"run": _restore_run, "hf": _restore_hf}  # Source.kind → (source, abstract) → params


def _fit(path: str, leaf, target, spec: str):
  """A source leaf as the run's leaf `target` needs it (its dtype; a learned position table cut to
  the run's shorter context), or a CheckpointError when its shape cannot be."""
  if path == _POSITION_TABLE and leaf.shape[0] > target.shape[0]:
    leaf = leaf[:target.shape[0]]
  if leaf.shape != target.shape:
    raise CheckpointError(
        f"config.init_from={spec!r}: its param {path} has shape {tuple(leaf.shape)}, this run's "
        f"{tuple(target.shape)}; use the source's model fields (drop the overrides that change "
        "them)")
  return leaf.astype(target.dtype)


def load_params(spec, run, fresh_params=None):
  """The params of `spec` (a string, as config.init_from, or a parsed Source) for `run`: restored
  straight into the run's shardings (never whole on one device), in the run's layout, dtype and
  context length. Leaves the source lacks (adapters, a classifier head) are `fresh_params`' (the
  run's own init; None: the source must hold every leaf, as when a run's own model is read back
  for evaluation); leaves the run lacks (an LM head when it classifies) are dropped."""
  source = parse(spec) if isinstance(spec, str) else spec
  source_cfg = _source_model(source)
  boxed = abstract_params(Transformer(source_cfg), source_cfg.block_size)
  shardings = sharding.logical_shardings(nn.get_partition_spec(boxed), run.mesh, run.rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  stored = RESTORERS[source.kind](source, abstract)
  targets = _flat(run.abstract_state.params)
  run_scanned = run.model.cfg.scan_layers

  def convert(params):
    if source_cfg.scan_layers and not run_scanned:
      params = unstack_layers(params)
    elif run_scanned and not source_cfg.scan_layers:
      params = stack_layers(params, source_cfg.num_layers)
    return {path: _fit(path, leaf, targets[path], source.spec)
            for path, leaf in _flat(params).items() if path in targets}

  kept = jax.eval_shape(convert, stored)
  if source_cfg.lora_rank and not any("lora_" in path for path in kept):
    raise ConfigError(f"config.init_from={source.spec!r} is a LoRA run, and this run has no "
                      "adapters to take its own: starting from its base alone would lose them; "
                      "fold them in first (bigflax export --workdir SOURCE --merge --output DIR) "
                      "and start from DIR")
  if fresh_params is None:
    missing = sorted(targets.keys() - kept.keys())
    if missing:
      raise CheckpointError(f"{source.spec} lacks {len(missing)} of the model's params (first: "
                            f"{missing[0]}); it was written by a different model")
    fresh_params = run.abstract_state.params
  with run.activate():
    loaded = jax.jit(convert, out_shardings={p: targets[p].sharding for p in kept})(stored)
  return jax.tree_util.tree_map_with_path(lambda p, fresh: loaded.get(_path(p), fresh),
                                          fresh_params)
