"""The batches of one split, step by step: the object `Trainer` asks for batch k.

Two batchings (`config.data.batching`, registry `BATCHINGS`):

  packed   documents → tokenize → pack into rows with segment ids (`packing`) → batch
  windows  random windows of the split's tokens laid end to end (nanoGPT; `windows`)

Packed batches come from a grain pipeline: the split's documents are a `grain.MapDataset`,
shuffled by `seed` and repeated (every epoch in a new order) and tokenized on access, then packed
into consecutive rows, `batch_size` rows a step. The global batch at step k is a pure function of
(dataset, seed, k) whatever the number of processes. The position is three integers (step,
document number, offset in it), so the state is small (JSON) and restoring it costs one
document's tokenization, not k batches.

Both batchings prefetch in a background thread (`config.data.prefetch` batches ahead), so the
train step does not wait on input.
"""

import grain
import numpy as np

from bigflax.data.packing import RowStream, packed_batch
from bigflax.data.windows import TRAIN, VAL, window_batch

SPLIT_NAMES = {TRAIN: "train", VAL: "val"}


def document_order(documents, tokenizer, seed: int, split: int) -> grain.MapDataset:
  """Tokenized documents in shuffled order, repeated forever; each epoch is shuffled anew."""
  source = SPLIT_NAMES[split]
  return (grain.MapDataset.source(documents)
          .shuffle(seed=seed * 2 + split)  # train and val: different orders from one seed
          .repeat()
          .map(lambda text: tokenizer.encode_document(text, f"a {source} document")))


class PackedIterator:
  """This process's rows of every global batch of packed documents.

  The global batches are consecutive rows of one packing of the shuffled documents; every process
  packs them all and keeps its own rows, because where row r of step k starts depends on every
  document before it. So the result cannot depend on the process count, and the state is global:
  any process can save it, and it restores a run on any number of processes."""

  def __init__(self, documents, tokenizer, *, seed: int, split: int, batch_size: int,
               block_size: int, rows: slice):
    self._stream = RowStream(document_order(documents, tokenizer, seed, split),
                             length=block_size + 1, num_documents=len(documents))
    self._batch_size, self._block_size, self._rows = batch_size, block_size, rows
    self._step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = packed_batch(self._stream, self._batch_size, self._block_size)
    self._step += 1
    return {key: value[self._rows] for key, value in batch.items()}

  def get_state(self) -> dict:
    document, offset = self._stream.state
    return {"step": self._step, "document": document, "offset": offset}

  def set_state(self, state: dict) -> None:
    self._step = state["step"]
    self._stream.set_state((state["document"], state["offset"]))


class WindowIterator:
  """This process's rows of every global batch of random windows (a pure function of the step)."""

  def __init__(self, tokens: np.ndarray, *, seed: int, split: int, batch_size: int,
               block_size: int, rows: slice):
    self._kwargs = dict(batch_size=batch_size, block_size=block_size, seed=seed, split=split,
                        rows=rows)
    self._tokens = tokens
    self._step = 0

  def __next__(self) -> dict[str, np.ndarray]:
    batch = window_batch(self._tokens, index=self._step, **self._kwargs)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = state["step"]


class Batches:
  """Batch k of one split for this process, prefetched; `get_state`/`set_state` save and restore
  the position (a small JSON-able dict) with a checkpoint.

  The train loop asks for k = 0, 1, 2, … (or resumes with `set_state`); eval asks for 0 … n-1
  every time. Any other jump replays the batches in between."""

  def __init__(self, iterator, prefetch: int):
    self._start = iterator.get_state()
    self._iterator = grain.experimental.ThreadPrefetchDatasetIterator(iterator, prefetch)

  def batch(self, index: int) -> dict[str, np.ndarray]:
    step = self.get_state()["step"]
    if index < step:
      self.set_state(self._start)
      step = 0
    for _ in range(index - step):
      next(self._iterator)
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state(state)


def packed(corpus, split: int, **kwargs) -> PackedIterator:
  return PackedIterator(corpus.documents(split), corpus.tokenizer, split=split, **kwargs)


def windows(corpus, split: int, **kwargs) -> WindowIterator:
  return WindowIterator(corpus.tokens(split), split=split, **kwargs)


BATCHINGS = {"packed": packed, "windows": windows}


def make_batches(corpus, config, split: int, batch_size: int,
                 rows: slice = slice(None)) -> Batches:
  """The global batches of `batch_size` rows of `split` (TRAIN or VAL), or the `rows` of each
  that one process holds."""
  iterator = BATCHINGS[config.data.batching](
      corpus, split, seed=config.seed, batch_size=batch_size,
      block_size=config.model.block_size, rows=rows)
  return Batches(iterator, config.data.prefetch)
