"""The batching pipeline: packing, mixing, the eval pass, determinism across processes and
restarts, instant resume."""

import json
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from bigflax import data, train
from bigflax.config import base, get_config
from bigflax.data import pipeline, tokenizers
from bigflax.model import ModelConfig, Transformer
from bigflax.objective import token_log_likelihood
from conftest import REPO, tiny_config

BLOCK = 32


def random_documents(count=60, seed=0):
  """Byte documents of 0 to 120 bytes: empty ones, ones that fit a row, ones longer than two."""
  rng = np.random.default_rng(seed)
  return [bytes(rng.integers(97, 123, size=rng.integers(0, 121)).astype(np.uint8))
          for _ in range(count)]


class NumberedTokenizer:
  """Document b"i n" is n tokens i·1000, i·1000 + 1, …: every token of the corpus differs, so a
  prediction names its document and place, and a right one is `input + 1`."""

  vocab_size = 1 << 20

  def encode_document(self, raw, source):
    number, length = map(int, raw.split())
    return np.arange(length, dtype=np.int32) + 1000 * number


def numbered(lengths):
  """(documents, every next-token prediction they hold, as its input token)."""
  documents = [f"{i} {n}".encode() for i, n in enumerate(lengths)]
  return documents, sorted(1000 * i + j for i, n in enumerate(lengths) for j in range(n - 1))


def predictions_of(batches):
  """The input token of every prediction the (numbered) batches make; each must be right."""
  made = []
  for b in batches:
    mask = b["loss_mask"] > 0
    np.testing.assert_array_equal(b["targets"][mask], b["inputs"][mask] + 1)  # same document
    made += b["inputs"][mask].tolist()
  return made


class CountingTokenizer(tokenizers.ByteTokenizer):
  calls = 0

  def encode_document(self, raw, source):
    CountingTokenizer.calls += 1
    return super().encode_document(raw, source)


def packed_batches(documents, *, batch_size=4, rows=slice(None), prefetch=2, seed=0,
                   tokenizer=None):
  iterator = pipeline.PackedIterator(documents, tokenizer or tokenizers.ByteTokenizer(),
                                     seed=seed, split=data.TRAIN, batch_size=batch_size,
                                     block_size=BLOCK, rows=rows)
  return pipeline.Batches(iterator, prefetch)


def fake_corpus(documents, tokenizer):
  """What the pipeline reads of a corpus: the same documents in both splits."""
  return types.SimpleNamespace(documents=lambda split: documents, tokenizer=tokenizer)


def block_config(block_size=BLOCK):
  config = base()
  config.model.block_size = block_size
  return config


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def glue(parts):
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def segments_of(batch, row):
  """The (tokens, positions, loss_mask) of each segment of one row, in order."""
  ids = batch["segment_ids"][row]
  return [(batch["inputs"][row][ids == s], batch["positions"][row][ids == s],
           batch["loss_mask"][row][ids == s]) for s in range(1, ids.max() + 1)]


