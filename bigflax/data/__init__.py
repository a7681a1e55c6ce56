"""Data: a source's documents (`reader`) → a tokenizer → the batches of each split (`pipeline`).

A task's corpus is batched its own way (`TASKS`): a language model's documents into packed rows
or windows (`pipeline`), a classifier's labelled texts one to a row (`classify`). Examples that
are more than text (fine-tuning examples, `sft`; labelled texts) tokenize themselves once the
tokenizer is known (their `tokenize`).
"""

import dataclasses
import glob

import numpy as np

from bigflax.data import cache, classify, mixture, pipeline, shards
from bigflax.data.pipeline import (BATCHINGS, SPLIT_NAMES, TRAIN, VAL, Batches, EvalBatches,
                                   EvalInfo)
from bigflax.data.reader import SOURCES, TextSource, open_splits
from bigflax.data.sources import DOCUMENT_UNITS
from bigflax.data.tokenizers import (TOKENIZERS, CharTokenizer, DataError, make_tokenizer,
                                     padded_vocab_size)
from bigflax.data.windows import check_long_enough, window_batch
from bigflax.errors import ConfigError


@dataclasses.dataclass
class Corpus:
  train: TextSource
  val: TextSource
  tokenizer: object
  description: str
  mixture: list | None = None  # a mixture's train sources: [(name, weight, documents)]
  task: str = "lm"  # what the corpus trains (config.task): how it is batched (TASKS)
  labels: tuple[str, ...] = ()  # classify: the label of each id (run.resolve records them)
  _tokens: dict = dataclasses.field(default_factory=dict, repr=False)

  def documents(self, split: int) -> TextSource:
    return self.train if split == TRAIN else self.val

  def tokens(self, split: int) -> np.ndarray:
    """The split's documents in corpus order, joined by a blank line, as one token array (the
    windows batching reads a flat corpus, nanoGPT's way)."""
    if split not in self._tokens:
      joined = b"\n\n".join(self.documents(split).in_order())
      self._tokens[split] = self.tokenizer.encode_bytes(
          joined, f"the {SPLIT_NAMES[split]} split of {self.description}")
    return self._tokens[split]


def check_config(c) -> None:
  """Raises ConfigError naming the first field of `config.data` that cannot work."""
  for key, choices in (("tokenizer", TOKENIZERS), ("batching", BATCHINGS),
                       ("documents", DOCUMENT_UNITS)):
    if c[key] not in choices:
      raise ConfigError(f"config.data.{key}={c[key]!r} is unknown; choose one of "
                        f"{sorted(choices)}")
  if not 0.0 < c.val_fraction < 1.0:
    raise ConfigError(f"config.data.val_fraction must be in (0, 1), got {c.val_fraction}")
  if c.prefetch < 0:
    raise ConfigError(f"config.data.prefetch must be >= 0, got {c.prefetch}")
  if c.val_shards < 0:
    raise ConfigError(f"config.data.val_shards must be >= 0, got {c.val_shards}")
  if c.mixture:
    mixture.parse(c.mixture)
    if c.path or c.val_path or c.source:
      raise ConfigError("config.data.mixture names its sources itself (a shard glob's format "
                        "comes from its file names); leave config.data.source, path and val_path "
                        "empty")
  if (c.mixture or c.source in ("cache", "sft")) and c.batching != "packed":
    raise ConfigError(f"config.data.batching={c.batching!r} reads the whole split as one token "
                      "array, which a token cache, fine-tuning examples or a mixture do not "
                      "keep; use config.data.batching=packed")
  if len(set(c.labels)) != len(c.labels) or not all(isinstance(x, str) and x for x in c.labels):
    raise ConfigError(f"config.data.labels={tuple(c.labels)!r} must be distinct non-empty "
                      "strings (or empty: the labels of the training examples)")


def _tokenizer_for(data_config, train: TextSource, val: TextSource, description: str):
  built = getattr(train, "tokenizer", None)  # a token cache's: its charset when none is given
  if data_config.tokenizer == "char" and not data_config.charset and built:
    return CharTokenizer(built["charset"])
  if data_config.tokenizer == "char" and not data_config.charset:
    # The corpus's own characters, so the char tokenizer is for corpora that fit in memory.
    return CharTokenizer.of_corpus(train.in_order() + val.in_order(), description)
  return make_tokenizer(data_config)


# config.task → (its splits of config.data, make_batches, eval_batches).
TASKS = {
    "lm": (open_splits, pipeline.make_batches, pipeline.eval_batches),
    "classify": (classify.open_splits, classify.make_batches, classify.eval_batches),
}


