"""The user-facing scripts in tools/: plot_metrics, reproduce and bench."""

import json
import os
import re
import subprocess
import sys

import pytest

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


def test_plot_metrics_refuses_a_run_without_losses(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "learning_rate": 0.1}) + "\n")
  result = run_tool("tools/plot_metrics.py", str(tmp_path))
  assert result.returncode != 0 and "no loss records" in result.stderr


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
