"""One config, many meshes: data, FSDP and tensor parallelism give the 1-device numbers on 8
simulated CPU devices, hold the shards they should, and refuse what cannot split evenly."""

import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from bigflax import sharding, train
from bigflax.config import DEFAULT_RULES
from bigflax.rundir import read_metrics
from conftest import REPO, run_bigflax, tiny_config

# 8 heads of 4 dims, MLP 128 and the vocabulary (the corpus's 40 characters) divide by tensor=8.
SHARDABLE = {"model.num_heads": 8, "model.embed_dim": 32, "optimizer.warmup_steps": 0,
             "optimizer.schedule": "constant", "steps": 3}
MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 8), "mixed": (2, 2, 2)}


def mesh_overrides(shape):
  return dict(zip(("mesh.data", "mesh.fsdp", "mesh.tensor"), shape))


def make_trainer(corpus_file, shape=(1, 1, 1), **overrides):
  config = tiny_config(corpus_file, **{**SHARDABLE, **mesh_overrides(shape), **overrides})
  return train.Trainer(config, devices=jax.devices()[:math.prod(shape)])


def shard_shapes(array):
  return {tuple(s.data.shape) for s in array.addressable_shards}


def params_by_name(trainer):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(trainer.state.params)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n"
                          for i in range(800)))  # 40 distinct characters
  return path


@pytest.fixture(scope="module")
def reference(corpus):
  """The 1-device run: three steps' losses and the params after them."""
  trainer = make_trainer(corpus)
  losses = [float(trainer.step(i)["loss"]) for i in range(3)]
  return losses, jax.tree.map(np.asarray, trainer.state.params)


@pytest.mark.slow
@pytest.mark.parametrize("shape", MESHES.values(), ids=MESHES.keys())
def test_every_mesh_reproduces_the_one_device_run(corpus, reference, shape):
  trainer = make_trainer(corpus, shape)
  assert dict(trainer.mesh.shape) == dict(zip(sharding.MESH_AXES, shape))
  losses = [float(trainer.step(i)["loss"]) for i in range(3)]
  np.testing.assert_allclose(losses, reference[0], atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=1e-4),
               trainer.state.params, reference[1])


