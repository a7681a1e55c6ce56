import numpy as np
import pytest

from bigflax import data
from bigflax.config import base
from bigflax.data import sources, tokenizers
from conftest import SHAKESPEARE


def data_config(path="", tokenizer="byte", val_fraction=0.1):
  c = base().data
  c.path, c.tokenizer, c.val_fraction = str(path), tokenizer, val_fraction
  return c


def test_byte_tokenizer_round_trips_any_text():
  tok = tokenizers.ByteTokenizer()
  text = "déf f(x):\n\treturn 'λ' 🙂"
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.decode(ids) == text


def test_char_tokenizer_uses_sorted_distinct_characters(corpus_file):
  corpus = data.load_corpus(data_config(corpus_file, "char"), block_size=8)
  text = corpus_file.read_text()
  assert corpus.tokenizer.charset == "".join(sorted(set(text)))
  assert corpus.tokenizer.decode(corpus.train[:20]) == text[:20]


def test_text_file_split_is_first_90_percent_then_last_10(corpus_file):
  corpus = data.load_corpus(data_config(corpus_file, "char"), block_size=8)
  text = corpus_file.read_text()
  cut = int(len(text) * 0.9)
  assert corpus.tokenizer.decode(corpus.train) == text[:cut]
  assert corpus.tokenizer.decode(corpus.val) == text[cut:]


def test_tiny_shakespeare_has_nanogpts_65_characters():
  corpus = data.load_corpus(data_config(SHAKESPEARE, "char"), block_size=64)
  assert corpus.tokenizer.vocab_size == 65
  assert len(corpus.train) == 1003854 and len(corpus.val) == 111540


def test_stdlib_split_is_deterministic_disjoint_and_nonempty():
  train_a, val_a, _ = sources.stdlib_split(0.1)
  train_b, val_b, _ = sources.stdlib_split(0.1)
  assert train_a == train_b and val_a == val_b
  assert len(val_a) > 100_000 and len(train_a) > 5 * len(val_a)
  files = sources.stdlib_files()
  assert any(f.name == "os.py" for f in files)


def test_window_batch_is_a_pure_function_of_seed_split_and_step():
  tokens = np.arange(1000, dtype=np.int32)
  kw = dict(batch_size=4, block_size=8, seed=3)
  a = data.window_batch(tokens, split=data.TRAIN, index=5, **kw)
  b = data.window_batch(tokens, split=data.TRAIN, index=5, **kw)
  c = data.window_batch(tokens, split=data.TRAIN, index=6, **kw)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["inputs"], c["inputs"])
  # Targets are the inputs shifted by one within each window of block_size + 1 tokens.
  np.testing.assert_array_equal(a["targets"][:, :-1], a["inputs"][:, 1:])
  assert a["inputs"].shape == (4, 8) and a["loss_mask"].sum() == 32
  # A process's rows are exactly those rows of the global batch.
  half = data.window_batch(tokens, split=data.TRAIN, index=5, rows=slice(2, 4), **kw)
  np.testing.assert_array_equal(half["inputs"], a["inputs"][2:])


def test_missing_file_error_names_the_field(tmp_path):
  with pytest.raises(data.DataError, match="config.data.path=.*no such file"):
    data.load_corpus(data_config(tmp_path / "nope.txt"), block_size=8)


def test_empty_file_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_corpus(data_config(tmp_path / "empty.txt"), block_size=8)


def test_block_size_larger_than_val_split_error(tmp_path):
  (tmp_path / "small.txt").write_text("x" * 1000)
  with pytest.raises(data.DataError, match="val split has 100 tokens.*block_size"):
    data.load_corpus(data_config(tmp_path / "small.txt"), block_size=128)


def test_non_utf8_char_corpus_error_says_how_to_fix(tmp_path):
  (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 100)
  with pytest.raises(data.DataError, match="not valid UTF-8.*tokenizer=byte"):
    data.load_corpus(data_config(tmp_path / "latin1.txt", "char"), block_size=8)
  # The byte tokenizer takes any bytes.
  corpus = data.load_corpus(data_config(tmp_path / "latin1.txt", "byte"), block_size=8)
  assert corpus.tokenizer.vocab_size == 256
