"""Tokenizers: text ↔ int32 ids. Each is built from `config.data` by name (`TOKENIZERS`).

`encode` maps text to ids and nothing else. `encode_document` is what the packed pipeline uses for
one document: the sentencepiece tokenizer wraps it in BOS … EOS (when its model defines them), so
the model learns where documents start and end; byte and char ids have no room for such markers,
and there the segment boundaries alone keep documents apart.
"""

import pathlib

import numpy as np
import sentencepiece as spm

from bigflax.errors import DataError


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255: any file, any language, no vocabulary to build."""
  vocab_size = 256

  def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
    del source
    return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    return self.encode_bytes(text.encode("utf-8"), source)

  encode_document = encode_bytes

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

  encode_document = encode_bytes

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    try:
      return np.fromiter((self._index[ch] for ch in text), dtype=np.int32, count=len(text))
    except KeyError as e:
      raise DataError(f"{source} contains the character {e.args[0]!r}, which is not in the "
                      f"char tokenizer's vocabulary of {self.vocab_size} characters") from None

  def decode(self, ids) -> str:
    return "".join(self.charset[int(i)] for i in ids)


class SentencePieceTokenizer:
  """A trained sentencepiece model (`.model` file; `tools/train_tokenizer.py` makes one)."""

  def __init__(self, model_path: str):
    if not model_path:
      raise DataError("config.data.tokenizer='sentencepiece' needs config.data.tokenizer_model, "
                      "the path of a .model file (train one with tools/train_tokenizer.py)")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(pathlib.Path(model_path).expanduser()))
    except (OSError, RuntimeError) as e:
      raise DataError(f"config.data.tokenizer_model={model_path!r} does not load as a "
                      f"sentencepiece model ({str(e).strip()}); point it at a .model file "
                      "written by sentencepiece, e.g. by tools/train_tokenizer.py") from None
    self.vocab_size = self._sp.vocab_size()
    # -1 where the model has no such id.
    self._bos, self._eos = self._sp.bos_id(), self._sp.eos_id()

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    del source  # any text encodes (unknown characters become <unk> or byte-fallback pieces)
    return np.asarray(self._sp.encode(text), np.int32)

  def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
    return self.encode(raw.decode("utf-8", errors="replace"), source)

  def encode_document(self, raw: bytes, source: str) -> np.ndarray:
    del source
    ids = self._sp.encode(raw.decode("utf-8", errors="replace"), add_bos=self._bos >= 0,
                          add_eos=self._eos >= 0)
    return np.asarray(ids, np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])  # BOS/EOS/padding decode to nothing


TOKENIZERS = {
    "byte": lambda data_config: ByteTokenizer(),
    "char": lambda data_config: CharTokenizer(data_config.charset),
    "sentencepiece": lambda data_config: SentencePieceTokenizer(data_config.tokenizer_model),
}

# The model's vocabulary is the tokenizer's rounded up to this: matmuls on whole tiles (TPU lanes
# are 128 wide). The extra ids never occur in data and sampling masks them (decode.filter_logits).
VOCAB_MULTIPLE = 128


def padded_vocab_size(vocab_size: int) -> int:
  return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def make_tokenizer(data_config):
  return TOKENIZERS[data_config.tokenizer](data_config)


def train_sentencepiece(documents, model_path: str, *, vocab_size: int, model_type: str,
                        max_sentences: int = 2_000_000) -> SentencePieceTokenizer:
  """Trains a BPE or unigram sentencepiece model on `documents` (bytes) and writes it to
  `model_path`. Settings give an exact round trip of any text, code included: no normalization,
  whitespace kept as is (runs of spaces become pieces), newline a piece of its own, digits split,
  and bytes for whatever the vocabulary lacks (byte_fallback). Ids: 0 <unk>, 1 <s> (BOS),
  2 </s> (EOS), then 256 byte pieces, then the learned ones; vocab_size must leave room for them.
  """
  lines = (line for doc in documents
           for line in doc.decode("utf-8", errors="replace").splitlines(keepends=True))
  with open(model_path, "wb") as model_file:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model_file, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        user_defined_symbols=["\n"], unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        input_sentence_size=max_sentences, shuffle_input_sentence=True, minloglevel=2)
  return SentencePieceTokenizer(model_path)
