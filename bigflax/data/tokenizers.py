"""Tokenizers: text ↔ int32 ids. Each is built from `config.data` by name (`TOKENIZERS`).

`encode` maps text to ids and nothing else. `encode_document` is what the packed pipeline uses for
one document: the sentencepiece tokenizer wraps it in BOS … EOS (when its model defines them), so
the model learns where documents start and end; byte and char ids have no room for such markers,
and there the segment boundaries alone keep documents apart.
"""

import contextlib
import functools
import json
import os
import pathlib
import re
import uuid

import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tokenizers

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

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for (bits per byte): one each."""
    return np.ones(self.vocab_size, np.int64)


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

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id's character takes (bits per byte)."""
    return np.array([len(ch.encode("utf-8")) for ch in self.charset], np.int64)


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

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id decodes to inside a text (bits per byte): a byte piece 1, a piece's
    ▁ the space it stands for, <unk>/BOS/EOS/control pieces 0."""
    sp = self._sp
    return np.array([0 if sp.is_control(i) or sp.is_unknown(i) else 1 if sp.is_byte(i)
                     else len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
                     for i in range(self.vocab_size)], np.int64)

  def dummy_prefix_bytes(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1 where a target is a document's first piece (it follows BOS) and starts with the ▁ that
    sentencepiece's dummy prefix put there, a space no text holds; byte_lengths counts it, so
    bits per byte takes these off. 0 elsewhere, and everywhere for a model without that prefix."""
    return ((inputs == self._bos) & self._prefixed[targets]).astype(np.int64)

  @functools.cached_property
  def _prefixed(self) -> np.ndarray:
    """Which ids start with ▁, when the model adds a dummy prefix (else none)."""
    proto = sentencepiece_model_pb2.ModelProto.FromString(self._sp.serialized_model_proto())
    return np.array([proto.normalizer_spec.add_dummy_prefix
                     and self._sp.id_to_piece(i).startswith("\u2581")
                     for i in range(self.vocab_size)], bool)


# A Hugging Face tokenizer directory: tokenizer.json (the tokenizer itself) and what
# transformers' save_pretrained writes beside it (special tokens, chat template).
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece-style byte fallback pieces


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
  """GPT-2's byte-level alphabet, character → byte (the tokenizers library's ByteLevel decoder):
  printable bytes stand for themselves, the other 68 for 256 + their rank."""
  kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
          *range(ord("®"), ord("ÿ") + 1)]
  moved = [b for b in range(256) if b not in kept]
  return {**{chr(b): b for b in kept}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def _token_content(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken's dict."""
  return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
  """A Hugging Face tokenizer directory (GPT-2's byte-level BPE, Llama's, …) through the
  `tokenizers` library. Special tokens, whether documents get BOS/EOS and the chat template come
  from tokenizer_config.json (and special_tokens_map.json) the way transformers reads them: an
  explicit add_bos_token/add_eos_token there decides, else tokenizer.json's post-processor."""

  def __init__(self, directory: str):
    if not directory:
      raise DataError("config.data.tokenizer='hf' needs config.data.tokenizer_model, a directory "
                      "holding a Hugging Face tokenizer.json (save_pretrained writes one)")
    root = pathlib.Path(directory).expanduser()
    if not (root / "tokenizer.json").is_file():
      what = "holds no tokenizer.json" if root.is_dir() else "is not a directory"
      raise DataError(f"config.data.tokenizer_model={directory!r} {what}; point it at a Hugging "
                      "Face tokenizer directory (tokenizer.save_pretrained(DIR) writes "
                      "DIR/tokenizer.json)")
    self.directory = str(root)
    try:
      self._tokenizer = tokenizers.Tokenizer.from_file(str(root / "tokenizer.json"))
      settings = {}
      for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        if (root / name).is_file():
          settings.update(json.loads((root / name).read_text(encoding="utf-8")))
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
      raise DataError(f"the Hugging Face tokenizer in {directory} does not load "
                      f"({first_line(e)}); save it again with save_pretrained") from None
    self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_token = _token_content(settings.get("bos_token"))
    self.eos_token = _token_content(settings.get("eos_token"))
    self.bos_id = None if self.bos_token is None else self._tokenizer.token_to_id(self.bos_token)
    self.eos_id = None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": …, "template": …}]
      template = {t["name"]: t["template"] for t in template}.get("default")
    if template is None and (root / "chat_template.jinja").is_file():
      template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    self.chat_template = template
    if "add_bos_token" in settings or "add_eos_token" in settings:
      bos = [self.bos_token] if settings.get("add_bos_token") and self.bos_id is not None else []
      eos = [self.eos_token] if settings.get("add_eos_token") and self.eos_id is not None else []
      self._tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
          single=[*bos, "$A", *eos],
          special_tokens=[(t, self._tokenizer.token_to_id(t)) for t in {*bos, *eos}])

  def encode(self, text: str, source: str = "text") -> np.ndarray:
    del source  # any text encodes (byte-level BPE has every byte; others map to <unk>)
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_bytes(self, raw: bytes, source: str) -> np.ndarray:
    return self.encode(raw.decode("utf-8", errors="replace"), source)

  def encode_document(self, raw: bytes, source: str) -> np.ndarray:
    del source
    ids = self._tokenizer.encode(raw.decode("utf-8", errors="replace"), add_special_tokens=True)
    return np.asarray(ids.ids, np.int32)

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes each id stands for in decoded text (0 for special tokens): bits per byte."""
    added = self._tokenizer.get_added_tokens_decoder()  # literal text, not byte-level pieces
    special = {i for i, t in added.items() if t.special}
    decoder = self._tokenizer.decoder
    byte_level = isinstance(decoder, tokenizers.decoders.ByteLevel)
    alphabet = _byte_level_bytes()
    lengths = np.zeros(self.vocab_size, np.int64)
    for i in range(self.vocab_size):
      token = self._tokenizer.id_to_token(i)
      if i in special or token is None:
        continue
      if i in added:
        lengths[i] = len(token.encode("utf-8"))
      elif byte_level:
        lengths[i] = sum(1 if ch in alphabet else len(ch.encode("utf-8")) for ch in token)
      elif _BYTE_PIECE.fullmatch(token):
        lengths[i] = 1
      elif decoder is None:
        lengths[i] = len(token.encode("utf-8"))
      else:  # after a leading piece, so decoders that strip the text's first space do not here
        lengths[i] = (len(decoder.decode(["a", token]).encode("utf-8"))
                      - len(decoder.decode(["a"]).encode("utf-8")))
    return lengths


TOKENIZERS = {
    "byte": lambda data_config: ByteTokenizer(),
    "char": lambda data_config: CharTokenizer(data_config.charset),
    "sentencepiece": lambda data_config: SentencePieceTokenizer(data_config.tokenizer_model),
    "hf": lambda data_config: HFTokenizer(data_config.tokenizer_model),
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
