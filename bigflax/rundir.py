"""A run directory's files: config.json, metrics.jsonl (+ TensorBoard events) and the params export.

    WORKDIR/
      config.json          the resolved config (what the data decided included)
      metrics.jsonl        one JSON object per event; TensorBoard events beside it
      params/              the final params (Orbax), what `bigflax sample` and conversion read
      checkpoints/<step>/  resumable train state (bigflax/checkpoint.py)
"""

import json
import pathlib
import secrets
import shutil

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tensorboardX import SummaryWriter

from bigflax import checkpoint, data
from bigflax.errors import CheckpointError, UserError, first_line
from bigflax.model import ModelConfig, Transformer, abstract_params


def config_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "config.json"


def metrics_path(workdir) -> pathlib.Path:
  return pathlib.Path(workdir) / "metrics.jsonl"


def params_dir(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "params"


def prepare_for_training(workdir, overwrite: bool = False) -> None:
  """Makes `workdir` ready to train in, refusing what would destroy work: a finished export or
  a converted model (config.json and params/, no checkpoint to resume) is replaced only with
  `overwrite`; a workdir that is a file or not writable is named with the fix."""
  root = pathlib.Path(workdir)
  if root.exists() and not root.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory; choose another --workdir")
  has_checkpoints = (root / "checkpoints").is_dir() and any((root / "checkpoints").iterdir())
  if config_path(root).exists() and params_dir(root).exists() and not has_checkpoints:
    if not overwrite:
      raise UserError(
          f"--workdir {workdir} holds a finished model (config.json and params/) and no "
          "checkpoint to resume, so training there would replace it; pick a new --workdir "
          "(to start from those weights, use it as the source of a new run), or pass "
          "--overwrite to replace it")
    for stale in (config_path(root), metrics_path(root), *root.glob("events.out.tfevents*")):
      stale.unlink(missing_ok=True)
    shutil.rmtree(params_dir(root))
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe = root / ".bigflax-write-test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise UserError(f"cannot write to --workdir {workdir} ({e.strerror}); choose a writable "
                    "directory") from None


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
  """Writes records like {"step": 10, "loss": 3.2, ...} to metrics.jsonl, their scalars to
  TensorBoard and, with config.metrics.wandb_project, to Weights & Biases (with the config); a
  no-op on processes other than 0."""

  def __init__(self, workdir: str, enabled: bool = True, resumed_at: int | None = None,
               config: ml_collections.ConfigDict | None = None):
    """resumed_at: the checkpoint step a resumed run restarts from. TensorBoard then hides what
    the earlier run logged after it (those steps are recomputed), as metrics.jsonl drops it.
    config: the run's; its `metrics` section says whether W&B logs too."""
    self.enabled = enabled
    self._wandb = None
    if enabled:
      self._jsonl = open(metrics_path(workdir), "a", encoding="utf-8")
      self._tensorboard = SummaryWriter(
          str(workdir), purge_step=None if resumed_at is None else resumed_at + 1)
      if config is not None and config.get("metrics") and config.metrics.wandb_project:
        self._wandb = _start_wandb(workdir, config)

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    record = {k: v.item() if isinstance(v, np.generic | np.ndarray) else v
              for k, v in record.items()}
    # Strict JSON has no NaN/Inf: such values are written as null and named in "nonfinite".
    nonfinite = sorted(k for k, v in record.items() if isinstance(v, float) and not np.isfinite(v))
    strict = {k: None if k in nonfinite else v for k, v in record.items()}
    if nonfinite:
      strict["nonfinite"] = nonfinite
    self._jsonl.write(json.dumps(strict, allow_nan=False) + "\n")
    self._jsonl.flush()
    # The trackers would warn at every NaN: those are skipped (metrics.jsonl names them).
    scalars = {k: v for k, v in record.items() if k != "step" and k not in nonfinite
               and isinstance(v, int | float) and not isinstance(v, bool)}
    for key, value in scalars.items():
      self._tensorboard.add_scalar(key, value, record["step"])
    if self._wandb is not None:
      self._wandb.log(scalars, step=record["step"])

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
      if self._wandb is not None:
        self._wandb.finish()


