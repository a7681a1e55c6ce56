"""Hugging Face `transformers` checkpoints ⇄ bigflax, without torch.

A Hugging Face directory holds config.json and *.safetensors (one file or shards). Each supported
`model_type` has a module here that translates the config (to `config.model` fields and back) and
the tensors (torch layouts: Linear is [out, in], GPT-2's Conv1D is [in, out]) to bigflax's
per-head params and back. Params are converted in the unscanned layout; scanned models go through
`bigflax.model.stack_layers` / `unstack_layers`.
"""

import dataclasses
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.flax import save_file

from bigflax.interop import gpt2, llama
from bigflax.errors import ConfigError, InteropError
from bigflax.model import (DTYPES, ModelConfig, Transformer, abstract_params, stack_layers,
                           unstack_layers)

FAMILIES = {"gpt2": gpt2, "llama": llama}  # config.json's model_type → converter module
SAME_SAVE = "config.json and the weights must come from the same save_pretrained"


def _open(file: pathlib.Path, framework: str):
  try:
    return safe_open(file, framework=framework)
  except (OSError, SafetensorError) as e:
    raise InteropError(f"{file} does not load as safetensors ({e}); save the model again with "
                       "transformers' save_pretrained(..., safe_serialization=True)") from None


def _tensor_files(directory: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise InteropError(f"{directory} holds no *.safetensors files; save the model with "
                       "transformers' save_pretrained(..., safe_serialization=True)")
  return files


def tensor_shapes(directory: pathlib.Path) -> dict[str, tuple[int, ...]]:
  """The name and shape of every tensor in the directory's *.safetensors, read from the headers
  (no tensor is loaded)."""
  shapes = {}
  for file in _tensor_files(directory):
    with _open(file, "np") as f:
      shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
  return shapes


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  tensors = {}
  for file in _tensor_files(directory):
    # The flax framework reads bfloat16, which numpy alone cannot.
    with _open(file, "flax") as f:
      tensors.update({name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()})
  return tensors


def expected_shapes(family, cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The tensors (by `family.canonical` name) and shapes a transformers checkpoint of `cfg`
  holds: the family's own conversion of the model's abstract params, so nothing is allocated."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  params = nn.unbox(abstract_params(Transformer(cfg), 1))
  shapes = jax.eval_shape(lambda p: family.params_to_hf(p, cfg), params)
  return {family.canonical(name): tuple(s.shape) for name, s in shapes.items()}


def check_tensors(directory: pathlib.Path, family, cfg: ModelConfig) -> None:
  """An InteropError naming the first tensor that config.json asks for and the weights lack or
  hold in another shape."""
  stored = {family.canonical(name): shape for name, shape in tensor_shapes(directory).items()}
  expected = expected_shapes(family, cfg)
  missing = [name for name in expected if name not in stored]
  if missing:
    raise InteropError(f"the weights in {directory} lack {len(missing)} of the tensors its "
                       f"config.json describes (first: {missing[0]}); {SAME_SAVE}")
  wrong = [name for name, shape in expected.items() if stored[name] != shape]
  if wrong:
    name, differ = wrong[0], "differs" if len(wrong) == 1 else "differ"
    raise InteropError(f"the weights in {directory} disagree with its config.json: {name} has "
                       f"shape {list(stored[name])}, config.json implies {list(expected[name])} "
                       f"({len(wrong)} of {len(expected)} tensors {differ}); {SAME_SAVE}")


def read_config(directory) -> tuple[object, dict]:
  """(converter module, config.json as a dict) of a transformers directory."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    what = "is not a directory" if directory.exists() else "does not exist"
    raise InteropError(f"{directory} {what}; give the directory transformers' save_pretrained "
                       "wrote (config.json and *.safetensors)")
  config_path = directory / "config.json"
  if not config_path.is_file():
    raise InteropError(f"{directory} has no config.json: not a transformers model directory; "
                       "give the directory transformers' save_pretrained wrote")
  try:
    hf_config = json.loads(config_path.read_text(encoding="utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InteropError(f"{config_path} is not valid JSON ({e}); fix it or save the model "
                       "again with save_pretrained") from None
  if not isinstance(hf_config, dict):
    raise InteropError(f"{config_path} holds a JSON {type(hf_config).__name__}, not an object; "
                       "fix it or save the model again with save_pretrained")
  family = FAMILIES.get(hf_config.get("model_type"))
  if family is None:
    raise InteropError(f"model_type {hf_config.get('model_type')!r} in {config_path} is not "
                       f"supported; supported: {sorted(FAMILIES)}")
  return family, hf_config


def model_fields(directory) -> tuple[object, dict]:
  """(converter module, config.model fields) of a transformers directory, from config.json alone
  (no tensor is read)."""
  family, hf_config = read_config(directory)
  try:
    return family, family.config_from_hf(hf_config)
  except KeyError as e:
    raise InteropError(f"{pathlib.Path(directory) / 'config.json'} lacks {e.args[0]!r}, which a "
                       f"{hf_config['model_type']} config.json has; save the model again with "
                       "save_pretrained") from None


def load_hf(directory, param_dtype: str = "float32") -> tuple[dict, dict]:
  """(config.model fields, params in bigflax's unscanned layout) of a transformers directory.
  The params are host (numpy) arrays, so each caller places them where it needs (a sharded run:
  each device its shards). Every problem with the directory (missing, not JSON, an unsupported
  model, weights that do not match config.json) is an InteropError."""
  directory = pathlib.Path(directory)
  family, fields = model_fields(directory)
  config_path = directory / "config.json"
  fields["param_dtype"] = param_dtype
  try:
    cfg = ModelConfig(**fields)
  except ConfigError as e:
    raise InteropError(f"{config_path} describes a model bigflax cannot build: {e}") from None
  check_tensors(directory, family, cfg)
  params = family.params_from_hf(read_tensors(directory), cfg)
  params = jax.tree.map(lambda x: np.asarray(x, DTYPES[param_dtype]), params)
  return fields, params


def family_of(cfg: ModelConfig) -> str:
  """The first family whose architecture can hold `cfg`, or an error listing what differs."""
  for bigflax_only, fix in (
      (cfg.num_labels, f"is a classifier (model.num_labels={cfg.num_labels}); only causal "
       "language models convert"),
      (not cfg.causal, "is bidirectional (model.causal=False, a masked LM); only causal language "
       "models convert"),
      (cfg.lora_rank, f"has LoRA adapters (finetune.lora_rank={cfg.lora_rank}); fold them in first "
       "with `bigflax export --merge` and convert the export"),
      (cfg.width_ratio != 1, f"uses μP away from its base width (model.parametrization='mup', "
       f"embed_dim={cfg.embed_dim} ≠ mup_base_width={cfg.mup_base_width}): its output multiplier "
       "and 1/head_dim attention have no transformers counterpart")):
    if bigflax_only:
      raise InteropError(f"this model has no transformers counterpart: it {fix}")
  problems = {name: family.unsupported(cfg) for name, family in FAMILIES.items()}
  for name, problem in problems.items():
    if not problem:
      return name
  raise InteropError("this model has no transformers counterpart: " + "; ".join(
      f"{name} needs {problem}" for name, problem in problems.items()))


def save_hf(directory, cfg: ModelConfig, params) -> str:
  """Writes config.json and model.safetensors that transformers' from_pretrained loads; returns
  the family name. Tensors keep the params' dtype."""
  name = family_of(cfg)
  if cfg.scan_layers:
    params = unstack_layers(params)
  tensors = FAMILIES[name].params_to_hf(jax.tree.map(np.asarray, params), cfg)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = FAMILIES[name].config_to_hf(cfg)
  hf_config["dtype"] = cfg.param_dtype
  (directory / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  # safetensors refuses views sharing memory; contiguous copies are independent.
  save_file({k: jnp.asarray(np.ascontiguousarray(v)) for k, v in tensors.items()},
            directory / "model.safetensors", metadata={"format": "pt"})
  return name


def to_layout(params, cfg: ModelConfig):
  """Unscanned params (as load_hf returns them) in the layout `cfg.scan_layers` asks for."""
  return stack_layers(params, cfg.num_layers) if cfg.scan_layers else params
