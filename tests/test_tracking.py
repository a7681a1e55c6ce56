"""Weights & Biases tracking (config.metrics): the same scalars as TensorBoard, and the config,
logged offline (WANDB_MODE=offline: no network) and read back from the run's .wandb file."""

import json
import math
import struct
import sys
import time

import pytest
from wandb.proto import wandb_internal_pb2  # the [wandb] extra; pip install -e ".[test]" has it

from bigflax import cli, rundir
from bigflax.config import ConfigError, get_config, validate
from conftest import run_bigflax

BLOCK = 32768  # the .wandb file is a LevelDB-style log of protobuf Records in blocks of this size


def read_wandb(workdir, runs: int = 1) -> list:
  """Every Record of the `runs` offline W&B runs in WORKDIR/wandb/, in order, once each has
  written its exit record (W&B's service process writes the file after wandb.finish returns)."""
  for _ in range(300):
    records = _read_wandb(workdir)
    if sum(r.WhichOneof("record_type") == "exit" for r in records) >= runs:
      return records
    time.sleep(0.1)
  raise AssertionError(f"{workdir}/wandb holds no {runs} finished W&B run(s)")


def _read_wandb(workdir) -> list:
  records = []
  for path in sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb")):
    data, chunks, offset = path.read_bytes(), [], 7  # ":W&B", magic, version
    assert data[:4] == b":W&B"
    while offset + 7 <= len(data):
      if BLOCK - offset % BLOCK < 7:  # a block's tail too short for a header is padding
        offset += BLOCK - offset % BLOCK
        continue
      _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
      if length == 0 and kind == 0:
        break
      chunks.append(data[offset + 7:offset + 7 + length])
      offset += 7 + length
      if kind in (1, 4):  # FULL or LAST: a record is complete
        record = wandb_internal_pb2.Record()
        record.ParseFromString(b"".join(chunks))
        records.append(record)
        chunks = []
  return records


def history(records) -> dict[int, dict]:
  """step → {key: value} of the logged scalars."""
  steps = {}
  for r in records:
    if r.WhichOneof("record_type") == "history":
      items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
      step = items.pop("_step")
      steps.setdefault(step, {}).update({k: v for k, v in items.items() if not k.startswith("_")})
  return steps


def test_wandb_asked_for_but_not_installed_is_refused_before_training(tmp_path, capsys,
                                                                      monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` meets when absent
  config = get_config()
  config.metrics.wandb_project = "bigflax-test"
  with pytest.raises(ConfigError, match=r'pip install "bigflax\[wandb\]"'):
    validate(config)
  with pytest.raises(SystemExit) as exit_:
    cli.main(["train", "--config.metrics.wandb_project=bigflax-test",
              f"--workdir={tmp_path / 'run'}"])
  err = str(exit_.value.code)
  assert err.startswith("error: config.metrics.wandb_project='bigflax-test' asks for Weights")
  assert len(err.splitlines()) == 1 and not (tmp_path / "run").exists()
  config.metrics.wandb_project, config.metrics.wandb_tags = "", ("",)
  validate(config)  # off: nothing about it is checked


def test_metrics_writer_logs_the_tensorboard_scalars_and_the_config_to_wandb(tmp_path,
                                                                             monkeypatch):
  monkeypatch.setenv("WANDB_MODE", "offline")
  config = get_config()
  config.metrics.wandb_project, config.metrics.wandb_tags = "bigflax-test", ("a", "b")
  writer = rundir.MetricsWriter(str(tmp_path), config=config)
  writer.write({"step": 1, "loss": 3.5, "grad_norm": float("nan"), "padding": 0.25})
  writer.write({"step": 2, "loss": 3.25, "tokens_per_sec": 100})
  writer.write({"step": 2, "eval_loss": 3.0, "eval_documents": 7})
  writer.close()
  records = read_wandb(tmp_path)
  # NaN is skipped as TensorBoard skips it (metrics.jsonl names it); the rest is logged per step.
  assert history(records) == {1: {"loss": 3.5, "padding": 0.25},
                              2: {"loss": 3.25, "tokens_per_sec": 100, "eval_loss": 3.0,
                                  "eval_documents": 7}}
  run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  assert (run.project, run.display_name, list(run.tags), run.run_id) == (
      "bigflax-test", tmp_path.name, ["a", "b"], run_id)
  logged = {i.key: json.loads(i.value_json) for i in run.config.update}
  assert logged["optimizer"]["learning_rate"] == config.optimizer.learning_rate
  assert logged["model"] == json.loads(json.dumps(config.model.to_dict()))
  assert logged["metrics"]["wandb_tags"] == ["a", "b"]
  # A resumed run continues the same W&B run.
  rundir.MetricsWriter(str(tmp_path), resumed_at=2, config=config).close()
  runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(p.name.endswith(run_id) for p in runs)


@pytest.mark.slow
def test_a_training_run_logs_every_metrics_record_to_wandb(tmp_path, corpus_file, monkeypatch):
  workdir = tmp_path / "run"
  monkeypatch.setenv("WANDB_MODE", "offline")  # the trainer subprocess inherits it
  run_bigflax("train", f"--config.data.path={corpus_file}", "--config.data.tokenizer=char",
              "--config.steps=4", "--config.batch_size=8", "--config.log_every=1",
              "--config.eval_every=2", "--config.eval_batches=2", "--config.model.block_size=16",
              "--config.model.num_layers=2", "--config.model.num_heads=2",
              "--config.model.embed_dim=32", "--config.optimizer.warmup_steps=1",
              "--config.sample.max_new_tokens=8", "--config.metrics.wandb_project=bigflax-test",
              "--config.metrics.wandb_name=tiny", f"--workdir={workdir}")
  logged = history(read_wandb(workdir))
  expected = {}
  for record in rundir.read_metrics(str(workdir)):
    expected.setdefault(record["step"], {}).update(
        {k: v for k, v in record.items() if k != "step" and isinstance(v, int | float)})
  assert sorted(logged) == [1, 2, 3, 4] and "eval_loss" in logged[4]
  for step, values in expected.items():
    assert logged[step].keys() == values.keys()
    assert all(math.isclose(logged[step][k], v, rel_tol=1e-6) for k, v in values.items())
