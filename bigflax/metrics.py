"""Where metrics go: WORKDIR/metrics.jsonl (one JSON object per event) and TensorBoard."""

import json
import pathlib

import numpy as np
from tensorboardX import SummaryWriter


class MetricsWriter:
  """Writes records like {"step": 10, "loss": 3.2, ...}; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
    """resumed_at: the checkpoint step a resumed run restarts from. TensorBoard then hides what
    the earlier run logged after it (those steps are recomputed), as metrics.jsonl drops it."""
    self.enabled = enabled
    if enabled:
      self._jsonl = open(pathlib.Path(workdir) / "metrics.jsonl", "a", encoding="utf-8")
      self._tensorboard = SummaryWriter(
          str(workdir), purge_step=None if resumed_at is None else resumed_at + 1)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: v.item() if isinstance(v, np.generic | np.ndarray) else v
              for k, v in record.items()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, int | float):
        self._tensorboard.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
