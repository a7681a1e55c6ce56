"""End to end: the `bigflax` command as a user runs it, in a subprocess (1 CPU device)."""

import json
import os
import subprocess
import sys

import pytest

from bigflax.rundir import read_metrics
from conftest import REPO

TINY = ["--config.model.block_size=16", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.embed_dim=32", "--config.batch_size=4",
        "--config.eval_batches=2", "--config.optimizer.warmup_steps=1",
        "--config.sample.max_new_tokens=12"]


def bigflax(*args, cwd=REPO, check=True):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-m", "bigflax", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
  if check and result.returncode != 0:
    raise AssertionError(f"bigflax {' '.join(args)} failed:\n{result.stderr[-3000:]}")
  return result


def test_train_writes_run_files_then_sample_prints_text(tmp_path, corpus_file):
  workdir = tmp_path / "run"
  result = bigflax("train", f"--config.data.path={corpus_file}", "--config.data.tokenizer=char",
                   "--config.steps=6", "--config.log_every=2", "--config.eval_every=3", *TINY,
                   "--config.profile_steps=4,5", f"--workdir={workdir}")
  assert "eval_loss" in result.stderr + result.stdout
  assert "sample ('def ' →)" in result.stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["steps"] == 6 and config["data"]["path"] == str(corpus_file)
  assert config["model"]["vocab_size"] == 128 > len(config["data"]["charset"])  # padded
  records = read_metrics(workdir)
  train_records = [r for r in records if "loss" in r]
  eval_records = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in train_records] == [2, 4, 6]
  assert [r["step"] for r in eval_records] == [3, 6]
  for key in ("loss", "learning_rate", "tokens_per_sec", "mfu", "accuracy", "grad_norm"):
    assert all(key in r for r in train_records)
  assert all(r["tokens_per_sec"] > 0 and 0 < r["mfu"] < 1 for r in train_records)
  # The jax.profiler trace of steps 4-5, for TensorBoard/XProf and for Perfetto.
  assert list((workdir / "profile").rglob("*.xplane.pb"))
  assert list((workdir / "profile").rglob("perfetto_trace.json.gz"))
  assert list(workdir.glob("events.out.tfevents*"))
  assert (workdir / "params").is_dir()

  sample = bigflax("sample", f"--workdir={workdir}", "--prompt=line ", "--max_new_tokens=20",
                   "--temperature=0.9", "--top_k=5", "--top_p=0.9", "--seed=1")
  text = sample.stdout.rstrip("\n")
  assert len(text) == 20 and set(text) <= set(config["data"]["charset"])
  again = bigflax("sample", f"--workdir={workdir}", "--prompt=line ", "--max_new_tokens=20",
                  "--temperature=0.9", "--top_k=5", "--top_p=0.9", "--seed=1")
  assert again.stdout == sample.stdout


def test_experiment_file_and_default_workdir(tmp_path, corpus_file):
  result = bigflax("train", f"--config={REPO}/experiments/shakespeare_char.py",
                   "--config.steps=2", f"--config.data.path={corpus_file}", *TINY, cwd=tmp_path,
                   check=False)
  assert "config.sample.prompt contains the character 'R'" in result.stderr  # before training
  assert "step/s" not in result.stderr
  bigflax("train", f"--config={REPO}/experiments/shakespeare_char.py", "--config.steps=2",
          f"--config.data.path={corpus_file}", "--config.sample.prompt=line", *TINY, cwd=tmp_path)
  config = json.loads((tmp_path / "runs" / "shakespeare_char" / "config.json").read_text())
  assert config["data"]["tokenizer"] == "char" and config["model"]["use_bias"] is False


@pytest.mark.parametrize("flag, message", [
    ("--config.model.num_hedas=4", "num_hedas"),
    ("--config.steps=many", "steps"),
    ("--config.data.path=/no/such/file.txt", "config.data.path='/no/such/file.txt': no such file"),
    ("--config.data.source=tfds:lm1bb", "TFDS has no dataset named 'lm1bb' (did you mean lm1b"),
    ("--config.model.embed_dim=130", "embed_dim=130 is not divisible by config.model.num_heads=4"),
    ("--config.profile_steps=5", "config.profile_steps='5' must be 'A,B' with 1 <= A <= B"),
])
def test_bad_input_gives_one_clear_error(tmp_path, corpus_file, flag, message):
  result = bigflax("train", f"--config.data.path={corpus_file}", flag, f"--workdir={tmp_path}",
                   check=False)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr


def test_sample_without_a_run_says_what_to_do(tmp_path):
  result = bigflax("sample", f"--workdir={tmp_path}", check=False)
  assert result.returncode != 0 and "bigflax train --workdir" in result.stderr
