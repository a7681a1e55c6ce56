"""Orbax checkpoints: resumable train state in WORKDIR/checkpoints/<step>/ and the preemption
signals that trigger a final save.

A checkpoint has three items: `state` (params, optimizer state, step and dropout RNG; arrays in
Orbax's OCDBT format, restored straight into the shardings of whatever mesh the new run has),
`data` (the data iterator's state, JSON) and `config` (the resolved config, JSON). Nothing is
ever pickled. Orbax writes each save to `<step>.orbax-checkpoint-tmp/` and renames it on commit,
so a save killed half-way never shadows the previous checkpoint; the manager deletes such
leftovers when it opens the directory.

A run whose base params are frozen (config.finetune.trainable lora or head: LoRA adapters or a
classifier head on a pretrained model) stores only the params that train, and names its base in
the step's metadata (`frozen_base`); the frozen params come from that base again when the
checkpoint is restored or read, so a checkpoint is the size of what trains.
"""

import contextlib
import json
import os
import pathlib
import signal
import threading

import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from bigflax import config as config_lib, optim, sharding
from bigflax.errors import CheckpointError, NonFiniteError, first_line

# Config fields a resumed run must share with its checkpoint: they fix the stored arrays' shapes
# (model; optimizer.name and skip_nonfinite shape the optimizer state) or the data stream the run
# continues (data, batch_size, seed). Anything else (steps, learning rate, mesh, …) may change.
RESUME_FIXED_FIELDS = ("model", "data", "batch_size", "seed", "optimizer.name", "skip_nonfinite")
# ... except these, which change how fast or where, not what is stored or read.
RESUME_FREE_FIELDS = ("model.dtype", "model.remat", "model.attention_chunk", "model.attention",
                      "data.prefetch", "data.data_dir", "data.download_hint")
_MAX_LISTED = 12  # differences listed in an error before "… and N more"


def checkpoints_dir(workdir: str) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


def _path_str(path) -> str:
  """One spelling for a tree path whether its nodes are dicts, lists, namedtuples or dataclasses
  (Orbax's metadata turns the latter two into dicts)."""
  names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
  return "/".join(str(n) for n in names)


def _flat(tree) -> dict:
  return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listed(lines: list[str]) -> str:
  more = f"\n  … and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
  return "".join(f"\n  {line}" for line in lines[:_MAX_LISTED]) + more


def shape_mismatches(stored, expected) -> list[str]:
  """Paths whose arrays differ between a checkpoint's metadata tree and an abstract tree."""
  stored, expected = _flat(stored), _flat(expected)
  lines = []
  for path in sorted(stored.keys() | expected.keys()):
    if path not in expected:
      lines.append(f"{path}: {tuple(stored[path].shape)} in the checkpoint, absent from the model")
    elif path not in stored:
      lines.append(f"{path}: {tuple(expected[path].shape)} in the model, absent from the "
                   "checkpoint")
    elif tuple(stored[path].shape) != tuple(expected[path].shape):
      lines.append(f"{path}: {tuple(stored[path].shape)} in the checkpoint, "
                   f"{tuple(expected[path].shape)} in the model")
  return lines


def check_shapes(stored, expected, where) -> None:
  lines = shape_mismatches(stored, expected)
  if lines:
    raise CheckpointError(f"{where} was written by a model of a different shape; mismatched "
                          f"arrays (path: checkpoint vs model):{_listed(lines)}")


def config_differences(stored: dict, current: dict) -> list[str]:
  """`RESUME_FIXED_FIELDS` on which two configs (as JSON-able dicts) disagree, as lines. A field
  the stored config lacks (written before the field existed) has its default: what it ran with."""
  def flat(d, prefix=""):
    out = {}
    for key, value in d.items():
      if isinstance(value, dict):
        out.update(flat(value, f"{prefix}{key}."))
      else:
        out[f"{prefix}{key}"] = value
    return out
  json_dict = lambda config: json.loads(json.dumps(config))
  stored = {**flat(json_dict(config_lib.base().to_dict())), **flat(stored)}
  current = flat(json_dict(current))
  fixed = lambda key: (key not in RESUME_FREE_FIELDS
                       and any(key == f or key.startswith(f + ".") for f in RESUME_FIXED_FIELDS))
  return [f"config.{key}: {stored.get(key)!r} in the checkpoint, {current.get(key)!r} now"
          for key in sorted(k for k in stored.keys() | current.keys() if fixed(k))
          if stored.get(key) != current.get(key)]


