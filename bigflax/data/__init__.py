"""Data: sources → tokenizer → token arrays for the train and val splits → window batches."""

import dataclasses

import numpy as np

from bigflax.data.sources import read_text_file, stdlib_split
from bigflax.data.tokenizers import TOKENIZERS, CharTokenizer, DataError, make_tokenizer
from bigflax.data.windows import TRAIN, VAL, check_long_enough, window_batch


@dataclasses.dataclass
class Corpus:
  train: np.ndarray  # token ids
  val: np.ndarray
  tokenizer: object
  description: str


def _tokenizer_for(data_config, raw: bytes):
  if data_config.tokenizer == "char" and not data_config.charset:
    # Undecodable bytes become U+FFFD here; encoding then reports them with the fix.
    return CharTokenizer(CharTokenizer.charset_of(raw.decode("utf-8", errors="replace")))
  return make_tokenizer(data_config)


def load_corpus(data_config, block_size: int) -> Corpus:
  """Reads and tokenizes `config.data`. A char tokenizer with no charset takes the corpus's own.

  A text file is split nanoGPT's way: the first (1 - val_fraction) of its tokens train and the
  rest validate. The standard library is split by file (see `sources.stdlib_split`)."""
  if data_config.path:
    raw = read_text_file(data_config.path)
    tokenizer = _tokenizer_for(data_config, raw)
    tokens = tokenizer.encode_bytes(raw, f"config.data.path={data_config.path!r}")
    cut = int(len(tokens) * (1 - data_config.val_fraction))
    train, val, description = tokens[:cut], tokens[cut:], f"{data_config.path}"
  else:
    train_raw, val_raw, description = stdlib_split(data_config.val_fraction)
    tokenizer = _tokenizer_for(data_config, train_raw + val_raw)
    train = tokenizer.encode_bytes(train_raw, "the standard library's train files")
    val = tokenizer.encode_bytes(val_raw, "the standard library's val files")
  check_long_enough(train, block_size, "train")
  check_long_enough(val, block_size, "val")
  return Corpus(train, val, tokenizer,
                f"{description}; {len(train):,} train / {len(val):,} val tokens")


__all__ = ["Corpus", "DataError", "TOKENIZERS", "TRAIN", "VAL", "load_corpus", "make_tokenizer",
           "window_batch"]
