"""Sources, the local TFDS builder, the reader and tokenizers: contents, splits and errors."""

import numpy as np
import pytest

from bigflax import data
from bigflax.config import base
from bigflax.data import sources, text_builder, tokenizers
from conftest import SHAKESPEARE


def data_config(path="", tokenizer="byte", val_fraction=0.1, **fields):
  c = base().data
  c.path, c.tokenizer, c.val_fraction = str(path), tokenizer, val_fraction
  for key, value in fields.items():
    c[key] = value
  return c


def write(directory, files: dict[str, str]):
  for name, text in files.items():
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
  return directory


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """A 400-piece BPE model trained on a few standard-library files (a fraction of a second)."""
  path = tmp_path_factory.mktemp("spm") / "tiny.model"
  documents = [f.read_bytes() for f in sources.stdlib_files()[:40]]
  tokenizers.train_sentencepiece(documents, str(path), vocab_size=400, model_type="bpe")
  return path


def test_byte_tokenizer_round_trips_any_text():
  tok = tokenizers.ByteTokenizer()
  text = "déf f(x):\n\treturn 'λ' 🙂"
  ids = tok.encode(text)
  assert ids.max() < 256 and tok.decode(ids) == text


def test_char_tokenizer_uses_sorted_distinct_characters(corpus_file):
  corpus = data.load_corpus(data_config(corpus_file, "char"), block_size=8)
  text = corpus_file.read_text()
  assert corpus.tokenizer.charset == "".join(sorted(set(text)))
  assert corpus.tokenizer.decode(corpus.tokens(data.TRAIN)[:20]) == text[:20]


def test_text_file_split_is_first_90_percent_then_last_10(corpus_file):
  corpus = data.load_corpus(data_config(corpus_file, "char"), block_size=8)
  text = corpus_file.read_text()
  cut = int(len(text) * 0.9)
  assert corpus.tokenizer.decode(corpus.tokens(data.TRAIN)) == text[:cut]
  assert corpus.tokenizer.decode(corpus.tokens(data.VAL)) == text[cut:]


def test_tiny_shakespeare_has_nanogpts_65_characters():
  corpus = data.load_corpus(data_config(SHAKESPEARE, "char"), block_size=64)
  assert corpus.tokenizer.vocab_size == 65
  assert len(corpus.tokens(data.TRAIN)) == 1003854 and len(corpus.tokens(data.VAL)) == 111540


def test_stdlib_split_is_deterministic_disjoint_and_by_file():
  train_a, val_a = sources.stdlib_split(0.1)
  train_b, val_b = sources.stdlib_split(0.1)
  assert train_a == train_b and val_a == val_b
  nonempty = [f for f in sources.stdlib_files() if f.read_bytes().strip()]
  assert len(train_a) + len(val_a) == len(nonempty)  # each file on one side only
  assert sum(map(len, val_a)) > 100_000 and len(train_a) > 5 * len(val_a)


def test_stdlib_default_reads_the_same_files_through_tfds():
  corpus = data.load_corpus(base().data, block_size=128)
  train, val = sources.stdlib_split(0.1)
  assert corpus.train.in_order() == train and corpus.val.in_order() == val
  # Windows read the flat corpus as before: files joined by a blank line.
  assert corpus.tokenizer.decode(corpus.tokens(data.VAL)[:2000]) == (
      b"\n\n".join(val)[:2000].decode("utf-8", errors="replace"))


def test_directory_glob_and_paragraph_documents(tmp_path):
  write(tmp_path / "corpus", {"b.txt": "two\n\n  \nthree\nlines\n", "a.txt": "one",
                              "sub/c.md": "four\n\n\n\nfive\n", ".hidden/x.txt": "secret",
                              "empty.txt": ""})
  by_file = data.load_corpus(data_config(tmp_path / "corpus", val_fraction=0.01), block_size=4)
  # Files in path order, hidden ones left out; the last 1% of the bytes (one) validates.
  assert by_file.train.in_order() == [b"one", b"two\n\n  \nthree\nlines\n", b"four\n\n\n\nfive"]
  assert by_file.val.in_order() == [b"\n"]
  paragraphs = data.load_corpus(
      data_config(tmp_path / "corpus", val_fraction=0.2, documents="paragraph"), block_size=4)
  everything = paragraphs.train.in_order() + paragraphs.val.in_order()
  assert b"".join(everything) == b"onetwothree\nlines\nfourfive\n"
  # The last 20% of the bytes validate: the document the cut falls in is cut in two.
  assert paragraphs.train.in_order()[-1] == b"fou"
  assert paragraphs.val.in_order() == [b"r", b"five\n"]
  globbed = data.load_corpus(data_config(tmp_path / "corpus" / "**" / "*.md"), block_size=4)
  assert b"".join(globbed.train.in_order() + globbed.val.in_order()) == b"four\n\n\n\nfive\n"