def load_corpus(data_config, block_size: int, task: str = "lm") -> Corpus:
  """Opens `config.data`'s source for `task` (config.task) and builds its tokenizer (a char
  tokenizer with no charset takes the corpus's own); windows batching also needs
  block_size + 1 tokens in each split."""
  if task not in TASKS:
    raise ConfigError(f"config.task={task!r} is unknown; choose one of {sorted(TASKS)}")
  if data_config.download_hint and data_config.path and not glob.glob(data_config.path):
    raise DataError(f"config.data.path={data_config.path!r} does not exist; download it from "
                    f"{data_config.download_hint} and pass --config.data.path=FILE")
  if data_config.mixture and task == "lm":
    return _mixture_corpus(data_config)
  train, val, description = TASKS[task][0](data_config)
  # Raw shards' train split is left unread: each host reads only its share (pipeline.host_of).
  per_host = hasattr(train, "share")
  for split, documents in (("train", train), ("val", val)):
    if not (per_host and split == "train") and not len(documents):
      raise DataError(f"the {split} split of {description} has no documents; give more text or "
                      "(for val) raise config.data.val_fraction")
  tokenizer = _tokenizer_for(data_config, train, val, description)
  labels = getattr(train, "names", ())
  train, val = pipeline.tokenized(train, tokenizer), pipeline.tokenized(val, tokenizer)
  counts = (f"{len(val):,} val documents (each host counts the train documents of its own "
            "shards)" if per_host else f"{len(train):,} train / {len(val):,} val documents")
  corpus = Corpus(train, val, tokenizer, f"{description}: {counts}", task=task, labels=labels)
  if data_config.batching == "windows":
    for split in (VAL,) if per_host else (TRAIN, VAL):  # windows checks a train left unread
      check_long_enough(corpus.tokens(split), block_size, SPLIT_NAMES[split])
  return corpus


def make_batches(corpus, config, split: int, batch_size: int,
                 rows: slice = slice(None)) -> Batches:
  """The global batches of `batch_size` rows of `split` (TRAIN or VAL), or the `rows` of each
  that one process holds, as the corpus's task batches them."""
  return TASKS[getattr(corpus, "task", "lm")][1](corpus, config, split, batch_size, rows)


def eval_batches(corpus, config, batch_size: int, num_batches: int,
                 rows: slice = slice(None)) -> tuple[EvalBatches, EvalInfo]:
  """The batches every evaluation runs and what they cover, as the corpus's task evaluates
  (`pipeline.eval_batches`, `classify.eval_batches`)."""
  return TASKS[getattr(corpus, "task", "lm")][2](corpus, config, batch_size, num_batches, rows)


def _mixture_corpus(data_config) -> Corpus:
  """A mixture (`config.data.mixture`): each source a shard glob or a token cache directory."""
  c = data_config
  parts, kinds = [], set()
  for name, where, weight in mixture.parse(c.mixture):
    if cache.is_cache(where):
      train, val, description, manifest = cache.open_cache(c, where, "", c.val_shards)
      train.tokenizer = val.tokenizer = manifest["tokenizer"]
    else:
      train, val, description = shards.open_shards(where, "", c.val_shards, c.text_feature,
                                                   field=f"config.data.mixture source {name!r}")
    kinds.add(hasattr(train, "tokens"))
    for split, documents in (("train", train), ("val", val)):
      if not (split == "train" and hasattr(documents, "share")) and not len(documents):
        raise DataError(f"the {split} split of mixture source {name!r} ({description}) has no "
                        "documents; give it more shards or lower config.data.val_shards")
    parts.append((name, weight, train, val, description))
  built = {p[2].tokenizer["hash"] for p in parts if hasattr(p[2], "tokenizer")}
  if len(built) > 1:
    raise DataError("config.data.mixture: its token caches were built with different tokenizers "
                    "(or charsets); rebuild them with one tokenizer (tools/prepare_data.py)")
  if len(kinds) > 1:
    raise DataError("config.data.mixture mixes token caches and raw shards; prepare every "
                    "source with tools/prepare_data.py, or none")
  concat = mixture.TokenConcat if kinds == {True} else mixture.Concat
  train, val = concat([p[2] for p in parts]), concat([p[3] for p in parts])
  if kinds == {True}:
    train.tokenizer = parts[0][2].tokenizer
  description = "mixture of " + "; ".join(f"{n} {w:g}: {d}" for n, w, _, _, d in parts)
  return Corpus(train, val, _tokenizer_for(c, train, val, description), description,
                mixture=[(n, w, t) for n, w, t, _, _ in parts])


__all__ = ["BATCHINGS", "Batches", "Corpus", "check_config", "DOCUMENT_UNITS", "DataError",
           "SOURCES", "TASKS", "TOKENIZERS", "TRAIN", "VAL", "EvalBatches", "EvalInfo",
           "eval_batches", "load_corpus", "make_batches", "make_tokenizer", "padded_vocab_size",
           "window_batch"]
