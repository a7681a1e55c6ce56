"""What a fine-tuned run is used for once trained: `bigflax predict` (a classifier's labels and
probabilities for a file of texts) and `bigflax export` (a plain run directory of its params, LoRA
adapters folded in with --merge). Neither writes over anything that exists."""

import contextlib
import glob
import json
import os
import pathlib
import shutil
import sys
import tempfile

import jax
import numpy as np

from bigflax import rundir
from bigflax.errors import UserError
from bigflax.layers import merge_lora


def predict(workdir, input_path: str, output: str | None = None, *, overwrite: bool = False,
            step: int | None = None) -> int:
  """Writes one JSON line per text of `input_path` (JSON lines or CSV, as the run's classification
  data) to `output` (stdout when None): {"label": the most probable, "probabilities": {label: p}}.
  Returns how many texts it classified."""
  from bigflax.data import classify  # the classification data's reader and batches
  if output and pathlib.Path(output).exists() and not overwrite:
    raise UserError(f"--output {output} exists; choose another file, or pass --overwrite to "
                    "replace it")
  config, model, params, tokenizer = rundir.load_run(workdir, step)
  if config.get("task", "lm") != "classify":
    raise UserError(f"{workdir} holds a {config.get('task', 'lm')!r} run, not a classifier; "
                    "predict needs a run trained with config.task=classify")
  if "://" not in input_path and not glob.glob(input_path):
    raise UserError(f"--input {input_path}: no such file; give a JSON-lines or CSV file of texts "
                    f"(field {config.data.text_feature!r})")
  texts, tokens = classify.predict_input(input_path, config.data, tokenizer)
  probabilities = jax.jit(lambda p, b: jax.nn.softmax(model.apply(
      {"params": p}, b["inputs"], b["positions"], b["segment_ids"]), axis=-1))
  rows = [np.asarray(probabilities(params, batch)) for batch in
          classify.in_order(tokens, config.batch_size, config.model.block_size)]
  labels = tuple(config.data.labels)
  lines = [json.dumps({"label": labels[int(np.argmax(p))],
                       "probabilities": {name: float(q) for name, q in zip(labels, p)}})
           for p in np.concatenate(rows)[:len(texts)]]
  text = "".join(line + "\n" for line in lines)
  if output is None:
    sys.stdout.write(text)
  else:
    with _atomic_file(pathlib.Path(output)) as file:
      file.write_text(text, encoding="utf-8")
  return len(lines)


def export(workdir, output: str, *, merge: bool = False, step: int | None = None) -> None:
  """A plain run directory at `output` (config.json and params/) holding the run's params (its
  export, or checkpoint `step`): what `init_from`, `sample` and `convert_hf` read. A LoRA run
  needs `merge`: its adapters are folded into the kernels (kernel + A·B·alpha/rank) and the
  config says lora_rank 0, so the export is the same function without adapters."""
  target = pathlib.Path(output)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise UserError(f"--output {output} exists and is not empty; choose a new directory "
                    "(an export never writes over anything)")
  config, model, params, _ = rundir.load_run(workdir, step)
  if model.cfg.lora_rank:
    if not merge:
      raise UserError(f"{workdir} has LoRA adapters (config.finetune.lora_rank="
                      f"{model.cfg.lora_rank}); pass --merge to fold them into the weights")
    params = merge_lora(params, model.cfg)
    with config.unlocked():
      config.finetune.lora_rank = 0
      config.finetune.trainable = ""
  with _atomic_dir(target) as directory:
    rundir.write_config(config, directory)
    rundir.export_params(directory, params)


@contextlib.contextmanager
def _atomic_file(path: pathlib.Path):
  """A temporary file beside `path`, renamed to it when the block succeeds, removed otherwise."""
  handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
  os.close(handle)
  try:
    yield pathlib.Path(temporary)
    os.replace(temporary, path)
  finally:
    pathlib.Path(temporary).unlink(missing_ok=True)


@contextlib.contextmanager
def _atomic_dir(path: pathlib.Path):
  """A temporary directory beside `path`, renamed to it when the block succeeds (so an
  interrupted export leaves no half-written run), removed otherwise."""
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
  try:
    yield temporary
    if path.exists():
      path.rmdir()  # empty: checked before anything was written
    temporary.rename(path)
  finally:
    shutil.rmtree(temporary, ignore_errors=True)
