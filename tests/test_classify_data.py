"""Classification data: labelled texts, one example a row, labels mapped to ids."""

import json

import numpy as np
import pytest

from bigflax import data
from bigflax.config import base
from bigflax.data import classify
from bigflax.errors import ConfigError, DataError

LABELS = ["pos", "neg", "neutral"]


def write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def labelled(count, start=0):
  return [{"text": f"text number {i} " + "x" * (i % 7), "label": LABELS[i % 3]}
          for i in range(start, start + count)]


def config(path, **overrides):
  c = base()
  c.seed = 5
  c.data.path = str(path)
  c.model.block_size = 16
  c.data.prefetch = 0
  c.update_from_flattened_dict(overrides)
  return c


def corpus_of(c):
  return data.load_corpus(c.data, c.model.block_size, task="classify")


def test_labels_are_the_sorted_train_labels_and_map_to_ids(tmp_path):
  path = write_jsonl(tmp_path / "train.jsonl", labelled(30))
  corpus = corpus_of(config(path))
  assert corpus.task == "classify" and corpus.labels == ("neg", "neutral", "pos")
  train = corpus.train
  assert len(train) == 27 and len(corpus.val) == 3  # the last 10% validate
  expected = [("neg", "neutral", "pos").index(LABELS[i % 3]) for i in range(27)]
  assert train.labels.tolist() == expected
  # Given labels (a resolved config's) keep their order; the ids follow it.
  given = corpus_of(config(path, **{"data.labels": ("pos", "neg", "neutral")}))
  assert given.labels == ("pos", "neg", "neutral")
  assert given.train.labels.tolist() == [i % 3 for i in range(27)]


def test_a_batch_is_one_example_a_row_padded_or_cut_to_block_size(tmp_path):
  records = [{"text": "abc", "label": "a"}, {"text": "x" * 40, "label": "b"},
             {"text": "hello world", "label": 7}] * 3 + [{"text": "val", "label": "a"}]
  c = config(write_jsonl(tmp_path / "t.jsonl", records), **{"data.val_fraction": 0.1})
  corpus = corpus_of(c)
  assert corpus.labels == ("7", "a", "b")  # JSON integers are read as their digits
  batches = data.make_batches(corpus, c, data.TRAIN, 9)
  assert batches.notices == ["3 of the 9 train examples have more than model.block_size=16 "
                             "tokens; each is cut to its first block_size"]
  batch = batches.batch(0)
  assert {k: (v.shape, v.dtype.name) for k, v in batch.items()} == {
      "inputs": ((9, 16), "int32"), "segment_ids": ((9, 16), "int32"),
      "positions": ((9, 16), "int32"), "labels": ((9,), "int32")}
  texts = {"abc": 1, "x" * 16: 2, "hello world": 0}
  for row in range(9):
    length = int(batch["segment_ids"][row].sum())
    text = bytes(batch["inputs"][row, :length].tolist()).decode()
    assert texts[text] == batch["labels"][row]
    assert (batch["inputs"][row, length:] == 0).all()
    assert batch["segment_ids"][row].tolist() == [1] * length + [0] * (16 - length)
    assert batch["positions"][row].tolist() == list(range(length)) + [0] * (16 - length)


def test_batches_are_a_pure_function_of_the_step_and_resume(tmp_path):
  c = config(write_jsonl(tmp_path / "t.jsonl", labelled(53)), **{"data.val_fraction": 0.05})
  corpus = corpus_of(c)
  count = len(corpus.train)
  assert count == 50
  one = data.make_batches(corpus, c, data.TRAIN, 8)
  first = [one.batch(k) for k in range(20)]
  resumed = data.make_batches(corpus_of(c), c, data.TRAIN, 8)
  resumed.set_state({"step": 13})
  for k in range(13, 20):
    for key, value in resumed.batch(k).items():
      np.testing.assert_array_equal(value, first[k][key])
  # Each epoch (50 consecutive global rows) holds every example once, in a new order.
  iterator = classify.ClassifyIterator(corpus.train, seed=c.seed, split=data.TRAIN, batch_size=50,
                                       block_size=16, rows=slice(None))
  epochs = [iterator.numbers(e) for e in range(3)]
  for numbers in epochs:
    assert sorted(numbers) == list(range(count))
  assert not np.array_equal(epochs[0], epochs[1])
  # A process's rows of a batch are those rows of the whole batch.
  half = data.make_batches(corpus, c, data.TRAIN, 8, slice(4, 8)).batch(7)
  for key, value in half.items():
    np.testing.assert_array_equal(value, first[7][key][4:8])
  other_seed = classify.ClassifyIterator(corpus.train, seed=c.seed + 1, split=data.TRAIN,
                                         batch_size=50, block_size=16, rows=slice(None))
  assert not np.array_equal(other_seed.numbers(0), epochs[0])


