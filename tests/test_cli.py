"""The `bigflax` command as a user runs it: one end-to-end run in a subprocess (1 CPU device),
the rest in-process through `cli.main`."""

import json
import shutil

import pytest

from bigflax import cli
from bigflax.rundir import read_metrics
from conftest import REPO, in_process, run_bigflax

bigflax = run_bigflax
TINY = ["--config.model.block_size=16", "--config.model.num_layers=2",
        "--config.model.num_heads=2", "--config.model.embed_dim=32", "--config.batch_size=4",
        "--config.eval_batches=2", "--config.optimizer.warmup_steps=1",
        "--config.sample.max_new_tokens=12"]



@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file):
  """A finished tiny run (config.json, metrics, checkpoints, params/), trained once."""
  workdir = tmp_path_factory.mktemp("cli") / "run"
  result = bigflax("train", f"--config.data.path={corpus_file}", "--config.data.tokenizer=char",
                   "--config.steps=6", "--config.log_every=2", "--config.eval_every=3",
                   "--config.checkpoint_every=3", *TINY, "--config.profile_steps=4,5",
                   f"--workdir={workdir}")
  return workdir, result


def test_train_writes_run_files_then_sample_prints_text(trained_run, corpus_file):
  workdir, result = trained_run
  assert "eval_loss" in result.stderr + result.stdout
  assert "sample ('def ' →)" in result.stdout
  assert "Traceback" not in result.stderr and "Downloading" not in result.stdout
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


def test_sample_prints_the_prompt_and_its_continuation(trained_run, capsys):
  workdir, _ = trained_run
  charset = json.loads((workdir / "config.json").read_text())["data"]["charset"]
  args = ("sample", f"--workdir={workdir}", "--prompt=line ", "--max_new_tokens=20",
          "--temperature=0.9", "--top_k=5", "--top_p=0.9", "--seed=1")
  code, out, _ = in_process(capsys, *args)
  text = out.rstrip("\n")
  assert code == 0 and text.startswith("line ") and len(text) == 25
  assert set(text) <= set(charset)
  assert in_process(capsys, *args)[1] == out  # same seed, same text


def test_an_interrupted_run_samples_from_its_checkpoints(trained_run, tmp_path, capsys):
  workdir, _ = trained_run
  copy = tmp_path / "interrupted"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "params")  # as if killed before the export
  code, out, err = in_process(capsys, "sample", f"--workdir={copy}", "--prompt=line ",
                              "--max_new_tokens=5", "--temperature=0")
  assert code == 0, err
  # The latest checkpoint (6) holds the final params: greedy text equals the export's.
  assert out == in_process(capsys, "sample", f"--workdir={workdir}", "--prompt=line ",
                           "--max_new_tokens=5", "--temperature=0")[1]
  code, out3, _ = in_process(capsys, "sample", f"--workdir={copy}", "--step=3",
                             "--prompt=line ", "--max_new_tokens=5", "--temperature=0")
  assert code == 0 and out3.startswith("line ")
  code, _, err = in_process(capsys, "sample", f"--workdir={copy}", "--step=4")
  assert code == 1 and "has no checkpoint of step 4; its checkpoints are steps [3, 6]" in err


@pytest.mark.parametrize("flag, message", [
    ("--temperature=-1", "--temperature=-1.0 must be >= 0"),
    ("--top_k=-2", "--top_k=-2 must be >= 0"),
    ("--top_p=1.5", "--top_p=1.5 must be in (0, 1]"),
    ("--top_p=0", "--top_p=0.0 must be in (0, 1]"),
    ("--max_new_tokens=0", "--max_new_tokens=0 must be >= 1"),
])
def test_sample_flags_are_checked(trained_run, capsys, flag, message):
  code, out, err = in_process(capsys, "sample", f"--workdir={trained_run[0]}", flag)
  assert code == 1 and message in err and not out


def test_a_corrupted_export_is_one_line(trained_run, tmp_path, capsys):
  copy = tmp_path / "broken"
  shutil.copytree(trained_run[0], copy)
  for f in (copy / "params").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  code, _, err = in_process(capsys, "sample", f"--workdir={copy}")
  assert code == 1 and "params export" in err and "corrupted or incomplete" in err
  assert len(err.strip().splitlines()) == 1


def test_training_into_a_finished_run_is_refused(trained_run, capsys):
  workdir, _ = trained_run
  converted = workdir.parent / "converted"
  shutil.copytree(workdir, converted, ignore=shutil.ignore_patterns("checkpoints"))
  before = {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()}
  code, _, err = in_process(capsys, "train", f"--workdir={converted}")
  assert code == 1 and "holds a finished model" in err and "--overwrite" in err
  assert {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("argv", [[], ["--help"], ["train", "--help"], ["sample", "-h"]])
def test_help_lists_the_commands_and_exits_0(capsys, argv):
  code, out, _ = in_process(capsys, *argv)
  assert code == 0
  for command in cli.COMMANDS:
    assert f"  {command} " in out
  assert "--config.FIELD=VALUE" in out and "--workdir" in out


def test_config_prints_every_field_with_its_value_and_comment(capsys):
  code, out, _ = in_process(capsys, "config", f"--config={REPO}/experiments/shakespeare_char.py",
                            "--config.model.dropout=0.2")
  assert code == 0
  assert "model.dropout = 0.2  # Dropout rate" in out
  assert "data.tokenizer = 'char'  # byte | char | sentencepiece" in out
  assert "grad_accum_steps = 1  # Microbatches per update" in out


@pytest.mark.parametrize("argv, message", [
    (["train", "--config.model.num_hedas=4"], "--config.model.num_hedas names no config field"),
    (["train", "--config.steps=many"], "--config.steps=many"),
    (["train", "--config=/no/such/experiment.py"], "--config /no/such/experiment.py: no such "
                                                   "file"),
    (["config", "--config.model.embed_dim=130"], "embed_dim=130 is not divisible by "
                                                 "config.model.num_heads=4"),
    (["train", "--config.profile_steps=5"], "config.profile_steps='5' must be 'A,B'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["sample"], "bigflax sample needs --workdir"),
    (["aot"], "bigflax aot needs --topology"),
])
def test_bad_input_gives_one_clear_error(capsys, argv, message):
  code, _, err = in_process(capsys, *argv)
  assert code == 1 and message in err and "Traceback" not in err


@pytest.mark.parametrize("body, message", [
    ("x = (", "syntax error at line 1"),
    ("x = 1\n", "defines no get_config()"),
    ("def get_config():\n  return {}\n", "returned a dict, not an ml_collections.ConfigDict"),
    ("import no_such_module_here\n", "the file failed to load (ModuleNotFoundError"),
])
def test_a_broken_experiment_file_is_one_clear_error(tmp_path, capsys, body, message):
  (tmp_path / "exp.py").write_text(body)
  code, _, err = in_process(capsys, "train", f"--config={tmp_path / 'exp.py'}")
  assert code == 1 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("flag, message", [
    ("--config.data.path=/no/such/file.txt", "config.data.path='/no/such/file.txt': no such file"),
    ("--config.data.source=tfds:lm1bb", "TFDS has no dataset named 'lm1bb' (did you mean lm1b"),
])
def test_bad_data_gives_one_clear_error_from_the_command(tmp_path, corpus_file, flag, message):
  result = bigflax("train", f"--config.data.path={corpus_file}", flag, f"--workdir={tmp_path}",
                   check=False)
  assert result.returncode == 1
  assert message in result.stderr
  assert "Traceback" not in result.stderr
