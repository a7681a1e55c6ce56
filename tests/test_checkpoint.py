"""Checkpoints: resume (bit-identical, onto other meshes), preemption, crash safety, numerics guard,
exports, and the errors a broken or mismatched checkpoint gives."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from bigflax import checkpoint, config as config_lib, data, rundir, train
from bigflax.config import ConfigError, validate
from bigflax.rundir import read_metrics
from conftest import REPO, bigflax_env, tiny_config

ONE_DEVICE = jax.devices()[:1]

# The `bigflax` CLI with one test hook: after step STOP_AT (argv[1]) the process sends itself
# SIGNAL (argv[2]), as a scheduler would, or is SIGKILLed right after checkpoint step KILL_AT
# started saving (argv[1] = "kill:KILL_AT"), i.e. in the middle of the async write.
HOOKED_CLI = """
import os, signal, sys
from bigflax import checkpoint, cli, train
when, signum = sys.argv.pop(1), getattr(signal, sys.argv.pop(1))
if when.startswith("kill:"):
  save = checkpoint.Checkpointer.save
  def save_then_die(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == int(when[5:]):
      os.kill(os.getpid(), signum)
  checkpoint.Checkpointer.save = save_then_die
else:
  step = train.Trainer.step
  def step_then_signal(self, index):
    metrics = step(self, index)
    if index + 1 == int(when):
      os.kill(os.getpid(), signum)
    return metrics
  train.Trainer.step = step_then_signal
sys.argv[0] = "bigflax"
cli.main()
"""


def cli_flags(corpus_file, workdir, **fields):
  tiny = {"data.path": corpus_file, "data.tokenizer": "char", "model.block_size": 16,
          "model.num_layers": 2, "model.num_heads": 2, "model.embed_dim": 32, "batch_size": 4,
          "log_every": 1, "eval_every": 10, "eval_batches": 2, "optimizer.warmup_steps": 1,
          "sample.max_new_tokens": 4, **fields}
  return ["train", *(f"--config.{k}={v}" for k, v in tiny.items()), f"--workdir={workdir}"]


def start_cli(args, hook=(), output=subprocess.PIPE, devices=1) -> subprocess.Popen:
  command = [sys.executable, "-c", HOOKED_CLI, *hook] if hook else [sys.executable, "-m",
                                                                   "bigflax"]
  return subprocess.Popen([*command, *args], cwd=REPO, env=bigflax_env(devices), stdout=output,
                          stderr=output, text=True)


def run_cli(args, hook=()) -> subprocess.CompletedProcess:
  process = start_cli(args, hook)
  stdout, stderr = process.communicate(timeout=300)
  return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]


@pytest.mark.slow
def test_sigterm_then_resume_continues_bit_identically(tmp_path, corpus_file):
  whole, interrupted = tmp_path / "whole", tmp_path / "interrupted"
  args = dict(steps=30, checkpoint_every=5, **{"model.dropout": 0.1})
  log = open(tmp_path / "whole.log", "w")  # noqa: SIM115 - closed below
  reference_run = start_cli(cli_flags(corpus_file, whole, **args), output=log)  # in parallel
  first = run_cli(cli_flags(corpus_file, interrupted, **args), hook=("11", "SIGTERM"))
  assert first.returncode == 0, first.stderr[-2000:]
  assert "stopped by a preemption signal after step 11" in first.stdout
  assert "sample" not in first.stdout  # preempted: no export, no sample
  second = run_cli(cli_flags(corpus_file, interrupted, **args), hook=("23", "SIGINT"))
  assert second.returncode == 0, second.stderr[-2000:]
  assert "resuming from step 11 of 30" in second.stdout
  assert "stopped by a preemption signal after step 23" in second.stdout
  third = run_cli(cli_flags(corpus_file, interrupted, **args))
  assert third.returncode == 0, third.stderr[-2000:]
  assert "resuming from step 23 of 30" in third.stdout
  assert reference_run.wait(timeout=300) == 0, (tmp_path / "whole.log").read_text()[-2000:]
  log.close()

  reference = losses(whole)
  assert [step for step, _ in reference] == list(range(1, 31))
  assert losses(interrupted) == reference  # same steps, once each, bitwise equal losses
  evals = lambda w: [(r["step"], r["eval_loss"]) for r in read_metrics(w) if "eval_loss" in r]
  assert evals(interrupted) == evals(whole)
  assert sorted(os.listdir(interrupted / "checkpoints")) == ["23", "25", "30"]  # the latest 3


@pytest.mark.slow
def test_hosts_agree_on_the_step_to_save_when_one_is_preempted(tmp_path, corpus_file):
  """2 processes × 4 devices; SIGTERM reaches process 1 only. JAX's preemption service (not our
  handler, which stays off with several processes) picks one step at which both save and stop."""
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  args = cli_flags(corpus_file, tmp_path, steps=12, checkpoint_every=100, eval_every=100,
                   batch_size=8, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                    "distributed.coordinator_address": address,
                                    "distributed.num_processes": 2})
  hosts = [start_cli([*args, f"--config.distributed.process_id={i}"], devices=4,
                     hook=("3", "SIGTERM") if i else ()) for i in range(2)]
  results = [process.communicate(timeout=300) for process in hosts]
  for process, (_, stderr) in zip(hosts, results):
    assert process.returncode == 0, stderr[-2000:]
  saved = os.listdir(tmp_path / "checkpoints")
  assert len(saved) == 1 and int(saved[0]) > 3  # one step, after the notice, for both hosts
  assert f"stopped by a preemption signal after step {saved[0]}" in results[0][0]
  assert [step for step, _ in losses(tmp_path)] == list(range(1, int(saved[0]) + 1))


@pytest.mark.slow
def test_sigkill_during_an_async_save_keeps_the_previous_checkpoint(tmp_path, corpus_file):
  workdir = tmp_path / "run"
  # ~1.6M params: Adam state and params take a moment to write
  args = cli_flags(corpus_file, workdir, steps=6, checkpoint_every=2, eval_every=100,
                   **{"model.embed_dim": 256})
  killed = run_cli(args, hook=("kill:4", "SIGKILL"))
  assert killed.returncode == -9
  entries = sorted(os.listdir(workdir / "checkpoints"))
  assert "2" in entries and "4" not in entries
  assert any(e.startswith("4.orbax-checkpoint-tmp") for e in entries), entries  # died mid-save
  assert [step for step, _ in losses(workdir)] == [1, 2, 3, 4]

  resumed = run_cli(args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert "resuming from step 2 of 6" in resumed.stdout
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]  # leftovers removed
  assert [step for step, _ in losses(workdir)] == [1, 2, 3, 4, 5, 6]


def reshard_config(corpus_file, **mesh):
  mesh = {"mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, **mesh}
  # vocab 64 (≥ the corpus's characters) splits over tensor=2
  return tiny_config(corpus_file, steps=6, **{"model.vocab_size": 64, **mesh})


@pytest.mark.slow
def test_restore_onto_other_meshes_continues_the_run(tmp_path, corpus_file):
  source = train.Trainer(reshard_config(corpus_file, **{"mesh.data": 8}), devices=jax.devices())
  for i in range(2):
    source.step(i)
  saver = checkpoint.Checkpointer(tmp_path, source.config)
  source.save(saver, 2)
  saver.close()
  expected = [float(source.step(i)["loss"]) for i in range(2, 4)]

  for mesh, devices in (({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}, jax.devices()),
                        ({}, ONE_DEVICE)):
    target = train.Trainer(reshard_config(corpus_file, **mesh), devices=devices)
    restorer = checkpoint.Checkpointer(tmp_path, target.config)
    target.restore(restorer, 2)
    restorer.close()
    assert target.data_state()["step"] == 2
    for array, want in zip(jax.tree.leaves(target.state), jax.tree.leaves(target.run.state_shardings)):
      assert array.sharding == want  # restored straight into the new layout
    got = [float(target.step(i)["loss"]) for i in range(2, 4)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def poison_step(monkeypatch, at_index):
  """Batch `at_index` gets a NaN loss mask: its loss and gradient are NaN."""
  batch = train.Trainer.local_batch

  def poisoned(self, split, index, batch_size=None):
    b = dict(batch(self, split, index, batch_size))
    if split == data.TRAIN and index == at_index:
      b["loss_mask"] = b["loss_mask"] * np.nan
    return b
  monkeypatch.setattr(train.Trainer, "local_batch", poisoned)


def test_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, corpus_file, monkeypatch):
  poison_step(monkeypatch, at_index=2)
  with pytest.raises(checkpoint.NonFiniteError, match="step 3: loss nan, grad_norm nan"):
    train.train(tiny_config(corpus_file, steps=6, checkpoint_every=2, log_every=3), tmp_path,
                devices=ONE_DEVICE)
  assert os.listdir(tmp_path / "checkpoints") == ["2"]  # nothing after the NaN was saved


def test_skip_nonfinite_skips_and_counts_the_update(corpus_file, monkeypatch):
  poison_step(monkeypatch, at_index=1)
  trainer = train.Trainer(tiny_config(corpus_file, skip_nonfinite=True), devices=ONE_DEVICE)
  trainer.step(0)
  before = jax.device_get(trainer.state.params)
  skipped = trainer.step(1)
  assert np.isnan(skipped["loss"]) and int(skipped["skipped_updates"]) == 1
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))  # the update was not applied
  after = trainer.step(2)
  assert np.isfinite(after["loss"]) and int(after["skipped_updates"]) == 1


def test_a_nonfinite_state_is_never_checkpointed(tmp_path, corpus_file):
  trainer = train.Trainer(tiny_config(corpus_file), devices=ONE_DEVICE)
  leaves, tree = jax.tree.flatten(trainer.state.params)
  leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(np.nan)  # one value in one leaf
  trainer.state = trainer.state.replace(params=jax.tree.unflatten(tree, leaves))
  saver = checkpoint.Checkpointer(tmp_path, trainer.config)
  with pytest.raises(checkpoint.NonFiniteError, match="state at step 1 holds NaN or Inf"):
    trainer.save(saver, 1)
  saver.close()
  assert saver.latest_step() is None


def run_config(corpus_file, steps=4, **overrides):
  return tiny_config(corpus_file, steps=steps, checkpoint_every=2, eval_every=100,
                     **{"optimizer.schedule": "constant", "sample.max_new_tokens": 2,
                        **overrides})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4; tests work on copies (`run_copy`)."""
  root = tmp_path_factory.mktemp("finished")
  corpus = root / "corpus.txt"
  corpus.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 7}.\n"
                            for i in range(800)))
  train.train(run_config(corpus), root / "run", devices=ONE_DEVICE)
  return root


