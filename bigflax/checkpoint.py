"""Orbax checkpoints. A params-only export lives in WORKDIR/params for sampling and fine-tuning."""

import json
import pathlib

import flax.linen as nn
import jax
import ml_collections
import orbax.checkpoint as ocp

from bigflax import data
from bigflax.errors import UserError
from bigflax.model import ModelConfig, Transformer, abstract_params


def params_dir(workdir: str) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "params"


def export_params(workdir: str, params) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir(workdir), params, force=True)
    checkpointer.wait_until_finished()


def load_export(workdir: str):
  """(config, apply_fn, params, tokenizer) of a finished run, from config.json and the export."""
  config_path, path = pathlib.Path(workdir) / "config.json", params_dir(workdir)
  if not config_path.exists() or not path.exists():
    raise UserError(f"{workdir} holds no finished run (need config.json and params/); train "
                    f"one first with: bigflax train --workdir {workdir}")
  config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
  model = Transformer(ModelConfig.from_config(config.model))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nn.unbox(abstract_params(model, config.model.block_size)))
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path, abstract)
  return config, model.apply, params, data.make_tokenizer(config.data)