def test_the_eval_takes_every_val_example_once_the_last_batch_padded(tmp_path):
  c = config(write_jsonl(tmp_path / "train.jsonl", labelled(40)),
             **{"data.val_path": str(write_jsonl(tmp_path / "val.jsonl", labelled(11, 100)))})
  corpus = corpus_of(c)
  batches, info = data.eval_batches(corpus, c, 4, 0)
  assert len(batches) == 3 and (info.documents, info.split_documents) == (11, 11)
  assert info.predictions == info.split_predictions == 11
  seen = []
  for batch in batches:
    for row in range(4):
      length = int(batch["segment_ids"][row].sum())
      if batch["labels"][row] < 0:
        assert length == 0 and not batch["inputs"][row].any()
        continue
      seen.append((bytes(batch["inputs"][row, :length].tolist()).decode(), batch["labels"][row]))
  assert (batches[2]["labels"] == -1).sum() == 1
  expected = [(r["text"][:16], ("neg", "neutral", "pos").index(r["label"]))
              for r in labelled(11, 100)]
  assert sorted(seen) == sorted(expected)
  some, clamped = data.eval_batches(corpus, c, 4, 2)
  assert len(some) == 2 and clamped.documents == 8
  whole, info = data.eval_batches(corpus, c, 4, 99)
  assert len(whole) == 3 and "evaluating those 3" in info.notices[-1]


def test_csv_examples_read_like_json_lines(tmp_path):
  path = tmp_path / "t.csv"
  path.write_text('text,label\n"hello, world",pos\nplain,neg\n"two\nlines",pos\nlast,neg\n')
  c = config(path, **{"data.val_fraction": 0.25})
  corpus = corpus_of(c)
  assert corpus.labels == ("neg", "pos") and len(corpus.train) == 3
  rows = corpus.train.rows(np.arange(3), 16)
  assert [bytes(r[r > 0].tolist()).decode() for r in rows["inputs"]] == [
      "hello, world", "plain", "two\nlines"]
  assert rows["labels"].tolist() == [1, 0, 1]


@pytest.mark.parametrize("content, message", [
    ('{"text": "a", "label": "x"}\n{oops\n', "line 2 is not JSON"),
    ('{"text": "a", "label": "x"}\n{"label": "y"}\n', "line 2 has no field 'text'"),
    ('{"text": "a", "label": "x"}\n{"text": "b"}\n', "line 2 has no field 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": 1.5}\n',
     "line 2: the field 'label' is a float, not str or int"),
    ('{"text": "a", "label": "x"}\n{"text": "b", "label": ""}\n', "line 2 has an empty 'label'"),
    ('{"text": "a", "label": "x"}\n{"text": "", "label": "x"}\n', "line 2: the text is empty"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, content, message):
  path = tmp_path / "bad.jsonl"
  path.write_text(content + '{"text": "c", "label": "x"}\n' * 3)
  with pytest.raises(DataError) as error:
    corpus_of(config(path))
  assert f"{path} {message}" in str(error.value) and "\n" not in str(error.value)


def test_a_csv_row_with_too_many_cells_is_named(tmp_path):
  path = tmp_path / "bad.csv"
  path.write_text("text,label\na,x\nb,c,x\nd,x\ne,x\n")
  with pytest.raises(DataError, match=f"{path} line 3 has more cells than the header's 2"):
    corpus_of(config(path))


def test_an_unseen_label_is_an_error_at_eval_and_predict_time(tmp_path):
  train = write_jsonl(tmp_path / "train.jsonl", labelled(12))
  val = write_jsonl(tmp_path / "val.jsonl", [{"text": "a", "label": "pos"},
                                             {"text": "b", "label": "angry"}])
  with pytest.raises(DataError) as error:
    corpus_of(config(train, **{"data.val_path": str(val)}))
  assert str(error.value) == (f"{val} line 2: the label 'angry' is not one of the training "
                              "labels ['neg', 'neutral', 'pos']; fix the label or train with it")
  c = config(train)
  corpus = corpus_of(c)
  with c.unlocked():
    c.data.labels = corpus.labels
  with pytest.raises(DataError, match="line 2: the label 'angry' is not one of the training"):
    classify.predict_input(str(val), c.data, corpus.tokenizer)
  unlabelled = write_jsonl(tmp_path / "new.jsonl", [{"text": "neg one"}, {"text": "b"},
                                                     {"text": "c", "label": "pos"}])
  texts, tokens = classify.predict_input(str(unlabelled), c.data, corpus.tokenizer)
  assert texts.texts == ["neg one", "b", "c"] and texts.places[0] == f"{unlabelled} line 1"
  batches = list(classify.in_order(tokens, 2, 16))
  assert [b["labels"].tolist() for b in batches] == [[-1, -1], [2, -1]]
  assert bytes(batches[0]["inputs"][0, :7].tolist()) == b"neg one"
  assert not batches[1]["segment_ids"][1].any()  # the padding row


def test_classification_options_that_cannot_work_are_refused(tmp_path):
  path = write_jsonl(tmp_path / "t.jsonl", labelled(10))
  with pytest.raises(ConfigError, match="leave config.data.source and config.data.mixture"):
    corpus_of(config(path, **{"data.source": "jsonl"}))
  with pytest.raises(ConfigError, match="leave config.data.batching=packed"):
    corpus_of(config(path, **{"data.batching": "windows"}))
  with pytest.raises(ConfigError, match="config.task='regress' is unknown"):
    data.load_corpus(config(path).data, 16, task="regress")
  with pytest.raises(ConfigError, match="must be distinct non-empty strings"):
    data.check_config(config(path, **{"data.labels": ("a", "a")}).data)
