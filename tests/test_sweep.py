"""`bigflax sweep`: Optuna studies whose trials are ordinary runs. The bad-input and summary
tests run in-process without training; the studies that train (kill and resume, pruning) are
slow-tier subprocess runs."""

import json
import signal
import subprocess
import sys
import time

import optuna  # the [sweep] extra; pip install -e ".[test]" has it
import pytest

from bigflax import sweep
from bigflax.config import load_experiment
from conftest import REPO, bigflax_env, in_process, run_bigflax

LR_SPACE = """
def space(trial, config):
  config.optimizer.learning_rate = trial.suggest_categorical("lr", [1e-5, 3e-3])
"""


def write_experiment(path, corpus, name="tiny", steps=8, eval_every=4, lr=1e-3):
  """A tiny experiment file: a step takes milliseconds."""
  path.write_text(f"""
from bigflax.config import base

def get_config():
  c = base()
  c.name = {name!r}
  c.data.path = {str(corpus)!r}
  c.data.tokenizer = "char"
  c.steps, c.batch_size, c.log_every, c.eval_every, c.eval_batches = {steps}, 8, 1, {eval_every}, 2
  c.model.block_size, c.model.num_layers, c.model.num_heads, c.model.embed_dim = 16, 2, 2, 32
  c.optimizer.learning_rate, c.optimizer.warmup_steps = {lr}, 1
  c.mesh.data = 1
  c.sample.max_new_tokens = 8
  return c
""")
  return path


def run_sweep(capsys, *argv) -> tuple[int, str]:
  """(exit code, stdout + stderr) of `bigflax sweep ARGV` run in this process."""
  code, out, err = in_process(capsys, "sweep", *argv)
  return code, out + err


def load_study(directory, name):
  return optuna.load_study(study_name=name, storage=f"sqlite:///{directory / 'study.db'}")


def test_a_space_file_without_space_is_one_line_and_writes_nothing(tmp_path, capsys, corpus_file):
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file)
  (tmp_path / "space.py").write_text("def search(trial, config):\n  pass\n")
  code, out = run_sweep(capsys, f"--config={experiment}", f"--space={tmp_path}/space.py",
                        "--study=s", f"--workdir={tmp_path / 'sweep'}")
  assert code == 1 and "space.py defines no space(trial, config)" in out
  assert "Traceback" not in out and not (tmp_path / "sweep").exists()


def test_a_study_directory_of_another_experiment_is_refused_naming_both(tmp_path, capsys,
                                                                        corpus_file):
  first = write_experiment(tmp_path / "first.py", corpus_file, name="first")
  second = write_experiment(tmp_path / "second.py", corpus_file, name="second")
  (tmp_path / "space.py").write_text(LR_SPACE)
  directory = tmp_path / "sweep"
  sweep.Sweep(directory, "s", str(first), load_experiment(str(first)), str(tmp_path / "space.py"),
              trials=2).claim_directory()
  before = (directory / "sweep.json").read_text()
  code, out = run_sweep(capsys, f"--config={second}", f"--space={tmp_path}/space.py",
                        "--study=s", f"--workdir={directory}")
  assert code == 1 and "Traceback" not in out
  assert "holds study 's' of experiment 'first'" in out and "experiment 'second'" in out
  # The same experiment with other overrides would mix incomparable trials: refused too.
  code, out = run_sweep(capsys, f"--config={first}", f"--space={tmp_path}/space.py",
                        "--study=s", f"--workdir={directory}", "--config.steps=9")
  assert code == 1 and "config.steps=8, not 9" in out
  assert (directory / "sweep.json").read_text() == before


def test_without_optuna_the_sweep_says_how_to_install_it(tmp_path, capsys, monkeypatch,
                                                         corpus_file):
  monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets when absent
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file)
  (tmp_path / "space.py").write_text(LR_SPACE)
  code, out = run_sweep(capsys, f"--config={experiment}", f"--space={tmp_path}/space.py",
                        "--study=s", f"--workdir={tmp_path / 'sweep'}")
  assert code == 1 and 'pip install "bigflax[sweep]"' in out and len(out.strip().splitlines()) == 1


def test_a_generated_experiment_file_is_the_experiment_with_the_fields(tmp_path):
  where = tmp_path / "deep" / "dir"
  where.mkdir(parents=True)
  spec = f"{REPO}/experiments/shakespeare_char.py:baby"
  fields = {"optimizer.learning_rate": "0.0007", "model.num_layers": "3",
            "optimizer.weight_decay_exclude": "('bias',)"}
  (where / "exp.py").write_text(sweep.experiment_source(spec, fields, "A test.", where))
  config = load_experiment(str(where / "exp.py"))
  reference = load_experiment(spec)
  assert config.optimizer.learning_rate == 0.0007 and config.model.num_layers == 3
  assert config.optimizer.weight_decay_exclude == ("bias",)
  assert config.model.embed_dim == reference.model.embed_dim == 384  # the variant is kept
  assert sweep.changed_fields(reference, config) == fields
  (where / "default.py").write_text(sweep.experiment_source(None, {"steps": "7"}, "A test.", where))
  assert load_experiment(str(where / "default.py")).steps == 7