def _start_wandb(workdir, config):
  """A W&B run logging into WORKDIR/wandb/; a resumed bigflax run continues the same W&B run
  (its id is kept in WORKDIR/wandb_run_id), where the steps logged before are not repeated."""
  # An optional extra, imported only when asked for; config.validate has refused the run already
  # (before anything trained) when it is not installed.
  import wandb  # noqa: PLC0415
  m, root = config.metrics, pathlib.Path(workdir).absolute()
  id_file = root / "wandb_run_id"
  if not id_file.exists():
    id_file.write_text(secrets.token_hex(4) + "\n")  # W&B's own ids are 8 characters too
  return wandb.init(
      project=m.wandb_project, entity=m.wandb_entity or None, name=m.wandb_name or root.name,
      tags=list(m.wandb_tags), config=config.to_dict(), dir=str(root),
      id=id_file.read_text().strip(), resume="allow",
      settings=wandb.Settings(console="off"))  # the terminal stays the trainer's own


def read_metrics(workdir: str) -> list[dict]:
  path = metrics_path(workdir)
  return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def export_params(workdir, params) -> None:
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir(workdir), params, force=True)
    checkpointer.wait_until_finished()


def read_config(workdir) -> ml_collections.ConfigDict:
  path = config_path(workdir)
  if not path.exists():
    raise UserError(f"{workdir} holds no run (no config.json); train one first with: "
                    f"bigflax train --workdir {workdir}")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON ({e}); restore it from the run's checkpoints "
                    f"(checkpoints/<step>/config) or train again") from None


def load_run(workdir, step: int | None = None):
  """(config, model, params, tokenizer) of a run: its params/ export, or checkpoint `step` (the
  latest when the run has no export, e.g. one that was interrupted)."""
  config = read_config(workdir)
  model = Transformer(ModelConfig.from_config(config.model, config.get("finetune")))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nn.unbox(abstract_params(model, config.model.block_size)))
  return config, model, read_params(workdir, abstract, step), data.make_tokenizer(config.data)


def read_params(workdir, abstract, step: int | None = None):
  """A run's params/ export, or checkpoint `step` (the latest when the run has no export),
  restored straight into `abstract`'s shapes, dtypes and shardings (of a checkpoint that holds
  only what trained, the frozen params rebuilt from the run's base)."""
  if step is None and params_dir(workdir).exists():
    path = params_dir(workdir)

    def corrupted(error):
      return CheckpointError(f"the params export {path} is corrupted or incomplete "
                             f"({first_line(error)}); train again or copy it anew")
    with ocp.StandardCheckpointer() as checkpointer:
      try:
        stored = checkpointer.metadata(path).item_metadata.tree
      except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise corrupted(e) from None
      checkpoint.check_shapes(stored, abstract, path)
      try:
        params = checkpointer.restore(path, abstract)
      except Exception as e:  # noqa: BLE001
        raise corrupted(e) from None
  else:
    _, params = checkpoint.read_params(
        workdir, abstract, step, lambda base: _frozen_params(workdir, base, abstract))
  return params


def _frozen_params(workdir, base: dict, abstract):
  """The params a run froze (checkpoint.frozen_base `base`): its init from config.seed under the
  params of its source, as it trained on them; built on one device, then placed as `abstract`."""
  # pretrained reads run directories through this module; run builds what it reads.
  from bigflax import pretrained, run as run_lib  # noqa: PLC0415
  config = read_config(workdir)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  built = run_lib.build(config, jax.devices()[:1])
  params = built.init_state(jax.random.key(config.seed)).params
  if base["init_from"]:
    try:
      source = pretrained.parse(base["init_from"])
    except UserError as e:
      raise checkpoint.base_unreadable(str(workdir), base, e) from None
    params = pretrained.load_params(source, built, params)
  return jax.device_put(params, jax.tree.map(lambda a: a.sharding, abstract))


def load_export(workdir):
  """(config, model, params, tokenizer) of a finished run, from config.json and the export."""
  if not config_path(workdir).exists() or not params_dir(workdir).exists():
    raise UserError(f"{workdir} holds no finished run (need config.json and params/); train "
                    f"one first with: bigflax train --workdir {workdir}")
  return load_run(workdir)
