"""Named eval sets (`config.eval.sets`): each a fixed list of batches, evaluated with the run's
jitted eval step for loss, perplexity, token accuracy and bits per byte.

    config.eval.sets = "val;shakespeare=text:/data/tiny.txt;c4=tfds:c4/en:3.1.0:validation"

`val` is the run's own val split (the batches bigflax.data.eval_batches makes; a windows run with
eval_batches > 0 keeps nanoGPT's random val windows), logged under the historical names
eval_loss, eval_perplexity, eval_accuracy, eval_bpb, eval_documents. NAME=KIND:WHERE is every
document of another source, opened by bigflax.data's readers with the run's config.data (its
tokenizer, text feature, …) pointed at WHERE (registry `KINDS`), packed into rows like the val
split, and logged as eval/NAME/loss, eval/NAME/bpb, …

Bits per byte: the summed loss in nats over the UTF-8 bytes that the evaluated targets decode to,
÷ ln 2, so models with different tokenizers compare. The bytes are counted on the host from each
batch (the tokenizer's `byte_lengths()` of every target the loss counts) and summed over the
processes on the mesh like the loss, so every process gets the same numbers.
"""

import copy
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from bigflax import data, run as run_lib, sharding
from bigflax.data import cache, mixture, pipeline
from bigflax.errors import ConfigError, DataError

VAL_SET = "val"


def parse(spec: str) -> list[tuple[str, str, str]]:
  """[(name, kind, where)] of config.eval.sets; kind "" for the run's own val split."""
  sets = []
  for part in filter(None, (p.strip() for p in spec.split(";"))):
    if part == VAL_SET:
      sets.append((VAL_SET, "", ""))
      continue
    name, equals, source = (s.strip() for s in part.partition("="))
    kind, colon, where = (s.strip() for s in source.partition(":"))
    if not (equals and name and colon and where) or "/" in name:
      raise ConfigError(f"config.eval.sets part {part!r} is not 'val' or NAME=KIND:WHERE; write "
                        "e.g. 'val;shakespeare=text:/data/tiny.txt' (NAME without '/')")
    if name == VAL_SET:
      raise ConfigError(f"config.eval.sets part {part!r}: the name 'val' is the run's own val "
                        "split; give this set another name")
    if kind not in KINDS:
      raise ConfigError(f"config.eval.sets set {name!r}: unknown source {kind!r}; use one of "
                        f"{sorted(KINDS)} (e.g. {name}=text:/data/file.txt)")
    sets.append((name, kind, where))
  names = [s[0] for s in sets]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.eval.sets names a set twice ({names}); give each its own name")
  return sets


def _as_val_split(data_config, kind: str, where: str):
  """Sources with a separate val location: every file of WHERE as the val split."""
  c = copy.deepcopy(data_config)
  with c.unlocked():
    c.update(source=kind, path=where, val_path=where, mixture="")
  return data.open_splits(c)[1]


def _text(data_config, kind: str, where: str):
  """A local corpus: both of its splits, so every document (the one the val cut falls in stays
  cut in two)."""
  c = copy.deepcopy(data_config)
  with c.unlocked():
    c.update(source=kind, path=where, mixture="")
  train, val, _ = data.open_splits(c)
  return mixture.Concat([train, val])


def _tfds(data_config, kind: str, where: str):
  """tfds:NAME[:VERSION]:SPLIT; without a split, config.data.val_split."""
  name, _, split = where.rpartition(":")
  if not name or split[:1].isdigit():  # no split given: the last part is the name or a version
    name, split = where, data_config.val_split
  c = copy.deepcopy(data_config)
  with c.unlocked():
    c.update(source=f"tfds:{name}", train_split=split, val_split=split, mixture="")
  return data.open_splits(c)[1]


def _cache(data_config, kind: str, where: str):
  manifest = cache.read_manifest(where, "config.eval.sets")
  try:
    cache.check_tokenizer(manifest, data_config, where)
  except DataError:
    built = manifest["tokenizer"]
    raise ConfigError(
        f"config.eval.sets: the token cache {where} was built with the tokenizer "
        f"{built['name']} (hash {built['hash'][:12]}), not the model's {data_config.tokenizer}; "
        "evaluate the raw text instead, or rebuild the cache with the model's tokenizer "
        "(tools/prepare_data.py)") from None
  return _as_val_split(data_config, kind, where)


# KIND → (config.data, kind, where) → the set's documents.
KINDS = {"text": _text, "jsonl": _as_val_split, "parquet": _as_val_split, "cache": _cache,
         "sft": _as_val_split, "tfds": _tfds}


@dataclasses.dataclass
class EvalSet:
  name: str
  batches: object  # a sequence of this process's rows of each batch (numpy dicts)
  info: data.EvalInfo | None  # packed sets: what the batches cover
  description: str

  def key(self, metric: str) -> str:
    """Its metric's name in metrics.jsonl and TensorBoard."""
    return f"eval_{metric}" if self.name == VAL_SET else f"eval/{self.name}/{metric}"


def val_set(corpus, config, rows: slice) -> EvalSet:
  """The run's own val split: packed val rows spread over the split (eval_batches of them, or
  (0) every val prediction once); a windows run with eval_batches > 0 keeps nanoGPT's random
  val windows, the way its recipes are measured."""
  if config.data.batching == "windows" and config.eval_batches:
    val = data.make_batches(corpus, config, data.VAL, config.batch_size, rows)
    batches = [val.batch(i) for i in range(config.eval_batches)]
    return EvalSet(VAL_SET, batches, None, f"{config.eval_batches} batches of random val "
                   "windows")
  batches, info = data.eval_batches(corpus, config, config.batch_size, config.eval_batches, rows)
  return EvalSet(VAL_SET, batches, info, describe(info, "the val split"))


