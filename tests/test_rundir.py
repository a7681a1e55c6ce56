"""metrics.jsonl and TensorBoard event files (bigflax/rundir.py)."""

import struct

from tensorboardX.proto import event_pb2

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
