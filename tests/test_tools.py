"""The user-facing scripts in tools/: plot_metrics, reproduce, bench, train_tokenizer and
convert_hf. Errors a user can fix end a tool with one line on stderr (`error: …`), exit status 1
and no traceback, and leave every file that was there as it was."""

import hashlib
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from bigflax import interop
from bigflax.model import ModelConfig, Transformer
from conftest import REPO


def run_tool(*args, cwd=REPO):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_plot_metrics_writes_a_png_with_both_curves(tmp_path):
  records = [{"step": s, "loss": 4.0 / s, "learning_rate": 1e-3} for s in range(1, 11)]
  records += [{"step": 5, "eval_loss": 1.5}, {"step": 10, "eval_loss": 1.2}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  result = run_tool("tools/plot_metrics.py", str(tmp_path))
  assert result.returncode == 0, result.stderr
  png = tmp_path / "loss.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def load_tool(name: str):
  """tools/NAME.py as a module, so its main(argv) runs in this process."""
  spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def fails(capsys, tool, *argv) -> str:
  """The one stderr line of a tool that refused `argv` with exit status 1 (and nothing on
  stdout), without `error: `."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    tool.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  assert exit_.value.code == 1 and not out, (exit_.value.code, out, err)
  lines = [line for line in err.splitlines() if not line.startswith("building the local dataset")]
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  return lines[0].removeprefix("error: ")


def snapshot(directory) -> dict:
  """Every file under `directory`: relative path → sha256 of its bytes."""
  root = pathlib.Path(directory)
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def help_text(capsys, tool, *argv) -> str:
  with pytest.raises(SystemExit) as exit_:
    tool.main([*argv, "--help"])
  assert exit_.value.code == 0
  return " ".join(capsys.readouterr().out.split())


@pytest.fixture(scope="module")
def plot_metrics():
  return load_tool("plot_metrics")


def test_plot_metrics_refuses_a_run_without_losses(tmp_path, capsys, plot_metrics):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "learning_rate": 0.1}) + "\n")
  assert fails(capsys, plot_metrics, tmp_path) == (
      f"{tmp_path}/metrics.jsonl has no loss records to plot; train the run for at least "
      "config.log_every steps first")
  assert not (tmp_path / "loss.png").exists()


def test_plot_metrics_refuses_a_missing_run_or_one_without_metrics(tmp_path, capsys,
                                                                   plot_metrics):
  assert fails(capsys, plot_metrics, tmp_path / "nope") == (
      f"{tmp_path}/nope is not a run directory (no such directory); give the --workdir of a run")
  assert fails(capsys, plot_metrics, tmp_path) == (
      f"{tmp_path} has no metrics.jsonl (the run has logged nothing yet); give the --workdir of "
      "a run that has trained for at least config.log_every steps")
  assert not list(tmp_path.iterdir())


def test_plot_metrics_skips_a_line_cut_short_and_names_a_bad_one(tmp_path, capsys, plot_metrics):
  lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2)]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "lo')  # a crash
  capsys.readouterr()
  plot_metrics.main([str(tmp_path), "--out", str(tmp_path / "curve.png")])
  assert capsys.readouterr().out.strip() == str(tmp_path / "curve.png")
  (tmp_path / "metrics.jsonl").write_text("\n".join(["oops", *lines]) + "\n")
  assert fails(capsys, plot_metrics, tmp_path) == (
      f"{tmp_path}/metrics.jsonl line 1 is not JSON; it was not written by bigflax, or was "
      "edited: remove that line")
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  assert fails(capsys, plot_metrics, tmp_path, "--out", tmp_path / "no" / "x.png") == (
      f"the directory of --out {tmp_path}/no/x.png does not exist; create it or give another "
      "--out")


def test_plot_metrics_help_is_sentences(capsys, plot_metrics):
  assert ("Plots the train and eval loss curves of a run from its metrics.jsonl. The plot is "
          "written to WORKDIR/loss.png unless --out names another PNG file.") in help_text(
              capsys, plot_metrics)


@pytest.mark.slow
def test_reproduce_exits_nonzero_when_the_target_is_missed(tmp_path, corpus_file):
  # 3 steps of a tiny model cannot reach Tiny Shakespeare's 1.9175: the script must say MISSED.
  result = run_tool(
      "tools/reproduce.py", "experiments/shakespeare_char.py", f"--workdir={tmp_path}",
      "--seeds=2", f"--config.data.path={corpus_file}", "--config.steps=3",
      "--config.eval_batches=2", "--config.optimizer.warmup_steps=1",
      "--config.sample.prompt=line", "--config.sample.max_new_tokens=4")
  assert result.returncode == 1, result.stderr[-2000:]
  losses = [float(x) for x in re.findall(r"seed \d: eval_loss ([\d.]+)", result.stdout)]
  mean = float(re.search(r"mean eval_loss ([\d.]+) ± [\d.]+ over 2 seed", result.stdout).group(1))
  assert len(losses) == 2 and abs(mean - sum(losses) / 2) < 1e-3 and losses[0] != losses[1]
  assert "(target ≤ 1.9175)" in result.stdout and "MISSED" in result.stdout
  assert (tmp_path / "seed0" / "metrics.jsonl").exists() and (tmp_path / "seed1").is_dir()


TINY_EXPERIMENT = """
from bigflax.config import base

TARGET_SOURCE = "a test, number 9.99"
TARGET_SEEDS = 2
TARGET_EVAL_LOSS = 9.99
QUICK_OVERRIDES = {"steps": 2}


def get_config():
  c = base()
  c.data.path, c.data.tokenizer = CORPUS, "char"
  c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_batches = 4, 8, 1, 2, 2
  c.model.block_size, c.model.num_layers, c.model.num_heads, c.model.embed_dim = 16, 2, 2, 32
  c.optimizer.warmup_steps, c.mesh.data = 1, 1
  return c
"""

CUSTOM_EXPERIMENT = TINY_EXPERIMENT.replace("TARGET_EVAL_LOSS = 9.99", """
TARGET = "accuracy above 2 (cannot be reached)"


def reproduce(train, seeds):
  _, final = train(None, "only", "--config.seed=0")
  return final["eval_accuracy"] > 2, f"accuracy {final['eval_accuracy']:.3f} ({seeds} seeds)"
""")


def registry_dir(tmp_path, corpus_file):
  (tmp_path / "experiments").mkdir()
  for name, text in (("tiny_loss", TINY_EXPERIMENT), ("tiny_custom", CUSTOM_EXPERIMENT)):
    (tmp_path / "experiments" / f"{name}.py").write_text(text.replace("CORPUS",
                                                                      repr(str(corpus_file))))
  (tmp_path / "experiments" / "no_target.py").write_text(
      "from bigflax.config import base\n\ndef get_config():\n  return base()\n")
  return tmp_path / "experiments"


def test_reproduce_lists_the_experiments_with_targets(tmp_path, capsys, corpus_file):
  reproduce = load_tool("reproduce")
  assert reproduce.main(["--list", f"--experiments={registry_dir(tmp_path, corpus_file)}"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].split() == ["experiment", "seeds", "target", "source"]
  assert [line.split()[:2] for line in lines[1:]] == [["tiny_custom", "2"], ["tiny_loss", "2"]]
  assert "accuracy above 2 (cannot be reached)" in lines[1] and "a test, number 9.99" in lines[1]
  assert "mean eval_loss ≤ 9.99" in lines[2]
  # The repository's own registry: the Shakespeare target and where its number comes from.
  assert reproduce.main(["--list"]) == 0
  row = next(line for line in capsys.readouterr().out.splitlines()
             if line.startswith("shakespeare_char"))
  assert row.split()[1] == "3" and "≤ 1.9175" in row and "1.9216, 1.9052, 1.8957" in row


@pytest.mark.slow
def test_reproduce_all_runs_the_registry_and_writes_the_table(tmp_path, corpus_file):
  experiments, doc = registry_dir(tmp_path, corpus_file), tmp_path / "docs" / "reproductions.md"
  common = ["tools/reproduce.py", "--all", f"--experiments={experiments}", f"--doc={doc}",
            "--config.sample.max_new_tokens=4"]
  quick = run_tool(*common, "--quick", f"--workdir={tmp_path / 'quick'}")
  assert quick.returncode == 1, quick.stderr[-2000:]  # tiny_custom's target cannot be reached
  assert "MISSED: tiny_custom" in quick.stdout
  final = [json.loads(line) for line in
           (tmp_path / "quick" / "tiny_loss" / "seed0" / "metrics.jsonl").read_text().splitlines()
           if "eval_loss" in line][-1]
  assert final["step"] == 2 and not (tmp_path / "quick" / "tiny_loss" / "seed1").exists()
  full = run_tool(*common, f"--workdir={tmp_path / 'full'}")
  assert full.returncode == 1, full.stderr[-2000:]
  losses = [[json.loads(line) for line in (tmp_path / "full" / "tiny_loss" / f"seed{seed}" /
                                           "metrics.jsonl").read_text().splitlines()
             if "eval_loss" in line][-1]["eval_loss"] for seed in (0, 1)]
  rows = [[cell.strip() for cell in line.strip("|").split("|")]
          for line in doc.read_text().splitlines() if line.startswith("| tiny")]
  # The quick rows stay beside the full ones; each row has every column filled.
  quick_kind = "quick: 1 seed, steps=2"
  assert [row[:2] for row in rows] == [["tiny_custom", "full"], ["tiny_custom", quick_kind],
                                       ["tiny_loss", "full"], ["tiny_loss", quick_kind]]
  mean, std = sum(losses) / 2, abs(losses[0] - losses[1]) / 2 ** 0.5
  assert rows[2][2:6] == ["a test, number 9.99", "mean eval_loss ≤ 9.99",
                          f"{mean:.4f} ± {std:.4f} (2 seeds)", "yes"]
  assert rows[0][4].startswith("accuracy ") and rows[0][5] == "**no**"
  assert all(re.fullmatch(r"[\d.]+ min", row[6]) and "cores" in row[7]
             and re.fullmatch(r"\d{4}-\d\d-\d\d", row[8]) for row in rows)


@pytest.mark.slow
def test_bench_reports_step_time_flops_and_mfu_side_by_side(corpus_file):
  result = run_tool(
      "tools/bench.py", "--config=experiments/shakespeare_char.py",
      f"--config.data.path={corpus_file}", "--config.sample.prompt=line",
      "--config.model.block_size=32", "--steps=3", "--compare=model.attention_chunk=8")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  median, low, high = map(float, re.search(
      r"step time: median ([\d.]+) ms \(min ([\d.]+), max ([\d.]+)\) over 3 steps", out).groups())
  assert 0 < low <= median <= high
  assert re.search(r"training loop: [\d.]+ ms/step \(mean of 3", out)
  # The analytic FLOPs agree with XLA's count of the same compiled step (which adds the
  # elementwise work the formula leaves out).
  ratio = float(re.search(r"XLA cost_analysis: [\d.]+ M/token \(ratio ([\d.]+)\)", out).group(1))
  assert 1.0 <= ratio < 1.15
  assert "measured float32 XLA matmul ceiling" in out
  assert 0 < float(re.search(r"MFU: ([\d.]+)%", out).group(1)) <= 100
  assert re.search(r"side by side, model.attention_chunk=8: median [\d.]+ ms; base is [\d.]+×",
                   out)


@pytest.mark.slow
def test_bench_against_torch_times_the_same_shape_gpt2_and_reports_the_ratio(corpus_file):
  pytest.importorskip("torch")  # test-only dependencies: pip install -e .[test]
  pytest.importorskip("transformers")
  result = run_tool(
      "tools/bench.py", "--config=experiments/shakespeare_char.py",
      f"--config.data.path={corpus_file}", "--config.sample.prompt=line",
      "--config.model.block_size=32", "--steps=3", "--against=torch")
  assert result.returncode == 0, result.stderr[-2000:]
  out = result.stdout
  median = float(re.search(r"PyTorch .*\): median ([\d.]+) ms \(min [\d.]+, max [\d.]+\) "
                           r"over 3 steps", out).group(1))
  assert median > 0
  # shakespeare_char has use_bias=False, which a GPT-2 cannot have: the report says so.
  assert "with biases, which GPT-2 always has" in out
  assert float(re.search(r"bigflax is ([\d.]+)× the speed of PyTorch", out).group(1)) > 0


# train_tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_tokenizer():
  return load_tool("train_tokenizer")


@pytest.fixture
def abc_corpus(tmp_path):
  """A corpus of 4 distinct characters besides newline: a vocabulary needs 260 + 4 pieces."""
  (tmp_path / "abc.txt").write_text("abc cab\nbca abc\n" * 200)
  return ["--path", tmp_path / "abc.txt", "--data_dir", tmp_path / "tfds"]


def leftovers(directory) -> list[str]:
  """Files a failed training must not leave: empty ones and partial ones."""
  return [p.name for p in pathlib.Path(directory).iterdir()
          if p.is_file() and (p.stat().st_size == 0 or "partial" in p.name)]


def test_train_tokenizer_writes_a_model_and_overwrites_only_when_asked(tmp_path, capsys,
                                                                        train_tokenizer,
                                                                        abc_corpus):
  output = tmp_path / "abc.model"
  capsys.readouterr()
  train_tokenizer.main([*map(str, abc_corpus), "--vocab_size", "270", "--output", str(output)])
  out, err = capsys.readouterr()
  assert out.startswith(f"{output}: bpe, 270 pieces, trained on 1 document of {abc_corpus[1]} ")
  assert re.fullmatch(r"building the local dataset \(2 documents\) → \S+\n", err)  # nothing else
  first = output.read_bytes()
  assert fails(capsys, train_tokenizer, *abc_corpus, "--vocab_size", 275, "--output", output) == (
      f"--output {output} exists; give --overwrite to replace it, or another --output")
  assert output.read_bytes() == first
  train_tokenizer.main([*map(str, abc_corpus), "--vocab_size", "275", "--output", str(output),
                        "--overwrite"])
  assert output.read_bytes() != first and not leftovers(tmp_path)
  assert not list(tmp_path.glob("*.vocab"))  # the model holds the vocabulary; nothing beside it
  from bigflax.data.tokenizers import SentencePieceTokenizer
  assert SentencePieceTokenizer(str(output)).vocab_size == 275


def test_a_failed_training_leaves_the_old_model_and_no_partial_file(tmp_path, capsys,
                                                                     train_tokenizer, abc_corpus):
  output = tmp_path / "old.model"
  output.write_bytes(b"the model of an earlier run")
  assert fails(capsys, train_tokenizer, *abc_corpus, "--vocab_size", 100, "--output", output,
               "--overwrite") == (
      "--vocab_size 100 is too small for this corpus: sentencepiece needs at least 264 (260 "
      "fixed pieces: <unk>, <s>, </s>, 256 bytes and newline, plus the 4 characters that cover "
      "0.9995 of the text); give --vocab_size 264 or more, or a lower --character_coverage")
  assert output.read_bytes() == b"the model of an earlier run"
  new = tmp_path / "new.model"
  assert fails(capsys, train_tokenizer, *abc_corpus, "--vocab_size", 5000,
               "--output", new).startswith(
      "--vocab_size 5000 is too large for this corpus: sentencepiece can learn at most ")
  assert not new.exists() and not leftovers(tmp_path)


def test_train_tokenizer_measured_minimum_vocabulary_trains(tmp_path, capsys, train_tokenizer,
                                                            abc_corpus):
  capsys.readouterr()
  train_tokenizer.main([*map(str, abc_corpus), "--vocab_size", "264",
                        "--output", str(tmp_path / "min.model")])
  assert "264 pieces" in capsys.readouterr().out


def test_train_tokenizer_input_and_output_errors(tmp_path, capsys, monkeypatch, train_tokenizer,
                                                  abc_corpus):
  model = ["--output", tmp_path / "x.model"]
  assert fails(capsys, train_tokenizer, "--path", tmp_path / "nope.txt", *model) == (
      f"config.data.path='{tmp_path}/nope.txt': no such file (nor a directory or glob with "
      "files); point it at text, or leave it empty to train on the Python standard library")
  (tmp_path / "empty.txt").write_text("\n\n")
  assert fails(capsys, train_tokenizer, "--path", tmp_path / "empty.txt", *model) == (
      f"config.data.path='{tmp_path}/empty.txt' is empty (no text in its files); it needs text "
      "to train on")
  assert fails(capsys, train_tokenizer, *abc_corpus, "--output", tmp_path / "no" / "x.model") == (
      f"the directory of --output {tmp_path}/no/x.model ({tmp_path}/no) does not exist; create "
      "it first or give another --output")
  assert fails(capsys, train_tokenizer, *abc_corpus, "--output", tmp_path) == (
      f"--output {tmp_path} is a directory; give the path of a .model file")
  assert fails(capsys, train_tokenizer, *abc_corpus, "--vocab_size", 0, *model) == (
      "--vocab_size 0 must be positive; give e.g. --vocab_size 8000")
  assert fails(capsys, train_tokenizer, *abc_corpus, "--character_coverage", 2, *model) == (
      "--character_coverage 2.0 must be in (0, 1]; sentencepiece's default is 0.9995")

  # A directory that refuses the file (root, which runs the tests, may write anywhere: simulated).
  from bigflax.data import tokenizers

  class ReadOnly:
    def __getattr__(self, name):
      return getattr(os, name)

    @staticmethod
    def open(path, *args):
      raise PermissionError(13, "Permission denied", str(path))
  monkeypatch.setattr(tokenizers, "os", ReadOnly())
  assert fails(capsys, train_tokenizer, *abc_corpus, *model) == (
      f"cannot write {tmp_path}/x.model (Permission denied); give an --output in a writable "
      "directory")
  assert not leftovers(tmp_path) and not (tmp_path / "x.model").exists()


def test_train_tokenizer_cli_is_one_line_without_traceback(tmp_path):
  (tmp_path / "abc.txt").write_text("abc cab\n" * 100)
  result = run_tool("tools/train_tokenizer.py", "--path", str(tmp_path / "abc.txt"),
                    "--data_dir", str(tmp_path / "tfds"), "--vocab_size", "100",
                    "--output", str(tmp_path / "abc.model"))
  assert result.returncode == 1 and result.stdout == ""
  # The build's line, then the error's; no traceback and nothing from TFDS. (Other libraries may
  # warn on import in some versions, e.g. grain 0.2.17 with an older jaxlib.)
  for tfds_says in ("custom data configuration", "Variant folder", "Downloading and preparing",
                    "downloaded and prepared"):
    assert tfds_says not in result.stderr
  lines = [line for line in result.stderr.splitlines() if not line.startswith("WARNING:absl:")]
  assert len(lines) == 2, result.stderr
  assert lines[0].startswith("building the local dataset (2 documents) → ")
  assert lines[1].startswith("error: --vocab_size 100 is too small for this corpus")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["abc.txt", "tfds"]


def test_train_tokenizer_help_is_sentences(capsys, train_tokenizer):
  text = help_text(capsys, train_tokenizer)
  assert ("Trains a sentencepiece tokenizer (BPE or unigram) on the train split of a bigflax "
          "data source and writes it to --output. The model is written whole or not at all, and "
          "an existing --output is replaced only with --overwrite.") in text
  assert "--overwrite Replace --output if it exists." in text


# convert_hf ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def convert_hf():
  return load_tool("convert_hf")


@pytest.fixture
def hf_dir(tmp_path):
  """A small GPT-2 checkpoint as transformers saves it (written by bigflax: no torch needed)."""
  cfg = ModelConfig(vocab_size=96, block_size=32, num_layers=2, num_heads=4, embed_dim=32,
                    mlp_dim=64)
  params = nn.unbox(Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  interop.save_hf(tmp_path / "hf", cfg, params["params"])
  return tmp_path / "hf"


def edit_config(directory, **changes):
  path = directory / "config.json"
  path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_convert_hf_round_trips_without_torch(tmp_path, capsys, convert_hf, hf_dir):
  convert_hf.main(["to_bigflax", str(hf_dir), str(tmp_path / "run")])
  convert_hf.main(["to_hf", str(tmp_path / "run"), str(tmp_path / "back")])
  converted, back = capsys.readouterr().out.splitlines()
  # This checkpoint has no tokenizer.json: the conversion says what to give the run before sampling.
  assert converted.startswith(f"wrote {tmp_path}/run (config.json, params/) from {hf_dir}; it "
                              "holds no tokenizer.json, so the run has no tokenizer")
  assert back == f"wrote {tmp_path}/back (gpt2: config.json, model.safetensors) from {tmp_path}/run"
  original, back = interop.read_tensors(hf_dir), interop.read_tensors(tmp_path / "back")
  assert original.keys() == back.keys()
  for name in original:
    assert (original[name] == back[name]).all(), name


def test_convert_hf_refuses_a_directory_that_is_not_empty(tmp_path, capsys, convert_hf, hf_dir):
  run = tmp_path / "run"
  (run / "checkpoints" / "100").mkdir(parents=True)
  (run / "checkpoints" / "100" / "state").write_bytes(b"a checkpoint")
  (run / "metrics.jsonl").write_text('{"step": 100, "loss": 2.0}\n')
  (run / "config.json").write_text("{}\n")
  before = snapshot(run)
  assert fails(capsys, convert_hf, "to_bigflax", hf_dir, run) == (
      f"{run} is not empty (it holds checkpoints, config.json, metrics.jsonl); converting into it "
      "would replace or mix with those files: give a new or empty directory")
  assert snapshot(run) == before

  convert_hf.main(["to_bigflax", str(hf_dir), str(tmp_path / "new")])  # a finished run to export
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "notes.txt").write_text("mine")
  assert fails(capsys, convert_hf, "to_hf", tmp_path / "new", tmp_path / "out") == (
      f"{tmp_path}/out is not empty (it holds notes.txt); converting into it would replace or "
      "mix with those files: give a new or empty directory")
  assert snapshot(tmp_path / "out") == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
  (tmp_path / "file").write_text("x")
  assert fails(capsys, convert_hf, "to_hf", tmp_path / "new", tmp_path / "file") == (
      f"{tmp_path}/file is a file; give a new or empty directory to write into")


def test_convert_hf_reports_bad_checkpoints_in_one_line(tmp_path, capsys, convert_hf, hf_dir):
  run = tmp_path / "run"
  assert fails(capsys, convert_hf, "to_bigflax", tmp_path / "nope", run) == (
      f"{tmp_path}/nope does not exist; give the directory transformers' save_pretrained wrote "
      "(config.json and *.safetensors)")
  edit_config(hf_dir, vocab_size=100)
  assert fails(capsys, convert_hf, "to_bigflax", hf_dir, run) == (
      f"the weights in {hf_dir} disagree with its config.json: wte.weight has shape [96, 32], "
      "config.json implies [100, 32] (1 of 28 tensors differs); config.json and the weights must "
      "come from the same save_pretrained")
  edit_config(hf_dir, vocab_size=96, n_layer=3)
  assert fails(capsys, convert_hf, "to_bigflax", hf_dir, run) == (
      f"the weights in {hf_dir} lack 12 of the tensors its config.json describes (first: "
      "h.2.attn.c_attn.bias); config.json and the weights must come from the same save_pretrained")
  edit_config(hf_dir, model_type="bert")
  assert fails(capsys, convert_hf, "to_bigflax", hf_dir, run) == (
      f"model_type 'bert' in {hf_dir}/config.json is not supported; supported: ['gpt2', 'llama']")
  (hf_dir / "config.json").write_text('{"model_type": "gpt2",}')
  message = fails(capsys, convert_hf, "to_bigflax", hf_dir, run)  # json's words vary by version
  assert message.startswith(f"{hf_dir}/config.json is not valid JSON (") and message.endswith(
      ")); fix it or save the model again with save_pretrained")
  (hf_dir / "config.json").write_text('{"model_type": "llama"}')
  assert fails(capsys, convert_hf, "to_bigflax", hf_dir, run) == (
      f"{hf_dir}/config.json lacks 'num_attention_heads', which a llama config.json has; save "
      "the model again with save_pretrained")
  assert fails(capsys, convert_hf, "to_hf", tmp_path / "nope", tmp_path / "out") == (
      f"{tmp_path}/nope holds no finished run (need config.json and params/); train one first "
      f"with: bigflax train --workdir {tmp_path}/nope")
  assert not run.exists() and not (tmp_path / "out").exists()


def test_convert_hf_help_is_sentences(capsys, convert_hf):
  assert ("Converts a Hugging Face transformers model directory (GPT-2 or Llama) into a bigflax "
          "run directory, or a finished bigflax run into a transformers directory.") in (
              help_text(capsys, convert_hf))
  assert "The run directory to write; it must be new or empty." in help_text(
      capsys, convert_hf, "to_bigflax")