def describe(info: data.EvalInfo, what: str) -> str:
  return (f"{info.num_batches} batches, {info.predictions:,} of {what}'s "
          f"{info.split_predictions:,} predictions, {info.documents} of its "
          f"{info.split_documents} documents")


def open_set(config, tokenizer, name: str, kind: str, where: str, rows: slice) -> EvalSet:
  """Every document of one named source, packed into eval rows with the model's tokenizer."""
  try:
    documents = KINDS[kind](config.data, kind, where)
  except DataError as e:  # the readers name config.data's fields: say which set it is
    raise DataError(f"config.eval.sets set {name!r} ({kind}:{where}): {e}") from None
  if not len(documents):
    raise DataError(f"config.eval.sets set {name!r} ({kind}:{where}) has no documents")
  documents = pipeline.tokenized(documents, tokenizer)  # sft examples tokenize themselves
  corpus = data.Corpus(documents, documents, tokenizer, f"{kind}:{where}")
  batches, info = data.eval_batches(corpus, config, config.batch_size, config.eval_batches, rows)
  return EvalSet(name, batches, info, describe(info, f"{kind}:{where}"))


def open_sets(config, tokenizer, batch_sharding, corpus=None) -> list[EvalSet]:
  """config.eval.sets' sets, this process's rows of each batch; `corpus` (the run's data, for
  `val`) is loaded when needed and not given."""
  rows = sharding.process_rows(batch_sharding, config.batch_size)
  sets = []
  for name, kind, where in parse(config.eval.sets):
    if kind and config.task != "lm":
      raise ConfigError(f"config.eval.sets set {name!r}: a named set is text to predict, and "
                        f"this run is config.task={config.task!r}; evaluate its own val split "
                        "(config.eval.sets='val')")
    if kind:
      sets.append(open_set(config, tokenizer, name, kind, where, rows))
      continue
    corpus = corpus or data.load_corpus(config.data, config.model.block_size, config.task)
    sets.append(val_set(corpus, config, rows))
  return sets


def target_bytes(tokenizer, lengths: np.ndarray, batch: dict) -> np.ndarray:
  """The UTF-8 bytes each counted target of `batch` decodes to ([rows, length], int32);
  `lengths` is tokenizer.byte_lengths()."""
  mask = batch["loss_mask"] > 0
  counts = lengths[batch["targets"]]
  dummy_prefix = getattr(tokenizer, "dummy_prefix_bytes", None)  # sentencepiece's
  if dummy_prefix is not None:
    counts = counts - dummy_prefix(batch["inputs"], batch["targets"])
  return np.where(mask, counts, 0).astype(np.int32)


def summary(totals: dict) -> dict[str, float]:
  """Summed eval-step outputs (plus `bytes`, a language model's) → the set's metrics:
  run.eval_summary's and bits per byte."""
  metrics = run_lib.eval_summary(totals)
  if "bytes" in totals:
    metrics["bpb"] = float(totals["loss_sum"]) / math.log(2) / max(float(totals["bytes"]), 1.0)
  return metrics


class Evaluator:
  """Runs the eval sets of one run: `evaluate(eval_step)` with eval_step(global batch) → the
  run's summed eval-step outputs (run.eval_step on some params)."""

  def __init__(self, run, tokenizer, sets: list[EvalSet]):
    self.sets, self._tokenizer, self._batch_sharding = sets, tokenizer, run.batch_sharding
    self._lengths = tokenizer.byte_lengths()
    # Bits per byte are a next-token model's: an MLM's loss reads only its masked tokens, and a
    # classifier's rows have labels, not targets.
    self._counts_bytes = run.config.task == "lm" and run.config.objective == "next_token"
    self._sum = jax.jit(jnp.sum, in_shardings=run.batch_sharding,
                        out_shardings=sharding.replicated(run.mesh))

  def evaluate_set(self, eval_set: EvalSet, eval_step) -> dict[str, float]:
    totals = []
    for batch in eval_set.batches:
      step_totals = dict(eval_step(sharding.global_batch(batch, self._batch_sharding)))
      if self._counts_bytes:
        step_totals["bytes"] = self._sum(jax.make_array_from_process_local_data(
            self._batch_sharding, target_bytes(self._tokenizer, self._lengths, batch)))
      totals.append(step_totals)
    totals = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *totals)
    metrics = summary(totals)
    if eval_set.info is not None:
      metrics["documents"] = eval_set.info.documents
    return metrics

  def evaluate(self, eval_step) -> dict[str, dict[str, float]]:
    """{set name: {metric: value}} for every set."""
    return {s.name: self.evaluate_set(s, eval_step) for s in self.sets}

  def record(self, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`evaluate`'s results as one metrics.jsonl record's fields."""
    by_name = {s.name: s for s in self.sets}
    return {by_name[name].key(metric): value for name, metrics in results.items()
            for metric, value in metrics.items()}


def progress_line(results: dict[str, dict[str, float]]) -> str:
  """One line for the progress bar: the val split first, as it always read."""
  parts = []
  for name, m in results.items():
    details = ", ".join(text.format(m[key]) for key, text in (
        ("perplexity", "perplexity {:.2f}"), ("bpb", "{:.4f} bits/byte"),
        ("macro_f1", "macro-F1 {:.4f}")) if key in m)
    line = f"{m['loss']:.4f}" + (f" ({details})" if details else "")
    if name == VAL_SET:
      parts.insert(0, f"eval_loss {line}")
    else:
      parts.append(f"{name} {line}")
  return "; ".join(parts)