def test_tail_split_never_cuts_a_character_in_two():
  train, val = sources.tail_split(["é".encode() * 10], 0.45)  # 20 bytes: byte 11 is mid-é
  assert train[0].decode() + val[0].decode() == "é" * 10


def test_local_builds_are_cached_and_rebuilt_when_a_file_changes(tmp_path):
  path = write(tmp_path, {"corpus.txt": "hello world\n" * 50}) / "corpus.txt"
  config = data_config(path, data_dir=str(tmp_path / "tfds"))
  first = data.load_corpus(config, block_size=4).description
  assert data.load_corpus(config, block_size=4).description == first  # same digest
  built = list((tmp_path / "tfds" / "local_text").iterdir())
  assert len(built) == 1
  path.write_text("goodbye world\n" * 50)
  corpus = data.load_corpus(config, block_size=4)
  assert corpus.description != first and corpus.train.in_order()[0].startswith(b"goodbye")
  assert len(list((tmp_path / "tfds" / "local_text").iterdir())) == 2


def test_tfds_source_reads_a_prepared_dataset_by_name_version_and_split(tmp_path, corpus_file):
  data_dir = str(tmp_path / "tfds")
  local = data.load_corpus(data_config(corpus_file, data_dir=data_dir), block_size=4)
  name = text_builder.name_of(text_builder.text_spec(str(corpus_file), "file", 0.1))
  corpus = data.load_corpus(data_config(source=f"tfds:{name}:1.0.0", data_dir=data_dir,
                                        text_feature="text"), block_size=4)
  assert corpus.train.in_order() == local.train.in_order()
  assert corpus.val.in_order() == local.val.in_order()
  assert len(corpus.train) == len(local.train) == 1 and corpus.train[0] == local.train[0]


@pytest.mark.parametrize("fields, message", [
    (dict(source="tfds:lm1bb"), r"tfds:lm1bb.*no dataset named 'lm1bb' \(did you mean lm1b"),
    (dict(source="tfds:lm1b"), r"tfds:lm1b.*no prepared files in .*/lm1b/.*tfds build lm1b "
                               r"--data_dir=DIR --file_format=array_record"),
    (dict(source="tfds:c4/en:3.1.0"), r"tfds:c4/en:3.1.0.*no prepared files in .*/c4/en/3.1.0"),
    (dict(source="hf:gpt2"), r"config.data.source='hf:gpt2' is unknown"),
    (dict(source="text"), r"source='text' needs config.data.path"),
])
def test_bad_sources_say_what_and_how_to_fix(tmp_path, fields, message):
  with pytest.raises(data.DataError, match=message):
    data.load_corpus(data_config(data_dir=str(tmp_path), **fields), block_size=4)


def test_unknown_tfds_split_and_feature_list_what_exists(tmp_path, corpus_file):
  data_dir = str(tmp_path / "tfds")
  data.load_corpus(data_config(corpus_file, data_dir=data_dir), block_size=4)
  name = text_builder.name_of(text_builder.text_spec(str(corpus_file), "file", 0.1))
  with pytest.raises(data.DataError, match=r"val_split='test'.*\['train', 'validation'\]"):
    data.load_corpus(data_config(source=f"tfds:{name}", data_dir=data_dir, val_split="test"), 4)
  with pytest.raises(data.DataError, match=r"text_feature='content'.*\['index', 'text'\]"):
    data.load_corpus(data_config(source=f"tfds:{name}", data_dir=data_dir,
                                 text_feature="content"), 4)