def test_fsdp_gives_each_device_an_eighth_of_every_sharded_param(corpus):
  trainer = make_trainer(corpus, MESHES["fsdp"])
  state, shardings = trainer.state, trainer.run.state_shardings
  # Sharded from birth: every leaf already lives in the sharding derived from its logical axes.
  for leaf, expected in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(expected, leaf.ndim)
  params = params_by_name(trainer)
  split = [name for name, p in params.items() if "fsdp" in jax.tree.leaves(tuple(p.sharding.spec))]
  # Everything with an `embed` dimension: all but the biases of the q/k/v heads and MLP hidden.
  assert set(params) - set(split) == {f"['block_{i}']['{module}']['{name}']['bias']"
                                      for i in range(2) for module, name in (
                                          ("attn", "query"), ("attn", "key"), ("attn", "value"),
                                          ("mlp", "up"))}
  for name in split:
    p = params[name]
    assert len(p.addressable_shards) == 8
    assert all(s.data.size * 8 == p.size for s in p.addressable_shards), name
  assert shard_shapes(params["['block_0']['mlp']['up']['kernel']"]) == {(4, 128)}
  vocab = trainer.config.model.vocab_size
  assert shard_shapes(params["['token_embed']['embedding']"]) == {(vocab, 4)}
  # Adam's moments (mu, nu) follow their params.
  moments = [(name, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
             for name in params if jax.tree_util.keystr(path).endswith(name)]
  assert len(moments) == 2 * len(params)
  assert all(leaf.sharding == params[name].sharding for name, leaf in moments)


def test_tensor_parallelism_splits_heads_and_mlp_hidden(corpus):
  trainer = make_trainer(corpus, MESHES["tensor"])
  params, vocab = params_by_name(trainer), trainer.config.model.vocab_size
  expected = {  # full shape → one device's shard
      "['block_0']['attn']['query']['kernel']": {(32, 1, 4)},  # [embed, heads, head_dim]
      "['block_0']['attn']['value']['bias']": {(1, 4)},
      "['block_0']['attn']['out']['kernel']": {(1, 4, 32)},  # [heads, head_dim, embed]
      "['block_0']['mlp']['up']['kernel']": {(32, 16)},  # [embed, mlp]
      "['block_0']['mlp']['down']['kernel']": {(16, 32)},  # [mlp, embed]
      "['token_embed']['embedding']": {(vocab // 8, 32)},  # [vocab, embed]
      "['position_embed']['embedding']": {(16, 32)},  # [length, embed]: replicated
  }
  assert {name: shard_shapes(params[name]) for name in expected} == expected


def test_the_batch_is_split_over_data_and_fsdp(corpus):
  trainer = make_trainer(corpus, MESHES["mixed"])
  batch = trainer.batch(0, 0, 8)
  assert shard_shapes(batch["inputs"]) == {(2, 16)}  # 8 rows over data × fsdp = 4, length whole
  assert sharding.process_rows(trainer.run.batch_sharding, 8) == slice(0, 8)  # one process: all


@pytest.mark.slow
def test_gradient_accumulation_on_a_sharded_mesh_matches_one_big_batch(corpus):
  trainer = make_trainer(corpus, MESHES["mixed"], batch_size=16, grad_accum_steps=2)
  whole = make_trainer(corpus, MESHES["mixed"], batch_size=16)
  for i in range(2):
    np.testing.assert_allclose(float(trainer.step(i)["loss"]), float(whole.step(i)["loss"]),
                               atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
               trainer.state.params, whole.state.params)


def test_the_mesh_must_use_every_device(corpus):
  with pytest.raises(sharding.ShardingError, match=r"config.mesh \(data, fsdp, tensor\) = "
                     r"\(2, 2, 1\) uses 4 devices but 8 are present"):
    train.Trainer(tiny_config(corpus, **SHARDABLE, **mesh_overrides((2, 2, 1))),
                  devices=jax.devices())
  with pytest.raises(sharding.ShardingError, match="at most one of config.mesh"):
    sharding.mesh_shape(ml_collections.ConfigDict({"data": -1, "fsdp": -1, "tensor": 1}), 8)
  assert sharding.mesh_shape(ml_collections.ConfigDict({"data": 2, "fsdp": -1, "tensor": 2}),
                             8) == (2, 2, 2)


@pytest.mark.parametrize("overrides, message", [
    ({"model.num_heads": 4}, r"parameter \['block_0'\]\['attn'\]\['key'\]\['\w+'\] has dimension "
     r"\d of size 4, not divisible by config.mesh.tensor = 8"),
    ({"batch_size": 4, "mesh.data": 8, "mesh.tensor": 1}, r"config.batch_size=4 must split into "
     r".* divisible by config.mesh.data × config.mesh.fsdp = 8; .*config.mesh.tensor > 1 "
     r"splits heads instead of rows"),
    ({"mesh.rules": tuple(r for r in DEFAULT_RULES if r[0] != "mlp")},
     r"logical axis 'mlp' has no rule; add \('mlp', <mesh axes or None>\) to config.mesh.rules"),
    ({"mesh.rules": DEFAULT_RULES + (("heads", "model"),)},
     r"config.mesh.rules maps 'heads' to 'model', which is not a mesh axis"),
])
def test_what_cannot_split_names_the_config_field(corpus, overrides, message):
  overrides = {"mesh.tensor": 8, **overrides}
  with pytest.raises(sharding.ShardingError, match=message):
    make_trainer(corpus, (overrides.pop("mesh.data", 1), 1, overrides.pop("mesh.tensor")),
                 **overrides)


def _cli(*args, devices):
  return run_bigflax("train", *args, devices=devices)


@pytest.mark.slow
def test_the_cli_on_a_2x2x2_mesh_logs_the_one_device_losses(tmp_path, corpus):
  common = [f"--config={REPO}/experiments/shakespeare_char.py", f"--config.data.path={corpus}",
            "--config.sample.prompt=line", "--config.steps=3", "--config.log_every=1",
            "--config.eval_every=3", "--config.eval_batches=1", "--config.batch_size=8",
            "--config.model.block_size=16", "--config.model.num_layers=1",
            "--config.model.num_heads=2", "--config.model.embed_dim=16",
            "--config.sample.max_new_tokens=4"]
  _cli(*common, f"--workdir={tmp_path / 'one'}", "--config.mesh.data=1", devices=1)
  mesh = _cli(*common, f"--workdir={tmp_path / 'mesh'}", "--config.mesh.data=2",
              "--config.mesh.fsdp=2", "--config.mesh.tensor=2", devices=8)
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu devices" in mesh.stdout
  one, eight = (read_metrics(tmp_path / run) for run in ("one", "mesh"))
  assert [r["step"] for r in one] == [r["step"] for r in eight] == [1, 2, 3, 3]
  for a, b in zip(one, eight):
    for key in ("loss", "eval_loss"):
      if key in a:
        np.testing.assert_allclose(a[key], b[key], atol=1e-5)
  assert json.loads((tmp_path / "mesh" / "config.json").read_text())["mesh"]["tensor"] == 2
