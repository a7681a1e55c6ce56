"""The config's checks, each section by the module that reads it (bigflax/config.py, run.check)."""

import dataclasses
import subprocess
import sys

import jax
import pytest

from bigflax import config as config_lib, presets, run
from bigflax.config import ModelConfig, base
from bigflax.errors import ConfigError, UserError
from bigflax.model import Transformer, abstract_params
from conftest import REPO


@pytest.mark.parametrize("overrides, message", [
    ({"steps": 0}, "config.steps must be a positive integer, got 0"),
    ({"eval_batches": -1}, "config.eval_batches must be >= 0"),
    ({"checkpoint_every": 10, "keep_every": 15}, "config.keep_every=15 must be a multiple of "
                                                 "config.checkpoint_every=10"),
    ({"profile_steps": "5"}, "config.profile_steps='5' must be 'A,B'"),
    ({"sample.top_p": 0.0}, r"config.sample.top_p must be in \(0, 1\]"),
    ({"sample.temperature": -1.0}, "config.sample.temperature must be >= 0"),
    ({"model.embed_dim": 30}, "config.model.embed_dim=30 is not divisible by "
                              "config.model.num_heads=4"),
    ({"model.num_kv_heads": 3}, "config.model.num_kv_heads=3 must divide"),
    ({"model.dropout": 1.0}, r"config.model.dropout must be in \[0, 1\)"),
    ({"model.norm": "batchnorm"}, "config.model.norm='batchnorm' is unknown; choose one of "
                                  r"\['layernorm', 'rmsnorm'\]"),
    ({"model.positions": "alibi"}, "config.model.positions='alibi' is unknown"),
    ({"data.tokenizer": "bpe"}, "config.data.tokenizer='bpe' is unknown"),
    ({"data.val_fraction": 1.0}, r"config.data.val_fraction must be in \(0, 1\)"),
    ({"optimizer.name": "lion"}, "config.optimizer.name='lion' is unknown"),
    ({"optimizer.warmup_steps": 1200}, "the cosine schedule decays over 1200 steps"),
    ({"mesh.rules": (("batch", "model"),)}, "maps 'batch' to 'model', which is not a mesh axis"),
])
def test_each_bad_value_is_named_with_its_field(overrides, message):
  config = base()
  config.update_from_flattened_dict(overrides)
  with pytest.raises(UserError, match=message):  # ConfigError, or ShardingError for the mesh
    run.check(config)


def test_the_base_config_passes_and_model_defaults_come_from_model_config():
  run.check(config_lib.get_config())
  defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
  finetune = {name: defaults.pop(name) for name in config_lib.FINETUNE_FIELDS}
  assert base().model.to_dict() == defaults
  assert {name: base().finetune[name] for name in finetune} == finetune
  assert ModelConfig().mlp_dim == 4 * ModelConfig().embed_dim  # 0 resolves to 4 × width


def test_model_config_checks_itself_when_built_directly():
  with pytest.raises(ConfigError, match="num_heads"):
    ModelConfig(embed_dim=30)


def test_reading_the_config_loads_no_jax_or_tfds():
  code = ("import sys; import bigflax.config as c; c.get_config(); "
          "print(sorted(m for m in ('jax', 'flax', 'tensorflow_datasets', 'grain') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"


# Published parameter counts: GPT-2 small with tied embeddings (HF gpt2: 124,439,808) and
# Llama-2-7B (Meta's model card rounds it to 7B; the checkpoint holds 6,738,415,616).
@pytest.mark.parametrize("name, count", [("gpt2_124m", 124_439_808),
                                         ("llama2_7b", 6_738_415_616)])
def test_preset_parameter_counts_equal_the_published_ones(name, count):
  config = base()
  presets.apply(name, config)
  model = Transformer(ModelConfig.from_config(config.model))
  params = abstract_params(model, 8)
  assert sum(x.size for x in jax.tree.leaves(params)) == count
