"""config.init_from: a run that starts from another run's export or checkpoint, or from a Hugging
Face model, holds exactly those params at step 0, on any mesh, and refuses what cannot work."""

import hashlib
import json
import pathlib

import jax
import numpy as np
import pytest

from bigflax import checkpoint, pretrained, rundir, train
from bigflax.data.tokenizers import HFTokenizer
from bigflax.errors import CheckpointError, ConfigError, DataError
from bigflax.model import unstack_layers
from conftest import run_bigflax, tiny_config, write_corpus

ONE_DEVICE = jax.devices()[:1]
# The source's MLP width is no default, so a run that does not set it shows where it came from.
SOURCE = {"steps": 4, "checkpoint_every": 2, "eval_every": 2, "model.mlp_dim": 48}


def quiet(*args):
  del args


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp("corpus") / "corpus.txt")


@pytest.fixture(scope="module")
def source(corpus, tmp_path_factory):
  """A finished run (params/ export, checkpoints 2 and 4) and its final eval."""
  workdir = tmp_path_factory.mktemp("source")
  final = train.train(tiny_config(corpus, **SOURCE), str(workdir), print_fn=quiet,
                      devices=ONE_DEVICE)
  return workdir, final


def snapshot(directory: pathlib.Path) -> dict:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


def numpy(tree):
  return jax.tree.map(np.asarray, tree)