def frozen_base(config) -> dict | None:
  """What a run whose base params are frozen records in its checkpoints' metadata instead of
  them: the source they come from (config.init_from as an absolute path, so a resume from another
  directory finds it; "" for the init of config.seed) and config.finetune.trainable (which params
  the checkpoint holds). None when every param trains: its checkpoints hold them all."""
  trainable = optim.trainable_of(config.finetune)
  if trainable == "all":
    return None
  spec = config.get("init_from") or ""
  return {"init_from": os.path.abspath(os.path.expanduser(spec)) if spec else "",
          "trainable": trainable}


def describe_base(base: dict) -> str:
  return (f"config.init_from={base['init_from']!r}" if base["init_from"]
          else "the init of config.seed")


def base_unreadable(run: str, base: dict, error: Exception) -> CheckpointError:
  """`run`'s checkpoints lack its frozen params, and their source (`base`) cannot be read."""
  return CheckpointError(
      f"the checkpoints of {run} hold only the params config.finetune.trainable="
      f"{base['trainable']!r} trains; the frozen rest comes from its source again, which cannot "
      f"be read: {first_line(error)}")


def trainable_only(params, trainable: str):
  """`params` with the leaves `trainable` (config.finetune.trainable) freezes replaced by optax's
  empty MaskedNode, as the optimizer state holds them: what a frozen-base checkpoint stores."""
  return jax.tree.map(lambda p, t: p if t else optax.MaskedNode(), params,
                      optim.trainable_mask(params, trainable))


