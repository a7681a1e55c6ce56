"""The run builder: one step for training, AOT compilation and benchmarks (bigflax/run.py)."""

import re

import jax
import pytest

from bigflax import aot, data, run, train
from bigflax.errors import ConfigError
from conftest import tiny_config

LLAMA = {"model.norm": "rmsnorm", "model.positions": "rope", "model.mlp": "swiglu",
         "model.use_bias": False, "model.tie_embeddings": False, "model.num_kv_heads": 1,
         "model.scan_layers": True, "model.remat": "full", "skip_nonfinite": True,
         "mesh.data": 4, "mesh.tensor": 1}  # one kv head does not split over tensor


@pytest.mark.parametrize("overrides", [{}, LLAMA], ids=["default", "llama_packed"])
def test_aot_lowers_exactly_the_step_the_trainer_runs(corpus_file, overrides):
  config = tiny_config(corpus_file, **{"data.tokenizer": "byte", "mesh.data": 2, "mesh.fsdp": 2,
                                       "mesh.tensor": 2, **overrides})
  assert config.data.batching == "packed"
  trainer = train.Trainer(config, devices=jax.devices())
  with trainer.run.activate():
    trained = trainer.run.train_step.lower(trainer.state, trainer.batch(data.TRAIN, 0),
                                           trainer.dropout_rng).as_text()
  _, lowered = aot.lower(trainer.config, jax.devices())
  text = lowered.as_text()
  assert text.split("\n", 3)[2].count("tensor<8x16xi32>") >= 4  # inputs, targets, ids, positions
  assert functions(text) == functions(trained)


def functions(module_text: str) -> set[str]:
  """A StableHLO module's distinct functions, private names without their numbers: JAX names,
  orders and deduplicates them (clip, clip_9, …) by what the process traced before."""
  numbered = re.compile(r"@(\w+?)_\d+\b")
  body = module_text.rstrip().removesuffix("}")  # the module's closing brace
  return {numbered.sub(r"@\1", f).strip() for f in body.split("func.func")[1:]}


def test_resolve_fills_a_copy_and_leaves_the_callers_config(corpus_file):
  config = tiny_config(corpus_file)
  tokenizer = data.load_corpus(config.data, config.model.block_size).tokenizer
  resolved = run.resolve(config, tokenizer)
  assert config.model.vocab_size == 0 and config.data.charset == ""
  assert resolved.model.vocab_size == 128 and resolved.data.charset == tokenizer.charset


def test_a_vocabulary_smaller_than_the_tokenizers_is_a_config_error(corpus_file):
  config = tiny_config(corpus_file, **{"data.tokenizer": "byte", "model.vocab_size": 200})
  with pytest.raises(ConfigError, match="config.model.vocab_size=200 is smaller than the "
                                        "tokenizer's 256 ids"):
    train.Trainer(config, devices=jax.devices()[:1])


def test_the_abstract_state_matches_the_created_one(corpus_file):
  trainer = train.Trainer(tiny_config(corpus_file), devices=jax.devices()[:1])
  for abstract, real in zip(jax.tree.leaves(trainer.run.abstract_state),
                            jax.tree.leaves(trainer.state)):
    assert (abstract.shape, abstract.dtype, abstract.sharding) == (real.shape, real.dtype,
                                                                   real.sharding)


def test_a_cpu_step_compiles_without_ynnpack_fusions(corpus_file):
  assert run.CPU_COMPILER_OPTIONS  # the jaxlib constraints.txt pins takes the option
  trainer = train.Trainer(tiny_config(corpus_file), devices=jax.devices()[:1])
  with trainer.run.activate():
    compiled = trainer.run.train_step.lower(trainer.state, trainer.batch(data.TRAIN, 0),
                                            trainer.dropout_rng).compile().as_text()
  default = jax.jit(lambda a, b: a @ b).lower(jax.numpy.ones((64, 64)), jax.numpy.ones((64, 64)))
  assert "__ynn_fusion" in default.compile().as_text()  # what the option turns off
  assert "__ynn_fusion" not in compiled and " dot(" in compiled