def test_a_run_from_an_export_starts_at_the_source_final_eval_loss(corpus, source):
  workdir, final = source
  trainer = train.Trainer(tiny_config(corpus, init_from=str(workdir)), devices=ONE_DEVICE)
  assert trainer.config.model.mlp_dim == 48  # the model fields came from the source
  assert trainer.config.data.charset == rundir.read_config(workdir).data.charset
  assert int(trainer.state.step) == 0
  moments = [x for x in jax.tree.leaves(trainer.state.opt_state) if x.ndim > 0]
  assert moments and not any(np.any(np.asarray(x)) for x in moments)  # a fresh optimizer
  _, _, exported, _ = rundir.load_run(workdir)
  jax.tree.map(np.testing.assert_array_equal, numpy(trainer.state.params), numpy(exported))
  assert trainer.evaluate()["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-6, abs=0)
  first = float(trainer.step(0)["loss"])  # and it trains on from there
  assert np.isfinite(first) and int(trainer.state.step) == 1


def test_a_run_from_a_checkpoint_step_starts_at_that_steps_eval_loss(corpus, source):
  workdir, _ = source
  at_2 = next(r["eval_loss"] for r in rundir.read_metrics(workdir)
              if r["step"] == 2 and "eval_loss" in r)
  trainer = train.Trainer(tiny_config(corpus, init_from=f"{workdir}:2"), devices=ONE_DEVICE)
  assert int(trainer.state.step) == 0
  assert trainer.evaluate()["eval_loss"] == pytest.approx(at_2, rel=1e-6, abs=0)


def test_init_from_lands_sharded_on_an_fsdp_tensor_mesh_in_the_scanned_layout(
    corpus, source, tmp_path):
  workdir, final = source
  mesh = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
  trainer = train.Trainer(
      tiny_config(corpus, init_from=str(workdir), **mesh, **{"model.scan_layers": True}),
      devices=jax.devices())
  params = trainer.state.params
  assert "blocks" in params and "block_0" not in params
  targets = trainer.run.state_shardings.params
  for leaf, target in zip(jax.tree.leaves(params), jax.tree.leaves(targets)):
    assert leaf.sharding.is_equivalent_to(target, leaf.ndim)
  split = [x for x in jax.tree.leaves(params)
           if {s.data.shape for s in x.addressable_shards} != {x.shape}]
  assert len(split) >= 8  # FSDP and tensor shards, not copies
  assert trainer.evaluate()["eval_loss"] == pytest.approx(final["eval_loss"], rel=1e-5, abs=0)

  # Back from the scanned layout onto one device, unscanned: the same arrays.
  rundir.write_config(trainer.config, tmp_path)
  rundir.export_params(tmp_path, params)
  one = train.Trainer(tiny_config(corpus, init_from=str(workdir)), devices=ONE_DEVICE)
  loaded = pretrained.load_params(str(tmp_path), one.run)  # every leaf from the source
  jax.tree.map(np.testing.assert_array_equal, numpy(loaded), numpy(unstack_layers(params)))


@pytest.mark.slow
def test_resuming_reads_the_runs_own_checkpoint_not_the_source(corpus, source, tmp_path):
  workdir, _ = source
  config = tiny_config(corpus, init_from=str(workdir), steps=2, checkpoint_every=2)
  train.train(config, str(tmp_path), print_fn=quiet, devices=ONE_DEVICE)
  trainer = train.Trainer(config, devices=ONE_DEVICE)  # holds the source's params
  checkpointer = checkpoint.Checkpointer(str(tmp_path), trainer.config)
  try:
    assert train._resume(trainer, checkpointer, str(tmp_path), quiet) == 2
  finally:
    checkpointer.close()
  assert int(trainer.state.step) == 2
  _, _, own, _ = rundir.load_run(tmp_path)
  _, _, theirs, _ = rundir.load_run(workdir)
  jax.tree.map(np.testing.assert_array_equal, numpy(trainer.state.params), numpy(own))
  assert not np.array_equal(np.asarray(trainer.state.params["token_embed"]["embedding"]),
                            np.asarray(theirs["token_embed"]["embedding"]))


def test_a_resumed_run_does_not_read_the_source_params_again(corpus, source, tmp_path,
                                                              monkeypatch):
  workdir, _ = source
  config = tiny_config(corpus, init_from=str(workdir), steps=2, checkpoint_every=2)
  train.train(config, str(tmp_path), print_fn=quiet, devices=ONE_DEVICE)

  def refuse(*args, **kwargs):
    raise AssertionError("a resumed run read config.init_from's params")
  monkeypatch.setattr(pretrained, "load_params", refuse)
  config.steps = 3
  train.train(config, str(tmp_path), print_fn=quiet, devices=ONE_DEVICE)
  assert [r["step"] for r in rundir.read_metrics(tmp_path) if "eval_loss" in r][-1] == 3


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_a_run_from_a_hugging_face_gpt2_gives_its_logits(corpus, tmp_path, scan_layers):
  import torch  # noqa: PLC0415 - the test extra has it; never skipped
  from test_interop import hf_logits, save_hf_gpt2_with_tokenizer
  model, tokenizer = save_hf_gpt2_with_tokenizer(tmp_path, n_positions=64)
  # block_size 16 of the model's 64 positions: the first rows of its position table.
  config = tiny_config(corpus, init_from=str(tmp_path),
                       **{"data.tokenizer": "byte", "model.num_heads": 4,
                          "model.scan_layers": scan_layers})
  trainer = train.Trainer(config, devices=ONE_DEVICE)
  assert trainer.config.data.tokenizer == "hf"
  assert isinstance(trainer.corpus.tokenizer, HFTokenizer)
  assert trainer.config.model.vocab_size == len(tokenizer) and int(trainer.state.step) == 0
  tokens = np.asarray(tokenizer("def greet(name):\n    return")["input_ids"])[None]
  assert tokens.shape[1] <= 16
  ours = np.asarray(trainer.run.model.apply({"params": trainer.state.params}, tokens))
  expected = hf_logits(model, tokens)
  assert torch is not None and np.abs(expected).max() > 0.1
  assert np.abs(ours - expected).max() <= 1e-4


BAD = {
    "nothing there": (lambda w, t: {"init_from": str(t / "missing")}, ConfigError,
                      r"missing does not exist; give a bigflax run directory"),
    "no such step": (lambda w, t: {"init_from": f"{w}:3"}, CheckpointError,
                     r"has no checkpoint of step 3; its checkpoints are steps \[2, 4\]"),
    "wider model": (lambda w, t: {"init_from": str(w), "model.embed_dim": 64}, ConfigError,
                    r"config.model.embed_dim=64 differs from the 32 of the model in "
                    r"config.init_from=.*drop the --config.model.embed_dim override"),
    "other tokenizer": (lambda w, t: {"init_from": str(w), "data.tokenizer": "sentencepiece"},
                        ConfigError, r"config.data.tokenizer='sentencepiece' differs from the "
                        r"'char'"),
    "neither kind": (lambda w, t: {"init_from": str(t)}, ConfigError,
                     r"is neither kind of model directory"),
    "no tokenizer.json": (lambda w, t: {"data.tokenizer": "hf", "data.tokenizer_model": str(t)},
                          DataError, r"holds no tokenizer.json; point it at a Hugging Face"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_init_from_is_one_line_and_leaves_the_source_alone(corpus, source, tmp_path, case):
  workdir, _ = source
  before = snapshot(workdir)
  overrides, error, message = BAD[case]
  with pytest.raises(error, match=message) as raised:
    train.Trainer(tiny_config(corpus, **overrides(workdir, tmp_path)), devices=ONE_DEVICE)
  assert "\n" not in str(raised.value)
  assert snapshot(workdir) == before


def test_a_hugging_face_model_without_its_tokenizer_is_refused(corpus, tmp_path):
  from test_interop import save_hf_gpt2_with_tokenizer
  save_hf_gpt2_with_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").unlink()
  config = tiny_config(corpus, init_from=str(tmp_path),
                       **{"data.tokenizer": "byte", "model.num_heads": 4})
  with pytest.raises(ConfigError, match=r"holds no tokenizer.json, so its model's tokenizer is "
                     r"unknown; copy the model's tokenizer files"):
    pretrained.apply(config)


@pytest.mark.slow
def test_the_cli_refuses_bad_init_from_and_mismatched_tokenizers(corpus, source, tmp_path):
  workdir, _ = source
  before = snapshot(workdir)
  common = ("train", f"--config.data.path={corpus}", f"--workdir={tmp_path / 'new'}",
            "--config.steps=2")
  for flags, message in (([f"--config.init_from={workdir}:3"], "no checkpoint of step 3"),
                         ([f"--config.init_from={workdir}", "--config.model.embed_dim=64"],
                          "config.model.embed_dim=64 differs")):
    result = run_bigflax(*common, *flags, check=False)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
  assert snapshot(workdir) == before and not (tmp_path / "new" / "checkpoints").exists()



@pytest.mark.slow
def test_bigflax_sample_reads_a_converted_gpt2_and_refuses_a_foreign_tokenizer(tmp_path):
  from test_interop import _convert_hf_tool, save_hf_gpt2_with_tokenizer
  _, tokenizer = save_hf_gpt2_with_tokenizer(tmp_path / "hf")
  _convert_hf_tool().main(["to_bigflax", str(tmp_path / "hf"), str(tmp_path / "run")])
  result = run_bigflax("sample", f"--workdir={tmp_path / 'run'}", "--prompt=def greet",
                       "--temperature=0", "--max_new_tokens=8")
  assert result.stdout.startswith("def greet") and len(result.stdout.strip()) > len("def greet")

  config = json.loads(rundir.config_path(tmp_path / "run").read_text())
  config["data"].update(tokenizer="char", tokenizer_model="", charset="abcdefghij")
  rundir.config_path(tmp_path / "run").write_text(json.dumps(config))
  result = run_bigflax("sample", f"--workdir={tmp_path / 'run'}", check=False)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert (f"has {len(tokenizer)} ids but its tokenizer (data.tokenizer='char') has 10: not the "
          "model's own" in result.stderr)