@pytest.fixture
def run_copy(finished_run, tmp_path):
  shutil.copytree(finished_run / "run", tmp_path / "run")
  return tmp_path / "run", finished_run / "corpus.txt"


def test_steps_logged_after_the_last_checkpoint_are_recomputed_once(run_copy):
  workdir, corpus = run_copy
  first = losses(workdir)
  # As if the run died after logging step 4, before its checkpoint was committed.
  shutil.rmtree(workdir / "checkpoints" / "4")
  lines = []
  train.train(run_config(corpus, steps=6), workdir, devices=ONE_DEVICE, print_fn=lines.append)
  assert any("resuming from step 2 of 6" in line for line in lines)
  again = losses(workdir)
  assert [step for step, _ in again] == [1, 2, 3, 4, 5, 6]
  assert again[:4] == first  # steps 3 and 4 recomputed bit for bit, and logged once


def test_export_loads_through_the_python_api(run_copy):
  workdir, corpus = run_copy
  # README's snippet:
  config, model, params, tokenizer = rundir.load_export(workdir)
  logits = model.apply({"params": params}, np.array([tokenizer.encode("line 1")]))
  assert logits.shape == (1, 6, config.model.vocab_size)
  trainer = train.Trainer(run_config(corpus), devices=ONE_DEVICE)
  saver = checkpoint.Checkpointer(workdir, trainer.config)
  trainer.restore(saver, 4)  # the export holds exactly the final checkpoint's params
  saver.close()
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(trainer.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conflicting_config_is_refused_with_the_differences(run_copy):
  workdir, corpus = run_copy
  changed = run_config(corpus, steps=8, batch_size=4, **{
      "model.embed_dim": 16, "optimizer.learning_rate": 1e-3, "data.prefetch": 0,
      "model.remat": "full"})
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train(changed, workdir, devices=ONE_DEVICE)
  message = str(error.value)
  assert "config.batch_size: 8 in the checkpoint, 4 now" in message
  assert "config.model.embed_dim: 32 in the checkpoint, 16 now" in message
  for free in ("learning_rate", "steps", "prefetch", "remat"):  # these may change
    assert free not in message


@pytest.mark.slow
def test_arrays_of_another_shape_are_listed(run_copy, tmp_path):
  workdir, corpus = run_copy
  other = train.Trainer(run_config(corpus, **{"model.embed_dim": 16}), devices=ONE_DEVICE)
  saver = checkpoint.Checkpointer(tmp_path / "other", other.config)
  other.save(saver, 4)
  saver.close()
  rundir.export_params(tmp_path / "other", other.state.params)
  for item in ("params", "checkpoints/4/state"):  # e.g. copied from the wrong run
    shutil.rmtree(workdir / item)
    shutil.copytree(tmp_path / "other" / item, workdir / item)
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"params was written by a model of a different shape.*\n(  .*\n)*"
                           r"  \S+: \(16,\) in the checkpoint, \(32,\) in the model"):
    rundir.load_export(workdir)
  with pytest.raises(checkpoint.CheckpointError, match=r"opt_state/.*: \(16,\) in the checkpoint"):
    train.train(run_config(corpus, steps=6), workdir, devices=ONE_DEVICE)


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_named_and_an_older_one_offered(run_copy):
  workdir, corpus = run_copy
  broken = workdir / "checkpoints" / "4"
  (broken / "state" / "manifest.ocdbt").unlink()
  with pytest.raises(checkpoint.CheckpointError) as error:
    train.train(run_config(corpus, steps=6), workdir, devices=ONE_DEVICE)
  assert f"checkpoint {broken} is corrupted or incomplete" in str(error.value)
  assert f"mv {broken} {broken}.broken" in str(error.value)
  assert "resume from step 2" in str(error.value)
  broken.rename(f"{broken}.broken")  # what the message says to do
  trainer = train.Trainer(run_config(corpus, steps=6), devices=ONE_DEVICE)
  saver = checkpoint.Checkpointer(workdir, trainer.config)
  assert saver.latest_step() == 2
  trainer.restore(saver, 2)
  assert trainer.data_state()["step"] == 2
  saver.close()


def test_keep_every_must_fall_on_checkpoints(corpus_file):
  with pytest.raises(ConfigError, match="config.keep_every=15 must be a multiple of "
                                        "config.checkpoint_every=10"):
    validate(tiny_config(corpus_file, checkpoint_every=10, keep_every=15))


def test_a_field_added_since_the_checkpoint_counts_as_its_default():
  current = json.loads(json.dumps(config_lib.base().to_dict()))
  stored = json.loads(json.dumps(config_lib.base().to_dict()))
  del stored["model"]["parametrization"]  # a checkpoint written before the field existed
  assert checkpoint.config_differences(stored, current) == []
  current["model"]["parametrization"] = "mup"
  assert checkpoint.config_differences(stored, current) == [
      "config.model.parametrization: 'standard' in the checkpoint, 'mup' now"]
