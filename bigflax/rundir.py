"""A run directory's files: config.json, metrics.jsonl (+ TensorBoard events) and the params export.

    WORKDIR/
      config.json          the resolved config (what the data decided included)
      metrics.jsonl        one JSON object per event; TensorBoard events beside it
      params/              the final params (Orbax), what `bigflax sample` and conversion read
      checkpoints/<step>/  resumable train state (bigflax/checkpoint.py)
"""

import json
import pathlib

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from bigflax import checkpoint, data
from bigflax.errors import CheckpointError, UserError
from bigflax.model import ModelConfig, Transformer, abstract_params


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "config.json"


def metrics_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "metrics.jsonl"


def params_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "params"


def write_config(config, workdir) -> None:
  config_path(workdir).write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n")


def trim_metrics(workdir, step: int) -> None:
  """Drops the records after `step` (and a line cut short by a crash): a run that died after
  logging past its last checkpoint recomputes those steps when it resumes, bit for bit, so keeping
  the old records would log them twice."""
  path = metrics_path(workdir)
  if not path.exists():
    return
  kept = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line + "\n")
    except json.JSONDecodeError:
      pass
  path.write_text("".join(kept), encoding="utf-8")


class MetricsWriter:
  """Writes records like {"step": 10, "loss": 3.2, ...}; a no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None):
    """resumed_at: the checkpoint step a resumed run restarts from. TensorBoard then hides what
    the earlier run logged after it (those steps are recomputed), as metrics.jsonl drops it."""
    self.enabled = enabled
    if enabled:
      self._jsonl = open(metrics_path(workdir), "a", encoding="utf-8")
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
  path = metrics_path(workdir)
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def export_params(workdir, params) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir(workdir), params, force=True)
    checkpointer.wait_until_finished()


def load_export(workdir):
  """(config, model, params, tokenizer) of a finished run, from config.json and the export."""
  path = params_dir(workdir)
  if not config_path(workdir).exists() or not path.exists():
    raise UserError(f"{workdir} holds no finished run (need config.json and params/); train "
                    f"one first with: bigflax train --workdir {workdir}")
  config = ml_collections.ConfigDict(json.loads(config_path(workdir).read_text()))
  model = Transformer(ModelConfig.from_config(config.model))
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          nn.unbox(abstract_params(model, config.model.block_size)))
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      stored = checkpointer.metadata(path).item_metadata.tree
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"the params export {path} is corrupted or incomplete ({e}); "
                            "train again or copy it anew") from e
    checkpoint.check_shapes(stored, abstract, path)
    params = checkpointer.restore(path, abstract)
  return config, model, params, data.make_tokenizer(config.data)
