"""Tokenizers: text ↔ int32 ids. Each is built from `config.data` by name (`TOKENIZERS`)."""

import numpy as np

from bigflax.errors import UserError


class DataError(UserError):
  """Input data that cannot be used; the message says what is wrong and how to fix it."""


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255: any file, any language, no vocabulary to build."""
  vocab_size = 256

  def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
    del source
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    return self.encode_bytes(text.encode("utf-8"), source)

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class CharTokenizer:
  """One id per distinct character of the corpus (nanoGPT's shakespeare_char), sorted."""

  def __init__(self, charset: str):
    if not charset:
      raise DataError("the char tokenizer needs a charset: it is read from the training corpus "
                      "(config.data.charset is filled in automatically)")
    self.charset = charset
    self.vocab_size = len(charset)
    self._index = {ch: i for i, ch in enumerate(charset)}

  @staticmethod
  def charset_of(text: str) -> str:
    return "".join(sorted(set(text)))

  def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
    try:
      text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise DataError(
          f"{source} is not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); the "
          "char tokenizer needs UTF-8 text. Re-encode the file as UTF-8 or use "
          "--config.data.tokenizer=byte") from None
    return self.encode(text, source)

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    try:
      return np.fromiter((self._index[ch] for ch in text), dtype=np.int32, count=len(text))
    except KeyError as e:
      raise DataError(f"{source} contains the character {e.args[0]!r}, which is not in the "
                      f"char tokenizer's vocabulary of {self.vocab_size} characters") from None

  def decode(self, ids) -> str:
    return "".join(self.charset[int(i)] for i in ids)


TOKENIZERS = {
    "byte": lambda data_config: ByteTokenizer(),
    "char": lambda data_config: CharTokenizer(data_config.charset),
}


def make_tokenizer(data_config):
  return TOKENIZERS[data_config.tokenizer](data_config)
