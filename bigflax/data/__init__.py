"""Data: a source's documents (`reader`) → a tokenizer → the batches of each split (`pipeline`)."""

import dataclasses
import glob

import numpy as np

from bigflax.data.pipeline import (BATCHINGS, SPLIT_NAMES, TRAIN, VAL, Batches, EvalBatches,
                                   EvalInfo, eval_batches, make_batches)
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


def _tokenizer_for(data_config, train: TextSource, val: TextSource, description: str):
  if data_config.tokenizer == "char" and not data_config.charset:
    # The corpus's own characters, so the char tokenizer is for corpora that fit in memory.
    return CharTokenizer.of_corpus(train.in_order() + val.in_order(), description)
  return make_tokenizer(data_config)


def load_corpus(data_config, block_size: int) -> Corpus:
  """Opens `config.data`'s source and builds its tokenizer (a char tokenizer with no charset
  takes the corpus's own); windows batching also needs block_size + 1 tokens in each split."""
  if data_config.download_hint and data_config.path and not glob.glob(data_config.path):
    raise DataError(f"config.data.path={data_config.path!r} does not exist; download it from "
                    f"{data_config.download_hint} and pass --config.data.path=FILE")
  train, val, description = open_splits(data_config)
  for split, documents in (("train", train), ("val", val)):
    if not len(documents):
      raise DataError(f"the {split} split of {description} has no documents; give more text or "
                      "(for val) raise config.data.val_fraction")
  corpus = Corpus(train, val, _tokenizer_for(data_config, train, val, description),
                  f"{description}: {len(train):,} train / {len(val):,} val documents")
  if data_config.batching == "windows":
    for split in (TRAIN, VAL):
      check_long_enough(corpus.tokens(split), block_size, SPLIT_NAMES[split])
  return corpus


__all__ = ["BATCHINGS", "Batches", "Corpus", "check_config", "DOCUMENT_UNITS", "DataError", "SOURCES",
           "TOKENIZERS", "TRAIN", "VAL", "EvalBatches", "EvalInfo", "eval_batches", "load_corpus", "make_batches",
           "make_tokenizer", "padded_vocab_size", "window_batch"]
