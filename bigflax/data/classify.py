"""Classification data (`config.task=classify`): labelled texts, one example a row.

`config.data.path` holds the examples (`examples` says how files are read and split): JSON lines
`{"text": ..., "label": ...}` (the text's field is config.data.text_feature) or CSV whose header
names those columns. A label is a string (JSON integers are read as their digits). The labels are
config.data.labels when given, else the sorted distinct labels of the train split; their ids are
their places in that tuple, and `run.resolve` records it in config.data.labels so the run's
config names what each id means. A val, eval or predict label outside it is a DataError.

A batch (not packed: a row is one example):

  inputs       [B, block_size] int32  the text's first block_size tokens (the tokenizer's
                                      document encoding), right-padded with 0
  segment_ids  [B, block_size] int32  1 on the text's tokens, 0 on padding
  positions    [B, block_size] int32  0, 1, … on the text's tokens, 0 on padding
  labels       [B] int32              the label's id; -1 on a padding row

Longer texts are cut to their first block_size tokens (the batches' notices say how many).
Each epoch of a split shuffles its examples by (seed, split, epoch): global row i is example
order_e[i mod N] of epoch e = i // N, and batch k is rows k·B … k·B + B − 1, of which a process
makes its `rows`; so batch k is a pure function of (data, seed, k) and resuming costs nothing.
The eval takes every val example once, in epoch 0's order, the last batch padded; `predict_input`
reads a file's examples for `bigflax predict`, in file order.
"""

import functools

import numpy as np

from bigflax.data import examples as examples_lib
from bigflax.data.pipeline import (SPLIT_NAMES, VAL, Batches, EvalBatches, EvalInfo,
                                   StepIterator, clamp_eval_batches)
from bigflax.errors import ConfigError, DataError

LABEL_FIELD = "label"


def _label(record: examples_lib.Record, required: bool) -> str | None:
  if not required and record.fields.get(LABEL_FIELD) in (None, ""):
    return None
  value = examples_lib.field(record, LABEL_FIELD, (str, int))
  if value == "":
    raise DataError(f"{record.place} has an empty {LABEL_FIELD!r}; give every training example "
                    "a label")
  return str(value)


class Labelled:
  """One split's (or a predict file's) texts with their label ids (-1: none), as read."""

  def __init__(self, records, names: tuple[str, ...], text_field: str, require_labels: bool):
    self.names = names
    self.texts = [examples_lib.field(r, text_field) for r in records]
    self.places = [r.place for r in records]
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for record in records:
      label = _label(record, require_labels)
      if label is not None and label not in index:
        raise DataError(f"{record.place}: the label {label!r} is not one of the training "
                        f"labels {list(names)}; fix the label or train with it")
      ids.append(-1 if label is None else index[label])
    self.labels = np.array(ids, np.int32)

  def __len__(self) -> int:
    return len(self.texts)

  def in_order(self) -> list[bytes]:
    return [text.encode("utf-8") for text in self.texts]

  def tokenize(self, tokenizer) -> "TokenizedTexts":
    tokens = []
    for text, place in zip(self.texts, self.places):
      tokens.append(np.asarray(tokenizer.encode_document(text.encode("utf-8"), place), np.int32))
      if not len(tokens[-1]):
        raise DataError(f"{place}: the text is empty, so there is nothing to classify; leave "
                        "the example out")
    return TokenizedTexts(tokens, self.labels, self.names)


class TokenizedTexts:
  """Labelled texts as tokens, kept in memory; `rows` makes batch rows of them."""

  def __init__(self, tokens: list[np.ndarray], labels: np.ndarray, names: tuple[str, ...]):
    self.tokens, self.labels, self.names = tokens, labels, names
    self.lengths = np.array([len(t) for t in tokens], np.int64)

  def __len__(self) -> int:
    return len(self.tokens)

  def rows(self, numbers: np.ndarray, block_size: int) -> dict[str, np.ndarray]:
    """The batch rows of examples `numbers` (-1: a padding row)."""
    inputs = np.zeros((len(numbers), block_size), np.int32)
    real = np.arange(block_size) < np.minimum(self.lengths[numbers], block_size)[:, None]
    real &= (numbers >= 0)[:, None]
    for row, number in enumerate(numbers):
      if number >= 0:
        kept = self.tokens[number][:block_size]
        inputs[row, :len(kept)] = kept
    return {"inputs": inputs, "segment_ids": real.astype(np.int32),
            "positions": np.where(real, np.arange(block_size), 0).astype(np.int32),
            "labels": np.where(numbers >= 0, self.labels[numbers], -1).astype(np.int32)}

  def truncation_notice(self, block_size: int, what: str) -> list[str]:
    cut = int((self.lengths > block_size).sum())
    if not cut:
      return []
    return [f"{cut:,} of the {len(self):,} {what} have more than model.block_size={block_size} "
            "tokens; each is cut to its first block_size"]