def test_files_prepared_as_tfrecord_say_how_to_prepare_array_record(tmp_path, corpus_file):
  data_dir = tmp_path / "tfds"
  data.load_corpus(data_config(corpus_file, data_dir=str(data_dir)), block_size=4)
  name = text_builder.name_of(text_builder.text_spec(str(corpus_file), "file", 0.1))
  info = data_dir / name / "1.0.0" / "dataset_info.json"
  info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))  # as TF writes it
  with pytest.raises(data.DataError, match=r"are tfrecord, which has no random access.*"
                                           r"--file_format=array_record"):
    data.load_corpus(data_config(source=f"tfds:{name}", data_dir=str(data_dir)), block_size=4)


def test_missing_file_error_names_the_field(tmp_path):
  with pytest.raises(data.DataError, match="config.data.path=.*no such file"):
    data.load_corpus(data_config(tmp_path / "nope.txt"), block_size=8)


def test_empty_corpus_error(tmp_path):
  (tmp_path / "empty.txt").write_text("")
  with pytest.raises(data.DataError, match="is empty"):
    data.load_corpus(data_config(tmp_path / "empty.txt"), block_size=8)
  write(tmp_path / "blank", {"a.txt": "\n\n", "b.txt": "   "})
  with pytest.raises(data.DataError, match="is empty"):
    data.load_corpus(data_config(tmp_path / "blank"), block_size=8)


def test_block_size_larger_than_val_split_error_for_windows(tmp_path):
  (tmp_path / "small.txt").write_text("x" * 1000)
  with pytest.raises(data.DataError, match="val split has 100 tokens.*block_size"):
    data.load_corpus(data_config(tmp_path / "small.txt", batching="windows"), block_size=128)


@pytest.mark.parametrize("tokenizer", ["char", "byte"])
def test_a_corpus_that_is_not_utf8_is_named_as_the_problem(tmp_path, tokenizer):
  # A text corpus is text, whatever the tokenizer: a Latin-1 file is left out, and then nothing is
  # left.
  (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 100)
  path = tmp_path / "latin1.txt"
  with pytest.raises(data.DataError) as error:
    data.load_corpus(data_config(path, tokenizer, batching="windows"), block_size=8)
  assert str(error.value) == (
      f"config.data.path='{path}' has no UTF-8 text: skipped 1 file that is not UTF-8 text "
      f"(first: {path}); re-encode the text as UTF-8 (e.g. iconv -f latin1 -t utf-8) or point "
      "config.data.path at text files")


def test_char_tokenizer_blames_a_corpus_that_is_not_utf8_not_the_prompt():
  documents = ["café au lait\n".encode("latin-1")]
  with pytest.raises(data.DataError, match=r"^the corpus tfds:x is not UTF-8 text \(document 0, "
                                           r"byte 3: b'\\xe9 au'\).*tokenizer=byte$"):
    tokenizers.CharTokenizer.of_corpus(documents, "tfds:x")
  # A charset read from such a corpus with errors="replace" holds U+FFFD: then a prompt character
  # it lacks is the corpus's fault.
  text = documents[0].decode("utf-8", errors="replace")
  tok = tokenizers.CharTokenizer(tokenizers.CharTokenizer.charset_of(text))
  with pytest.raises(data.DataError, match=r"^the training corpus is not UTF-8 text .*so "
                                           r"config.sample.prompt's character 'é' is not in it; "
                                           r"re-encode the corpus as UTF-8"):
    tok.encode("café", "config.sample.prompt")
  tok = tokenizers.CharTokenizer("abc")
  with pytest.raises(data.DataError, match=r"^config.sample.prompt contains the character 'é', "
                                           r"which is not in the char tokenizer's vocabulary \(the "
                                           r"3 characters of the training corpus\)"):
    tok.encode("é", "config.sample.prompt")


