"""The batching pipeline: packing, determinism across processes and restarts, instant resume."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import portpicker
import pytest

from bigflax import data, train
from bigflax.data import packing, pipeline, tokenizers
from bigflax.model import ModelConfig, Transformer
from bigflax.objective import token_log_likelihood
from conftest import REPO, tiny_config

BLOCK = 32


def random_documents(count=60, seed=0):
  """Byte documents of 0 to 120 bytes: empty ones, ones that fit a row, ones longer than two."""
  rng = np.random.default_rng(seed)
  return [bytes(rng.integers(97, 123, size=rng.integers(0, 121)).astype(np.uint8))
          for _ in range(count)]


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


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def segments_of(batch, row):
  """The (tokens, positions, loss_mask) of each segment of one row, in order."""
  ids = batch["segment_ids"][row]
  return [(batch["inputs"][row][ids == s], batch["positions"][row][ids == s],
           batch["loss_mask"][row][ids == s]) for s in range(1, ids.max() + 1)]


def test_every_next_token_of_every_document_is_predicted_exactly_once_in_order():
  documents = random_documents()
  batches = packed_batches(documents, batch_size=1)
  rows = [batches.batch(i) for i in range(60)]
  predicted = [(int(x), int(y)) for b in rows
               for x, y, m in zip(b["inputs"][0], b["targets"][0], b["loss_mask"][0]) if m]
  order = pipeline.document_order(documents, tokenizers.ByteTokenizer(), 0, data.TRAIN)
  expected = [pair for n in range(len(documents) * 2)
              for pair in zip(order[n][:-1].tolist(), order[n][1:].tolist())]
  assert len(predicted) > 1500 and predicted == expected[:len(predicted)]
  for b in rows:
    mask, ids = b["loss_mask"][0], b["segment_ids"][0]
    assert not mask[ids == 0].any()  # padding predicts nothing
    for tokens, positions, _ in segments_of(b, 0):
      np.testing.assert_array_equal(positions, np.arange(len(tokens)))  # restart per segment
  # A document that fits in a row is never split: it is one whole segment of some row.
  whole = {bytes(tokens.astype(np.uint8)) + bytes([int(b["targets"][0][len(tokens) - 1])])
           for b in rows for tokens, _, _ in segments_of(b, 0)}
  fitting = [bytes(order[n].astype(np.uint8)) for n in range(len(documents))
             if 2 <= len(order[n]) <= BLOCK + 1]
  consumed = fitting[:len(fitting) // 2]  # surely packed within the first 60 rows
  assert consumed and all(any(w.startswith(doc) for w in whole) for doc in consumed)


def test_a_document_longer_than_a_row_is_split_with_one_token_of_overlap():
  doc = np.arange(100, dtype=np.int32)
  stream = packing.RowStream([doc] * 4, length=BLOCK + 1, num_documents=1)
  rows = []
  for _ in range(4):
    tokens, ids, positions = (np.zeros(BLOCK + 1, np.int32) for _ in range(3))
    stream.row(tokens, ids, positions)
    rows.append(tokens)
  np.testing.assert_array_equal(rows[0], np.arange(33))
  np.testing.assert_array_equal(rows[1], np.arange(32, 65))  # the last target is the next input
  np.testing.assert_array_equal(rows[2], np.arange(64, 97))
  # The 4-token tail (96..99), then the next document fills the rest of the row: it is longer
  # than a row, so it is split rather than moved to a fresh one.
  np.testing.assert_array_equal(rows[3][:4], [96, 97, 98, 99])
  np.testing.assert_array_equal(rows[3][4:], np.arange(29))


def test_rows_of_documents_that_never_fit_have_a_clear_error():
  with pytest.raises(data.DataError, match="no document of the split has two or more tokens"):
    packed_batches([b"a", b"", b"b"], prefetch=0).batch(0)


def test_saved_state_restores_the_identical_next_three_batches_in_o1():
  documents = random_documents(200)
  run = packed_batches(documents)
  for i in range(50):
    run.batch(i)
  state = json.loads(json.dumps(run.get_state()))  # what a checkpoint stores
  assert state["step"] == 50 and len(json.dumps(state)) < 100
  expected = [run.batch(i) for i in range(50, 53)]
  CountingTokenizer.calls = 0
  resumed = packed_batches(documents, tokenizer=CountingTokenizer())
  resumed.set_state(state)
  for i, batch in enumerate(expected):
    assert_batches_equal(resumed.batch(50 + i), batch)
  restored_cost = CountingTokenizer.calls
  CountingTokenizer.calls = 0
  packed_batches(documents, tokenizer=CountingTokenizer(), prefetch=0).batch(50)  # replaying
  # Restoring tokenizes only the documents the next rows touch, not those of 50 batches.
  assert restored_cost * 5 < CountingTokenizer.calls


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
    parts = [h.batch(step) for h in halves]
    glued = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    assert_batches_equal(glued, whole.batch(step))
  # A state saved by a one-process run restores each process of a two-process run.
  state = whole.get_state()
  for h in halves:
    h.set_state(state)
  parts = [h.batch(10) for h in halves]
  glued = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  assert_batches_equal(glued, whole.batch(10))


def test_each_epoch_is_a_new_order_of_the_same_documents():
  documents = [f"document {i}".encode() for i in range(50)]
  order = pipeline.document_order(documents, tokenizers.ByteTokenizer(), 0, data.TRAIN)
  epochs = [[bytes(order[e * 50 + i].astype(np.uint8)) for i in range(50)] for e in range(3)]
  assert all(sorted(epoch) == sorted(documents) for epoch in epochs)
  assert epochs[0] != epochs[1] != epochs[2] and epochs[0] != documents
  other_seed = pipeline.document_order(documents, tokenizers.ByteTokenizer(), 1, data.TRAIN)
  assert [bytes(other_seed[i].astype(np.uint8)) for i in range(50)] != epochs[0]


def test_packed_row_losses_equal_each_document_run_alone():
  """Attention stays within a segment and positions restart: a packed row is its documents."""
  documents = [b"The quick brown fox.", b"jumps", b"over the lazy dog and far away, twice over.",
               b"x" * 70, b"end"]
  batch = packed_batches(documents, batch_size=2, prefetch=0).batch(0)
  cfg = ModelConfig(vocab_size=256, block_size=BLOCK, num_layers=2, num_heads=2, embed_dim=32,
                    mlp_dim=64)
  model = Transformer(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, BLOCK), jnp.int32))["params"]
  logits = jax.jit(model.apply)({"params": params}, batch["inputs"], batch["positions"],
                       batch["segment_ids"])
  packed_nll = -np.asarray(token_log_likelihood(logits, batch["targets"]))
  # Each document alone, at the start of an otherwise empty row (causal: what follows is unseen).
  pieces = [(row, np.flatnonzero(batch["segment_ids"][row] == s)) for row in range(2)
            for s in range(1, batch["segment_ids"][row].max() + 1)]
  assert len(pieces) >= 4  # the rows really pack several documents
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
  assert trainer.corpus.tokenizer.vocab_size < config.model.vocab_size == 128  # padded
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