def test_the_summary_prints_the_best_trial_and_writes_its_experiment_and_plot(tmp_path, capsys,
                                                                              corpus_file):
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file)
  (tmp_path / "space.py").write_text(LR_SPACE)
  s = sweep.Sweep(tmp_path / "sweep", "s", str(experiment), load_experiment(str(experiment)),
                  str(tmp_path / "space.py"), trials=4)
  s.claim_directory()
  study = s.study()
  distribution = optuna.distributions.CategoricalDistribution([1e-5, 3e-3])
  for number, (lr, loss) in enumerate([(1e-5, 4.8), (3e-3, 4.1), (1e-5, 4.7), (3e-3, 4.2)]):
    study.add_trial(optuna.trial.create_trial(
        params={"lr": lr}, distributions={"lr": distribution}, value=loss,
        user_attrs={"directory": number, "fields": {"optimizer.learning_rate": repr(lr)}}))
  s.summarize()
  out = capsys.readouterr().out
  assert "study 's': 4 complete" in out and "best: trial 1, eval_loss 4.1000 (lr=0.003)" in out
  best = load_experiment(str(tmp_path / "sweep" / "best_experiment.py"))
  assert best.optimizer.learning_rate == 3e-3 and best.steps == 8
  png = tmp_path / "sweep" / "sweep.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.slow
def test_a_killed_sweep_resumes_to_six_complete_trials_and_finds_the_best_lr(tmp_path,
                                                                             corpus_file):
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file, lr=1e-3)
  (tmp_path / "space.py").write_text(LR_SPACE)
  directory = tmp_path / "sweep"
  argv = ["sweep", f"--config={experiment}", f"--space={tmp_path}/space.py", "--study=lr",
          "--trials=6", "--pruner=none", f"--workdir={directory}"]
  first = subprocess.Popen([sys.executable, "-m", "bigflax", *argv], cwd=REPO,
                           env=bigflax_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 600
  while not (directory / "trials" / "2").exists():  # trial 2 (the third) has started
    assert first.poll() is None and time.time() < deadline, first.stdout.read().decode()
    time.sleep(0.2)
  first.send_signal(signal.SIGKILL)
  first.wait()
  assert load_study(directory, "lr").trials[2].state == optuna.trial.TrialState.RUNNING

  result = run_bigflax(*argv, timeout=900)
  study = load_study(directory, "lr")
  complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
  assert len(complete) == 6, [(t.number, t.state) for t in study.trials]
  # The killed trial was failed once and resumed in its own directory: no run lost or doubled.
  failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
  assert [t.number for t in failed] == [2] and "resuming trial 2" in result.stdout
  directories = sorted(t.user_attrs["directory"] for t in complete)
  assert directories == sorted(set(directories)) and 2 in directories
  assert sorted(p.name for p in (directory / "trials").iterdir()) == sorted(map(str, directories))
  for t in complete:  # each value is its run's final eval loss
    records = [json.loads(line) for line in
               (directory / "trials" / str(t.user_attrs["directory"]) / "metrics.jsonl")
               .read_text().splitlines()]
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 8 and final["eval_loss"] == pytest.approx(t.value)
  assert {t.params["lr"] for t in complete} == {1e-5, 3e-3}  # a real choice was made
  assert study.best_trial.params["lr"] == 3e-3
  assert "best: trial" in result.stdout and "(lr=0.003)" in result.stdout
  best = load_experiment(str(directory / "best_experiment.py"))
  assert best.optimizer.learning_rate == 3e-3 and best.steps == 8 and best.name == "tiny"
  assert (directory / "sweep.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_trial_worse_than_the_median_is_pruned_and_checkpointed(tmp_path, corpus_file):
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file, steps=300, eval_every=20)
  # Not suggested, so the test knows which trial is the bad one: trial 2 learns 300x slower.
  (tmp_path / "space.py").write_text(
      "def space(trial, config):\n"
      "  config.optimizer.learning_rate = 1e-5 if trial.number == 2 else 3e-3\n")
  directory = tmp_path / "sweep"
  result = run_bigflax("sweep", f"--config={experiment}", f"--space={tmp_path}/space.py",
                       "--study=prune", "--trials=3", "--startup_trials=2",
                       f"--workdir={directory}", timeout=600)
  trials = load_study(directory, "prune").trials
  assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [
      optuna.trial.TrialState.PRUNED]
  assert "trial 2: pruned at step" in result.stdout
  records = [json.loads(line) for line in
             (directory / "trials" / "2" / "metrics.jsonl").read_text().splitlines()]
  last_step = max(r["step"] for r in records)
  assert last_step < 300 and (directory / "trials" / "2" / "checkpoints" / str(last_step)).is_dir()
  # It was pruned on a loss above both finished trials' at the same step.
  step = max(trials[2].intermediate_values)
  assert trials[2].intermediate_values[step] > max(t.intermediate_values[step] for t in trials[:2])
  best = load_experiment(str(directory / "best_experiment.py"))
  assert best.optimizer.learning_rate == 3e-3 and best.steps == 300


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(tmp_path, corpus_file):
  experiment = write_experiment(tmp_path / "tiny.py", corpus_file, steps=4, eval_every=2)
  (tmp_path / "space.py").write_text(LR_SPACE)
  directory = tmp_path / "sweep"
  result = run_bigflax("sweep", f"--config={experiment}", f"--space={tmp_path}/space.py",
                       "--study=pair", "--trials=3", "--workers=2", "--pruner=none",
                       f"--workdir={directory}", timeout=600)
  trials = load_study(directory, "pair").trials
  assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
  assert sorted(t.user_attrs["directory"] for t in trials) == [0, 1, 2]
  assert sorted(p.name for p in (directory / "trials").iterdir()) == ["0", "1", "2"]
  assert "2 workers here" in result.stdout and "study 'pair': 3 complete" in result.stdout