def test_every_next_token_of_every_document_is_predicted_exactly_once_an_epoch():
  lengths = np.random.default_rng(0).integers(0, 121, size=60)  # empty, short, longer than 2 rows
  documents, expected = numbered(lengths)
  batches = packed_batches(documents, batch_size=1, tokenizer=NumberedTokenizer())
  rows_per_epoch = -(-(lengths[lengths >= 2].sum() - 1) // BLOCK)  # the stream, BLOCK a row
  epochs = [[batches.batch(e * rows_per_epoch + i) for i in range(rows_per_epoch)]
            for e in range(2)]
  for epoch in epochs:
    assert sorted(predictions_of(epoch)) == expected
    for b in epoch:
      mask, ids = b["loss_mask"][0], b["segment_ids"][0]
      assert not mask[ids == 0].any()  # padding predicts nothing
      for tokens, positions, _ in segments_of(b, 0):
        np.testing.assert_array_equal(positions, np.arange(len(tokens)))  # restart per segment
        np.testing.assert_array_equal(np.diff(tokens), 1)  # a segment is one document's piece
    # Rows are full: the only padding is the stream's end, in one row of the epoch.
    assert sum((b["segment_ids"] == 0).any() for b in epoch) <= 1
  # Each epoch cuts the documents in new places and serves the rows in a new order.
  firsts = [[int(b["inputs"][0, 0]) for b in epoch] for epoch in epochs]
  assert firsts[0] != firsts[1] and set(firsts[0]) != set(firsts[1])
  other_seed = packed_batches(documents, batch_size=1, tokenizer=NumberedTokenizer(), seed=1)
  assert [int(other_seed.batch(i)["inputs"][0, 0]) for i in range(rows_per_epoch)] != firsts[0]
  # Global row i is the same whatever the batch size, in a batch that straddles two epochs too.
  by_three = packed_batches(documents, batch_size=3, tokenizer=NumberedTokenizer())
  assert rows_per_epoch % 3
  straddling = by_three.batch(rows_per_epoch // 3)
  glued = glue([epochs[i // rows_per_epoch][i % rows_per_epoch]
                for i in range(rows_per_epoch // 3 * 3, rows_per_epoch // 3 * 3 + 3)])
  assert_batches_equal(straddling, glued)


def test_a_split_too_big_to_keep_tokenized_gives_the_same_batches(monkeypatch):
  documents, _ = numbered(np.random.default_rng(2).integers(0, 121, size=40))
  kept = packed_batches(documents, tokenizer=NumberedTokenizer(), prefetch=0)
  monkeypatch.setattr(pipeline, "KEEP_TOKENS", 100)  # tokenized again row by row, cached
  reread = packed_batches(documents, tokenizer=NumberedTokenizer(), prefetch=0)
  for step in (0, 5, 30):
    assert_batches_equal(reread.batch(step), kept.batch(step))


def test_a_batch_mixes_documents_from_all_over_the_split():
  documents, _ = numbered([500] * 100)  # 16 rows each: packed in order, a batch would span 1-2
  batches = packed_batches(documents, batch_size=16, tokenizer=NumberedTokenizer())
  for step in range(5):
    assert len(np.unique(batches.batch(step)["inputs"] // 1000)) >= 12


def test_a_single_document_is_cut_into_rows_that_overlap_by_one_token_and_says_so():
  documents, expected = numbered([100])
  iterator = pipeline.PackedIterator(documents, NumberedTokenizer(), seed=0, split=data.TRAIN,
                                     batch_size=4, block_size=BLOCK, rows=slice(None))
  assert len(iterator.notices) == 1 and "single document" in iterator.notices[0]
  batch = next(iterator)  # the epoch's 4 rows, in shuffled order
  rows = sorted((np.append(i, t[-1]) for i, t in zip(batch["inputs"], batch["targets"])),
                key=lambda row: row[0])
  np.testing.assert_array_equal(rows[0], np.arange(33))
  np.testing.assert_array_equal(rows[1], np.arange(32, 65))  # the last target is the next input
  np.testing.assert_array_equal(rows[2], np.arange(64, 97))
  np.testing.assert_array_equal(rows[3][:4], [96, 97, 98, 99])  # the tail, then padding
  assert sorted(predictions_of([batch])) == expected


def test_few_documents_say_how_many_a_batch_spans():
  iterator = pipeline.PackedIterator([b"abc" * 30, b"de" * 40, b"xyz" * 20],
                                     tokenizers.ByteTokenizer(), seed=0, split=data.TRAIN,
                                     batch_size=8, block_size=BLOCK, rows=slice(None))
  assert iterator.notices == ["the train split has 3 documents, fewer than a batch's 8 rows: a "
                              "batch spans at most 3 documents"]
  assert "batch 0's 8 rows span 3 documents" in iterator.description


def test_rows_of_documents_that_never_fit_have_a_clear_error():
  with pytest.raises(data.DataError, match="no document of the train split has two or more"):
    packed_batches([b"a", b"", b"b"], prefetch=0)


def test_saved_state_restores_the_identical_next_three_batches_in_o1(monkeypatch):
  documents = random_documents(200)
  run = packed_batches(documents)
  for i in range(50):
    run.batch(i)
  state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
  assert state == {"step": 50}
  expected = [run.batch(i) for i in range(50, 53)]
  monkeypatch.setattr(pipeline, "KEEP_TOKENS", 0)  # rows read their documents: count the reads
  resumed = packed_batches(documents, tokenizer=CountingTokenizer(), prefetch=0)
  CountingTokenizer.calls = 0
  resumed.set_state(state)
  for i, batch in enumerate(expected):
    assert_batches_equal(resumed.batch(50 + i), batch)
  # Restoring reads only the documents of the 3 batches' 12 rows, not those of 50 batches.
  assert 0 < CountingTokenizer.calls <= 3 * 4 * 3


def test_the_batch_at_step_k_does_not_depend_on_history():
  documents = random_documents()
  sequential = packed_batches(documents)
  batches = [sequential.batch(i) for i in range(8)]
  assert_batches_equal(packed_batches(documents).batch(7), batches[7])  # a fresh start
  assert_batches_equal(sequential.batch(2), batches[2])  # going back (as eval does)
  assert not np.array_equal(batches[6]["inputs"], batches[7]["inputs"])


def test_one_and_two_processes_give_identical_global_batches():
  documents = random_documents(100)
  whole = packed_batches(documents, batch_size=8)
  halves = [packed_batches(documents, batch_size=8, rows=slice(0, 4)),
            packed_batches(documents, batch_size=8, rows=slice(4, 8))]
  for step in range(10):
    assert_batches_equal(glue([h.batch(step) for h in halves]), whole.batch(step))
  # A state saved by a one-process run restores each process of a two-process run.
  state = whole.get_state()
  for h in halves:
    h.set_state(state)
  assert_batches_equal(glue([h.batch(10) for h in halves]), whole.batch(10))


def test_the_whole_eval_predicts_every_val_token_once_and_pads_its_last_batch():
  lengths = np.random.default_rng(1).integers(0, 121, size=50)
  documents, expected = numbered(lengths)
  corpus, config = fake_corpus(documents, NumberedTokenizer()), block_config()
  batches, info = data.eval_batches(corpus, config, 4, 0)
  rows = -(-(lengths[lengths >= 2].sum() - 1) // BLOCK)
  assert len(batches) == info.num_batches == -(-rows // 4) and rows % 4  # a partial last batch
  got = list(batches)
  assert sorted(predictions_of(got)) == expected
  assert not got[-1]["loss_mask"][rows % 4:].any()  # its missing rows are padding
  assert (got[-1]["segment_ids"][rows % 4:] == 0).all()
  assert info.predictions == info.split_predictions == len(expected)
  assert info.documents == info.split_documents == (lengths >= 2).sum() and not info.notices
  # Two processes' rows of each eval batch reassemble it.
  halves = [data.eval_batches(corpus, config, 4, 0, slice(a, b))[0] for a, b in ((0, 2), (2, 4))]
  for i in (0, len(got) - 1):
    assert_batches_equal(glue([h[i] for h in halves]), got[i])


def test_a_short_eval_samples_the_whole_split_and_a_long_one_is_clamped():
  documents, _ = numbered([300] * 100)  # 10 rows each
  corpus, config = fake_corpus(documents, NumberedTokenizer()), block_config()
  batches, info = data.eval_batches(corpus, config, 4, 2)
  first = list(batches)
  assert len(first) == info.num_batches == 2
  covered = np.unique(np.concatenate([b["inputs"][b["loss_mask"] > 0] // 1000 for b in first]))
  assert info.documents == len(covered) >= 6  # 8 rows: not the first document or two
  assert info.predictions == sum(int(b["loss_mask"].sum()) for b in first)
  again, _ = data.eval_batches(corpus, config, 4, 2)
  for a, b in zip(again, first):
    assert_batches_equal(a, b)  # the same eval every time
  whole, clamped = data.eval_batches(corpus, config, 4, 10_000)
  assert len(whole) == clamped.num_batches == -(-937 // 4)  # ceil(29,999 / 32) rows
  assert clamped.documents == 100 and len(clamped.notices) == 1
  assert "config.eval_batches=10000 is more than the 235 batches" in clamped.notices[0]


def test_the_default_experiment_mixes_at_least_8_documents_a_batch_with_little_padding():
  config = get_config()  # the standard library's .py files, bytes, 16 rows of 129 tokens
  corpus = data.load_corpus(config.data, config.model.block_size)
  documents = corpus.documents(data.TRAIN)
  iterator = pipeline.PackedIterator(documents, corpus.tokenizer, seed=config.seed,
                                     split=data.TRAIN, batch_size=config.batch_size,
                                     block_size=config.model.block_size, rows=slice(None))
  packed = iterator.packed
  batches = data.make_batches(corpus, config, data.TRAIN, config.batch_size)
  for step in range(5):
    spanned, _ = packed.coverage(iterator.indices(step))
    assert len(spanned) >= 8
    # What the index says the batch holds is what it holds: each segment is in one of them.
    batch = next(iterator)
    assert_batches_equal(batch, batches.batch(step))  # what the train loop gets
    texts = [documents[int(n)] for n in spanned]
    for row in range(config.batch_size):
      for tokens, _, _ in segments_of(batch, row):
        assert any(bytes(tokens.astype(np.uint8)) in text for text in texts)
  assert packed.padding() <= 0.05
  _, info = data.eval_batches(corpus, config, config.batch_size, config.eval_batches)
  assert info.documents >= 20  # of the 59 val files, not two or three


def test_web_like_documents_pad_at_most_5_percent_of_2048_token_rows():
  """Log-normal lengths, median 1,000 tokens: most fit a row, and rows end mid-document."""
  lengths = np.random.default_rng(0).lognormal(np.log(1000), 1.0, size=1000).astype(int)
  documents = [bytes(n) for n in lengths]
  packed = pipeline.PackedRows(documents, tokenizers.ByteTokenizer(), seed=0, split=data.TRAIN,
                               block_size=2047)
  segment_ids = packed.epoch(0)[0].segments(np.arange(packed.rows_per_epoch))[2]
  assert np.mean(segment_ids == 0) == pytest.approx(packed.padding()) and packed.padding() <= 0.05


def test_packed_row_losses_equal_each_document_run_alone():
  """Attention stays within a segment and positions restart: a packed row is its documents."""
  documents = [b"The quick brown fox.", b"jumps", b"over the lazy dog and far away, twice over.",
               b"x" * 70, b"end"]
  batch = packed_batches(documents, batch_size=5, prefetch=0).batch(0)  # the epoch's 5 rows
  cfg = ModelConfig(vocab_size=256, block_size=BLOCK, num_layers=2, num_heads=2, embed_dim=32,
                    mlp_dim=64)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"])
  packed_nll = -np.asarray(token_log_likelihood(logits, batch["targets"]))
  # Each document alone, at the start of an otherwise empty row (causal: what follows is unseen).
  pieces = [(row, np.flatnonzero(batch["segment_ids"][row] == s)) for row in range(5)
            for s in range(1, batch["segment_ids"][row].max() + 1)]
  assert len(pieces) >= 8  # the rows really pack several documents
  alone_inputs, alone_targets = (np.zeros((len(pieces), BLOCK), np.int32) for _ in range(2))
  for i, (row, where) in enumerate(pieces):
    alone_inputs[i, :len(where)] = batch["inputs"][row][where]
    alone_targets[i, :len(where)] = batch["targets"][row][where]
  alone = jax.jit(model.apply)({"params": params}, alone_inputs)
  alone_nll = -np.asarray(token_log_likelihood(alone, alone_targets))
  compared = 0
  for i, (row, where) in enumerate(pieces):
    mask = batch["loss_mask"][row][where] > 0
    np.testing.assert_allclose(packed_nll[row][where][mask], alone_nll[i, :len(where)][mask],
                               atol=1e-5)
    compared += mask.sum()
  assert compared > 40


def test_trainer_trains_on_packed_rows_and_resumes_the_data_stream(corpus_file):
  path = corpus_file.parent / "docs.txt"
  path.write_text("\n\n".join(f"paragraph {i}: " + "words " * (i % 9) for i in range(300)))
  overrides = {"data.documents": "paragraph", "sample.prompt": "words"}
  config = tiny_config(path, **overrides)
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  assert trainer.corpus.tokenizer.vocab_size < trainer.config.model.vocab_size == 128  # padded
  losses = [float(trainer.step(i)["loss"]) for i in range(3)]
  assert all(np.isfinite(losses))
  state = trainer.data_state()
  assert state["step"] == 3
  expected = np.asarray(trainer.batch(data.TRAIN, 3, config.batch_size)["segment_ids"])
  other = train.Trainer(tiny_config(path, **overrides), devices=jax.devices()[:1])
  other.set_data_state(state)
  got = np.asarray(other.batch(data.TRAIN, 3, config.batch_size)["segment_ids"])
  np.testing.assert_array_equal(got, expected)
  assert expected.max() > 1  # several paragraphs per row
  assert 0 < trainer.evaluate()["eval_loss"] < 10


def test_windows_batching_is_still_nanogpts(corpus_file):
  config = tiny_config(corpus_file, **{"data.batching": "windows"})
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  batch = trainer.batch(data.VAL, 1, 8)
  expected = data.window_batch(trainer.corpus.tokens(data.VAL), batch_size=8, block_size=16,
                               seed=0, split=data.VAL, index=1)
  assert batch.keys() == expected.keys()
  for key in expected:
    np.testing.assert_array_equal(np.asarray(batch[key]), expected[key])


WORKER = """
import json, sys
import jax
import numpy as np
from jax.experimental import multihost_utils
address, process_id, path, state, out = sys.argv[1:]
jax.distributed.initialize(coordinator_address=address, num_processes=2,
                           process_id=int(process_id), initialization_timeout=60)
from bigflax import data, sharding
from bigflax.config import base
config = base()  # the data fields of the test's tiny_config, on all 8 devices of 2 processes
config.data.path, config.data.tokenizer, config.batch_size = path, "char", 8
config.model.block_size = 16
mesh = sharding.make_mesh(config.mesh)
batch_sharding = sharding.batch_sharding(mesh, sharding.rules_of(config.mesh))
rows = sharding.process_rows(batch_sharding, 8)
corpus = data.load_corpus(config.data, config.model.block_size)
batches = data.make_batches(corpus, config, data.TRAIN, 8, rows)
batches.set_state(json.loads(state))
steps = {}
for step in (2, 3):
  local = batches.batch(step)
  glob = multihost_utils.process_allgather(sharding.global_batch(local, batch_sharding),
                                           tiled=True)
  steps.update({f"{step}/{k}": np.asarray(v) for k, v in glob.items()})
if jax.process_index() == 0:
  np.savez(out, rows=np.array([rows.start, rows.stop]), **steps)
"""


def test_two_processes_on_127_0_0_1_make_the_one_process_global_batches(tmp_path, corpus_file):
  """Each process makes only its rows of the global batch, resumed from a one-process state."""
  config = tiny_config(corpus_file, **{"batch_size": 8})
  corpus = data.load_corpus(config.data, config.model.block_size)  # built once, read by both
  one = data.make_batches(corpus, config, data.TRAIN, 8)
  expected = [one.batch(i) for i in range(4)]
  resumed = data.make_batches(corpus, config, data.TRAIN, 8)
  resumed.batch(0), resumed.batch(1)
  state = json.dumps(resumed.get_state())
  (tmp_path / "worker.py").write_text(WORKER)
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
  workers = [subprocess.Popen([sys.executable, str(tmp_path / "worker.py"), address, str(i),
                               str(corpus_file), state, str(tmp_path / "out.npz")], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
  for worker in workers:
    _, err = worker.communicate(timeout=300)
    assert worker.returncode == 0, err[-3000:]
  got = np.load(tmp_path / "out.npz")
  np.testing.assert_array_equal(got["rows"], [0, 4])  # process 0 made half the rows
  for step in (2, 3):
    for key, value in expected[step].items():
      np.testing.assert_array_equal(got[f"{step}/{key}"], value, err_msg=f"{step}/{key}")
