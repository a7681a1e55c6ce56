"""A run directory's files: metrics.jsonl, TensorBoard events, config.json, refusals (rundir.py)."""

import json
import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from bigflax import rundir
from bigflax.errors import UserError
from bigflax.rundir import MetricsWriter, read_metrics


def events(path):
  """The Event protos of a TensorBoard file (TFRecords: length, crc, payload, crc)."""
  data, offset, found = path.read_bytes(), 0, []
  while offset < len(data):
    (length,) = struct.unpack_from("<Q", data, offset)
    found.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
    offset += 12 + length + 4
  return found


def test_records_go_to_jsonl_and_tensorboard(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write({"step": 1, "loss": 2.5, "note": "text is kept in jsonl only"})
  writer.close()
  assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.5, "note": "text is kept in jsonl only"}]
  (events_file,) = tmp_path.glob("events.out.tfevents*")
  scalars = [(e.step, v.tag, v.simple_value) for e in events(events_file) for v in e.summary.value]
  assert scalars == [(1, "loss", 2.5)]


def test_a_resumed_run_tells_tensorboard_to_hide_the_steps_it_recomputes(tmp_path):
  MetricsWriter(tmp_path).close()
  writer = MetricsWriter(tmp_path, resumed_at=20)
  writer.write({"step": 21, "loss": 1.0})
  writer.close()
  newest = max(tmp_path.glob("events.out.tfevents*"), key=lambda p: p.stat().st_mtime_ns)
  purges = [e.step for e in events(newest)
            if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
  assert purges == [21]  # TensorBoard drops the earlier run's events from step 21 on


def test_processes_other_than_0_write_nothing(tmp_path):
  writer = MetricsWriter(tmp_path, enabled=False)
  writer.write({"step": 1, "loss": 2.0})
  writer.close()
  assert not list(tmp_path.iterdir())


def test_nonfinite_values_are_null_and_named_and_skipped_by_tensorboard(tmp_path):
  writer = MetricsWriter(tmp_path)
  writer.write({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "accuracy": 0.5})
  writer.close()
  line = (tmp_path / "metrics.jsonl").read_text()
  assert "NaN" not in line and "Infinity" not in line
  assert json.loads(line) == {"step": 3, "loss": None, "grad_norm": None, "accuracy": 0.5,
                              "nonfinite": ["grad_norm", "loss"]}
  (events_file,) = tmp_path.glob("events.out.tfevents*")
  assert [v.tag for e in events(events_file) for v in e.summary.value] == ["accuracy"]


def finished_run(workdir):
  workdir.mkdir()
  (workdir / "config.json").write_text('{"a": 1}\n')
  (workdir / "params").mkdir()
  (workdir / "params" / "weights").write_bytes(b"\x00\x01 weights")
  (workdir / "metrics.jsonl").write_text('{"step": 1}\n')
  return {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}


def test_training_into_a_finished_model_is_refused_and_nothing_changes(tmp_path):
  before = finished_run(tmp_path / "run")
  with pytest.raises(UserError, match="holds a finished model .* pass --overwrite"):
    rundir.prepare_for_training(tmp_path / "run")
  assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
  rundir.prepare_for_training(tmp_path / "run", overwrite=True)  # the explicit way
  assert not list((tmp_path / "run").iterdir())


def test_a_workdir_that_is_a_file_or_read_only_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a directory"):
    rundir.prepare_for_training(tmp_path / "file")
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
      locked = tmp_path / "file" / "sub"
    with pytest.raises(UserError, match="cannot write to --workdir|is a file"):
      rundir.prepare_for_training(locked)
  finally:
    (tmp_path / "locked").chmod(0o700)


def test_an_invalid_config_json_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json is not valid JSON"):
    rundir.read_config(tmp_path)
