"""Tokenizers: text ↔ int32 ids. Each is built from `config.data` by name (`TOKENIZERS`).

`encode` maps text to ids and nothing else. `encode_document` is what the packed pipeline uses for
one document: the sentencepiece tokenizer wraps it in BOS … EOS (when its model defines them), so
the model learns where documents start and end; byte and char ids have no room for such markers,
and there the segment boundaries alone keep documents apart.
"""

import contextlib
import os
import pathlib
import re
import uuid

import numpy as np
import sentencepiece as spm

from bigflax.errors import DataError, first_line

_REPLACEMENT = "\ufffd"  # what bytes that are not UTF-8 decode to with errors="replace"


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

  @classmethod
  def of_corpus(cls, documents, description: str) -> "CharTokenizer":
    """The tokenizer of the distinct characters of `documents` (bytes); a DataError naming the
    corpus (`description`) when they are not UTF-8 text."""
    characters = set()
    for number, raw in enumerate(documents):
      try:
        characters.update(raw.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise DataError(
            f"the corpus {description} is not UTF-8 text (document {number}, byte {e.start}: "
            f"{raw[e.start:e.start + 4]!r}), and the char tokenizer reads UTF-8; re-encode the "
            "corpus as UTF-8 or use --config.data.tokenizer=byte") from None
    return cls("".join(sorted(characters)))

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
      if _REPLACEMENT in self._index:  # the charset came from a corpus read with errors="replace"
        raise DataError(f"the training corpus is not UTF-8 text (its undecodable bytes became "
                        f"{_REPLACEMENT!r} in the char tokenizer's vocabulary), so {source}'s "
                        f"character {e.args[0]!r} is not in it; re-encode the corpus as UTF-8 or "
                        "use --config.data.tokenizer=byte") from None
      raise DataError(f"{source} contains the character {e.args[0]!r}, which is not in the "
                      f"char tokenizer's vocabulary (the {self.vocab_size} characters of the "
                      "training corpus); leave it out or use --config.data.tokenizer=byte"
                      ) from None

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


# The pieces every model of train_sentencepiece holds besides the corpus's characters: <unk>, <s>,
# </s>, the 256 byte pieces and the newline piece.
FIXED_PIECES = 3 + 256 + 1
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_LARGE = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


def _training_error(error: RuntimeError, character_coverage: float) -> DataError:
  """sentencepiece's training failure as one line naming the flag to change."""
  message = str(error)
  if match := _TOO_SMALL.search(message):
    size, needed = map(int, match.groups())
    return DataError(
        f"--vocab_size {size} is too small for this corpus: sentencepiece needs at least "
        f"{needed} ({FIXED_PIECES} fixed pieces: <unk>, <s>, </s>, 256 bytes and newline, plus "
        f"the {needed - FIXED_PIECES} characters that cover {character_coverage:g} of the text); "
        f"give --vocab_size {needed} or more, or a lower --character_coverage")
  if match := _TOO_LARGE.search(message):
    size, most = map(int, match.groups())
    return DataError(f"--vocab_size {size} is too large for this corpus: sentencepiece can learn "
                     f"at most {most} pieces from it; give --vocab_size {most} or less, or more "
                     "text")
  if "sentences_.empty()" in message:
    return DataError("the corpus has no text to train a tokenizer on; give it some text")
  return DataError(f"sentencepiece could not train on this corpus ({first_line(error)})")


def train_sentencepiece(documents, model_path: str, *, vocab_size: int, model_type: str,
                        character_coverage: float = 0.9995, max_sentences: int = 2_000_000,
                        overwrite: bool = True) -> SentencePieceTokenizer:
  """Trains a BPE or unigram sentencepiece model on `documents` (bytes) and writes it to
  `model_path`. Settings give an exact round trip of any text, code included: no normalization,
  whitespace kept as is (runs of spaces become pieces), newline a piece of its own, digits split,
  and bytes for whatever the vocabulary lacks (byte_fallback). Ids: 0 <unk>, 1 <s> (BOS),
  2 </s> (EOS), then 256 byte pieces, then the learned ones; vocab_size must leave room for them
  and for the characters that cover `character_coverage` of the text (FIXED_PIECES + those).

  The model is written to a temporary file beside `model_path` and renamed over it once whole:
  a failed or interrupted training leaves `model_path` as it was (and no partial file). Without
  `overwrite`, an existing `model_path` is a DataError. Training problems (a vocab_size the
  corpus cannot fill or hold, no text) are DataErrors worded for tools/train_tokenizer.py's flags.
  No .vocab file is written: the model holds the vocabulary.
  """
  path = pathlib.Path(model_path).expanduser()
  if not overwrite and path.exists():
    raise DataError(f"{model_path} exists; give --overwrite to replace it, or another --output")
  lines = (line for doc in documents
           for line in doc.decode("utf-8", errors="replace").splitlines(keepends=True))
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.partial"
  try:  # created like open(path, "wb") would (umask applies), but never over an existing file
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  except OSError as e:
    raise DataError(f"cannot write {model_path} ({e.strerror or e}); give an --output in a "
                    "writable directory") from None
  try:
    with os.fdopen(fd, "wb") as model_file:
      try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines, model_writer=model_file, vocab_size=vocab_size,
            model_type=model_type, character_coverage=character_coverage, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            split_digits=True, allow_whitespace_only_pieces=True, user_defined_symbols=["\n"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=max_sentences,
            shuffle_input_sentence=True, minloglevel=2)
      except RuntimeError as e:
        raise _training_error(e, character_coverage) from None
    tokenizer = SentencePieceTokenizer(str(temporary))
    if not overwrite and path.exists():  # appeared while training
      raise DataError(f"{model_path} exists; give --overwrite to replace it, or another --output")
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise
  return tokenizer