def with_frozen(stored, base):
  """`base` (a full params tree) with the leaves `stored` (a `trainable_only` tree) holds."""
  return jax.tree.map(lambda s, b: b if isinstance(s, optax.MaskedNode) else s, stored, base,
                      is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def state_item(state, rng, mesh, base: dict | None = None) -> dict:
  """What a checkpoint stores of a train state and its dropout key: with a `frozen_base`, only
  the params that train. The key as raw data (typed keys are not an array dtype Orbax writes),
  replicated so every host holds it."""
  rng = jax.device_put(jax.random.key_data(rng), sharding.replicated(mesh))
  return _item(state, rng, base)


def abstract_state_item(abstract_state, mesh, base: dict | None = None) -> dict:
  """`state_item`'s shapes and dtypes in the run's own shardings: the restore target."""
  rng = jax.ShapeDtypeStruct(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape,
                             jnp.uint32,
                             sharding=sharding.replicated(mesh))
  return _item(abstract_state, rng, base)


def _item(state, rng, base: dict | None) -> dict:
  params = state.params if base is None else trainable_only(state.params, base["trainable"])
  return {"params": params, "opt_state": state.opt_state, "step": state.step, "rng": rng}


@jax.jit
def _all_finite(tree):
  """Whether no float in `tree` is NaN/Inf: x·0 is 0 unless x is, and a sum keeps NaN (a max need
  not, on CPU). Cheaper than isfinite().all(), and a save blocks the loop for this."""
  floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.isfinite(sum(jnp.sum(x * 0, dtype=jnp.float32) for x in floats))


def _stored_base(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The `frozen_base` checkpoint `step` was written over (None: it holds every param)."""
  return (manager.metadata(step).custom_metadata or {}).get("frozen_base")


def _held(base: dict | None) -> str:
  return ("every param" if base is None else f"only the params config.finetune.trainable="
          f"{base['trainable']!r} trains, over the frozen base {describe_base(base)}")


def _item_handlers() -> dict:
  """How each item is read and written. A data pipeline with its own iterator checkpointing (e.g.
  grain's) replaces `data`'s handler; the rest stays."""
  return {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
          "config": ocp.JsonCheckpointHandler()}


class Checkpointer:
  """The run's Orbax CheckpointManager. `should_save` says when (every `config.checkpoint_every`
  steps), `save` writes asynchronously, and the latest `config.keep_checkpoints` plus every
  `config.keep_every`-th step are kept. In a multi-host run every process writes its shards of the
  state; the JSON items (data position, config) come from process 0, which suits data positions
  that are a function of the step."""

  def __init__(self, workdir: str, config):
    self.directory = checkpoints_dir(workdir)
    keep = [policies.LatestN(config.keep_checkpoints)]
    if config.keep_every:
      keep.append(policies.EveryNSteps(config.keep_every))
    decide = (policies.FixedIntervalPolicy(config.checkpoint_every) if config.checkpoint_every
              else policies.SpecificStepsPolicy(()))
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=_item_handlers(),
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True, save_decision_policy=decide,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True))

  def step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the same step once any host got a preemption notice (JAX's
    distributed preemption service; always False without it)."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, item: dict, data_state: dict, config: dict,
           base: dict | None = None) -> None:
    """Starts writing checkpoint `step`: the state item (`state_item`), the data position and
    the config, whether or not `should_save`; returns once the arrays are copied off the devices,
    so the next step may overwrite them. A `frozen_base` item is recorded in the step's metadata.
    Refuses a non-finite state: it would poison every later resume."""
    if not bool(_all_finite(item)):
      raise NonFiniteError(f"the train state at step {step} holds NaN or Inf values, so it was "
                           "not checkpointed; " + NonFiniteError.FIX)
    self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(item), data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config)), custom_metadata={"frozen_base": base} if base else None)

  def restore(self, step: int, target: dict, config: dict,
              base: dict | None = None) -> tuple[dict, dict]:
    """(state item, data position) of checkpoint `step`, the arrays restored straight into the
    shardings of `target` (`abstract_state_item` with the run's `frozen_base`, `base`), after
    checking that the checkpoint's config agrees with `config` on what it fixes, that it was
    written over the same frozen base (or none), and that its arrays have the target's shapes."""
    where = self.step_dir(step)
    try:
      stored_config = self._manager.restore(
          step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
      stored_tree = self._manager.item_metadata(step)["state"].tree
      stored_base = _stored_base(self._manager, step)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
      raise self._unreadable(step, e) from e
    differences = config_differences(stored_config, config)
    if differences:
      raise CheckpointError(
          f"{where} was written with a different config; these fields must match to resume:"
          f"{_listed(differences)}\nrun with the checkpoint's values (see "
          f"{self.directory.parent / 'config.json'}), or pick a new --workdir to start over")
    if stored_base != base:
      raise CheckpointError(
          f"{where} holds {_held(stored_base)}, but this run's would hold {_held(base)}; resume "
          "with the checkpoint's config.finetune.trainable and config.init_from (see "
          f"{self.directory.parent / 'config.json'}), or pick a new --workdir to start over")
    check_shapes(stored_tree, target, where)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001
      raise self._unreadable(step, e) from e
    return restored["state"], restored["data"]

  def _unreadable(self, step: int, error: Exception) -> CheckpointError:
    older = [s for s in self._manager.all_steps() if s < step]
    where = self.step_dir(step)
    offer = (f"; the older checkpoint {self.step_dir(older[-1])} is complete: move the broken one "
             f"aside (mv {where} {where}.broken) and run again to resume from step {older[-1]}"
             if older else "; no older checkpoint exists: delete it to start over")
    reason = first_line(error)
    return CheckpointError(f"checkpoint {where} is corrupted or incomplete ({reason}){offer}")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager's threads."""
    self._manager.close()


@contextlib.contextmanager
def stop_signals():
  """Yields a function telling whether SIGTERM or SIGINT has arrived, so the loop can finish its
  step and checkpoint instead of dying. A second signal acts as it would have (kills).

  Only on a single process: across hosts each one would stop at a different step, so there
  JAX's preemption service (which owns SIGTERM) picks one step for all, see `reached_preemption`.
  """
  received = []
  if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
    yield lambda: False
    return

  def handle(signum, frame):
    del frame
    received.append(signum)
    signal.signal(signum, previous[signum])

  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield lambda: bool(received)
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def read_params(workdir, abstract_params, step: int | None, base_params) -> tuple[int, dict]:
  """(step, params) of checkpoint `step` (None: the latest) in `workdir`, restored into
  `abstract_params`' shapes and shardings, without its optimizer state. Of a checkpoint written
  over a frozen base, the frozen params are `base_params(frozen_base)`'s (a full params tree in
  those shardings). Read-only: a run still training there is not disturbed."""
  directory = checkpoints_dir(workdir)
  manager = ocp.CheckpointManager(
      directory, item_handlers={"state": ocp.PyTreeCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True))
  with manager:
    steps = manager.all_steps()
    if step is None and not steps:
      raise CheckpointError(f"{workdir} has no params/ export and no checkpoint to read; train "
                            f"first with: bigflax train --workdir {workdir}")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise CheckpointError(f"{workdir} has no checkpoint of step {step}; its checkpoints are "
                            f"steps {sorted(steps)}")
    where = directory / str(step)
    try:
      stored = manager.item_metadata(step)["state"]
      stored = getattr(stored, "tree", stored)["params"]
      base = _stored_base(manager, step)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupted or incomplete "
                            f"({first_line(e)})") from None
    target = abstract_params if base is None else trainable_only(abstract_params, base["trainable"])
    check_shapes(stored, target, where)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": target},
          restore_args=jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                    {"params": target}),
          partial_restore=True)))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"checkpoint {where} is corrupted or incomplete "
                            f"({first_line(e)})") from None
  params = restored["state"]["params"]
  return step, params if base is None else with_frozen(params, base_params(base))