def test_files_that_are_not_utf8_text_are_skipped_and_counted(tmp_path):
  write(tmp_path / "corpus", {"a.txt": "alpha\n", "c.txt": "gamma\n"})
  (tmp_path / "corpus" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
  (tmp_path / "corpus" / "d.txt").write_text("utf-16 text\n", encoding="utf-16")  # NUL bytes
  (tmp_path / "corpus" / "e.bin").write_bytes(bytes(range(128, 256)))
  config = data_config(tmp_path / "corpus", val_fraction=0.01, data_dir=str(tmp_path / "tfds"))
  corpus = data.load_corpus(config, block_size=4)
  assert corpus.train.in_order() + corpus.val.in_order() == [b"alpha\n", b"gamma", b"\n"]
  note = (f"(one document per file; skipped 3 files that are not UTF-8 text (first: "
          f"{tmp_path}/corpus/b.png)) (TFDS dataset ")
  assert note in corpus.description
  assert note in data.load_corpus(config, block_size=4).description  # read back from the cache
  (tmp_path / "binary").mkdir()
  (tmp_path / "binary" / "x.bin").write_bytes(b"\0\1\2")
  with pytest.raises(data.DataError, match=r"binary' has no UTF-8 text: skipped 1 file that is "
                                           r"not UTF-8 text \(first: .*x.bin\); re-encode"):
    data.load_corpus(data_config(tmp_path / "binary"), block_size=4)


def test_a_local_build_says_one_line_and_tfds_says_nothing(tmp_path, capfd, caplog):
  path = write(tmp_path, {"corpus.txt": "hello world\n" * 50}) / "corpus.txt"
  config = data_config(path, data_dir=str(tmp_path / "tfds"))
  capfd.readouterr()
  with caplog.at_level("DEBUG"):
    corpus = data.load_corpus(config, block_size=4)
    out, err = capfd.readouterr()
    dataset = corpus.description.split("(TFDS dataset ")[1].split(")")[0]
    assert out == "" and err == f"building the local dataset (2 documents) → {dataset}\n"
    data.load_corpus(config, block_size=4)  # cached: not a word
    assert capfd.readouterr() == ("", "")
  tfds_records = [r for r in caplog.records if "tensorflow_datasets" in r.pathname
                  and r.levelno >= 30]
  assert not tfds_records, [r.getMessage() for r in tfds_records]


def test_a_data_dir_that_cannot_hold_the_build_is_one_data_error(tmp_path, monkeypatch):
  path = write(tmp_path, {"corpus.txt": "hello world\n" * 50}) / "corpus.txt"
  (tmp_path / "file").write_text("not a directory")
  for data_dir in (tmp_path / "file", tmp_path / "file" / "tfds"):
    with pytest.raises(data.DataError) as error:
      data.load_corpus(data_config(path, data_dir=str(data_dir)), block_size=4)
    assert str(error.value) == (
        f"config.data.data_dir='{data_dir}': {tmp_path}/file is a file, not a directory; point "
        "config.data.data_dir at a directory (it is created if missing)")

  # A read-only directory (root, which runs the tests, writes anywhere: simulated).
  def read_only(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", f"{tmp_path}/tfds/local_text")
  monkeypatch.setattr(text_builder.LocalText, "download_and_prepare", read_only)
  with pytest.raises(data.DataError) as error:
    data.load_corpus(data_config(path, data_dir=str(tmp_path / "tfds")), block_size=4)
  assert str(error.value) == (
      f"cannot build the local dataset in config.data.data_dir='{tmp_path}/tfds' (Permission "
      f"denied: {tmp_path}/tfds/local_text); point config.data.data_dir at a writable directory")
  assert not list((tmp_path / "tfds").rglob("*.json"))  # nothing half-built left to read


def test_sentencepiece_round_trips_code_exactly_and_wraps_documents(spm_model):
  tok = tokenizers.SentencePieceTokenizer(str(spm_model))
  text = "  def f(x):\n\treturn  'λ' 🙂  \n\n    x = 12345\r\n"
  ids = tok.encode(text)
  assert tok.decode(ids) == text and ids.max() < tok.vocab_size == 400
  document = tok.encode_document(text.encode(), "a document")
  assert document[0] == 1 and document[-1] == 2  # <s> … </s>
  np.testing.assert_array_equal(document[1:-1], ids)
  assert tok.decode(document) == text


def test_model_vocabulary_is_the_tokenizers_padded_to_128():
  assert [data.padded_vocab_size(n) for n in (65, 128, 256, 400, 32000)] == [
      128, 128, 256, 512, 32000]


@pytest.mark.parametrize("model, message", [
    ("", "needs config.data.tokenizer_model"),
    ("missing.model", "tokenizer_model=.*missing.model.*does not load.*No such file"),
    ("bad.model", "tokenizer_model=.*bad.model.*does not load.*could not parse"),
])
def test_a_tokenizer_model_that_does_not_load(tmp_path, monkeypatch, model, message):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "bad.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(data.DataError, match=message):
    data.make_tokenizer(data_config(tokenizer="sentencepiece", tokenizer_model=model))