def open_splits(data_config) -> tuple[Labelled, Labelled, str]:
  """(train texts, val texts, a description): the labels are config.data.labels, else those of
  the train examples."""
  c = data_config
  if c.mixture or c.source:
    raise ConfigError("config.task='classify' reads the labelled examples at config.data.path "
                      "(JSON lines or CSV, by the file's name); leave config.data.source and "
                      "config.data.mixture empty")
  if c.batching != "packed":
    raise ConfigError(f"config.data.batching={c.batching!r} cuts a stream of tokens; a "
                      "classifier's rows are one example each: leave config.data.batching=packed")
  train, val, description = examples_lib.open_splits(c)
  names = tuple(c.labels) or tuple(sorted({_label(r, True) for r in train}))
  train = Labelled(train, names, c.text_feature, require_labels=True)
  val = Labelled(val, names, c.text_feature, require_labels=True)
  return train, val, f"labelled examples {description}, {len(names)} labels"


def predict_input(path: str, data_config, tokenizer) -> tuple[Labelled, TokenizedTexts]:
  """A file (or glob) of texts to classify with a run's `config.data` (its labels, its text
  field): (the texts as read, their tokens). A label there is optional; one the run was not
  trained with is a DataError."""
  if not data_config.labels:
    raise ConfigError("config.data.labels is empty: the run was not trained to classify "
                      "(config.task=classify), so there are no labels to predict")
  records = examples_lib.read(path, "path")
  texts = Labelled(records, tuple(data_config.labels), data_config.text_feature,
                   require_labels=False)
  return texts, texts.tokenize(tokenizer)


def in_order(texts: TokenizedTexts, batch_size: int, block_size: int):
  """Batches of every example in order, the last padded (labels -1): `bigflax predict`'s."""
  for start in range(0, len(texts), batch_size):
    numbers = np.arange(start, start + batch_size)
    yield texts.rows(np.where(numbers < len(texts), numbers, -1), block_size)


class ClassifyIterator(StepIterator):
  """This process's rows of every global batch of one split's examples (a pure function of the
  step); finite: epoch 0 only, rows past its end padding."""

  def __init__(self, texts: TokenizedTexts, *, seed: int, split: int, batch_size: int,
               block_size: int, rows: slice, finite: bool = False):
    self.texts, self._seed, self._split = texts, seed, split
    self._batch_size, self._block_size, self._rows = batch_size, block_size, rows
    self._finite = finite
    name = SPLIT_NAMES[split]
    self.description = (f"{name} examples to classify: {len(texts):,} of "
                        f"{len(texts.names)} labels, one a row of {block_size} tokens, shuffled "
                        "each epoch")
    self.notices = texts.truncation_notice(block_size, f"{name} examples")
    self.order = functools.lru_cache(maxsize=2)(self._order)  # a batch may span two epochs

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng((self._seed, self._split, epoch)).permutation(len(self.texts))

  def numbers(self, step: int) -> np.ndarray:
    """The examples of this process's rows of batch `step` (-1: padding)."""
    indices = (step * self._batch_size + np.arange(self._batch_size))[self._rows]
    count = len(self.texts)
    if self._finite:
      return np.where(indices < count, self.order(0)[np.minimum(indices, count - 1)], -1)
    numbers = np.empty(len(indices), np.int64)
    epochs = indices // count
    for epoch in np.unique(epochs):
      which = epochs == epoch
      numbers[which] = self.order(int(epoch))[indices[which] % count]
    return numbers

  def make(self, step: int) -> dict[str, np.ndarray]:
    return self.texts.rows(self.numbers(step), self._block_size)


def make_batches(corpus, config, split: int, batch_size: int,
                 rows: slice = slice(None)) -> Batches:
  """The global batches of `batch_size` examples of `split`, or the `rows` of each that one
  process holds."""
  iterator = ClassifyIterator(corpus.documents(split), seed=config.seed, split=split,
                              batch_size=batch_size, block_size=config.model.block_size,
                              rows=rows)
  return Batches(iterator, config.data.prefetch)


def eval_batches(corpus, config, batch_size: int, num_batches: int,
                 rows: slice = slice(None)) -> tuple[EvalBatches, EvalInfo]:
  """The first `num_batches` batches of the val examples in epoch 0's shuffled order, or (0, or
  more than the split fills: clamped, with a notice) all of them once, the last batch padded
  (labels -1)."""
  texts = corpus.documents(VAL)
  iterator = ClassifyIterator(texts, seed=config.seed, split=VAL, batch_size=batch_size,
                              block_size=config.model.block_size, rows=rows, finite=True)
  notices = list(iterator.notices)
  num_batches = clamp_eval_batches(num_batches, len(texts), batch_size, "examples", notices)
  covered = min(num_batches * batch_size, len(texts))
  info = EvalInfo(num_batches, covered, len(texts), covered, len(texts), tuple(notices))
  return EvalBatches(Batches(iterator, config.data.prefetch), num_batches), info
