"""Hugging Face `transformers` checkpoints ⇄ bigflax, without torch.

A Hugging Face directory holds config.json and *.safetensors (one file or shards). Each supported
`model_type` has a module here that translates the config (to `config.model` fields and back) and
the tensors (torch layouts: Linear is [out, in], GPT-2's Conv1D is [in, out]) to bigflax's
per-head params and back. Params are converted in the unscanned layout; scanned models go through
`bigflax.model.stack_layers` / `unstack_layers`.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from bigflax.interop import gpt2, llama
from bigflax.errors import InteropError
from bigflax.model import DTYPES, ModelConfig, stack_layers, unstack_layers

FAMILIES = {"gpt2": gpt2, "llama": llama}  # config.json's model_type → converter module


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    raise InteropError(f"{directory} holds no *.safetensors files; save the model with "
                       "transformers' save_pretrained(..., safe_serialization=True)")
  tensors = {}
  for file in files:
    # The flax framework reads bfloat16, which numpy alone cannot.
    with safe_open(file, framework="flax") as f:
      tensors.update({name: np.asarray(f.get_tensor(name), np.float32) for name in f.keys()})
  return tensors


def load_hf(directory, param_dtype: str = "float32") -> tuple[dict, dict]:
  """(config.model fields, params in bigflax's unscanned layout) of a transformers directory."""
  directory = pathlib.Path(directory)
  config_path = directory / "config.json"
  if not config_path.exists():
    raise InteropError(f"{directory} has no config.json: not a transformers model directory")
  hf_config = json.loads(config_path.read_text())
  family = FAMILIES.get(hf_config.get("model_type"))
  if family is None:
    raise InteropError(f"model_type {hf_config.get('model_type')!r} in {config_path} is not "
                       f"supported; supported: {sorted(FAMILIES)}")
  fields = family.config_from_hf(hf_config)
  fields["param_dtype"] = param_dtype
  cfg = ModelConfig(**fields)
  params = family.params_from_hf(read_tensors(directory), cfg)
  params = jax.tree.map(lambda x: jnp.asarray(x, DTYPES[param_dtype]), params)
  return fields, params


def family_of(cfg: ModelConfig) -> str:
  """The first family whose architecture can hold `cfg`, or an error listing what differs."""
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
