"""The batches of one split, step by step: the object `Trainer` asks for batch k; and the eval.

Two batchings (`config.data.batching`, registry `BATCHINGS`):

  packed   documents → rows cut from each epoch's stream of documents (`packing`) → shuffled
  windows  random windows of the split's tokens laid end to end (nanoGPT; `windows`)

Packed: each epoch shuffles the split's documents (so rows cut them in new places) and then the
rows (so a batch draws its rows from all over the split, not from one or two documents), both
seeded by (seed, split, epoch). Global row i is row `order[i mod R]` of epoch i // R (R rows an
epoch), and batch k is global rows k·batch_size … k·batch_size + batch_size − 1, of which a
process makes only its `rows`. So batch k is a pure function of (dataset, seed, k), the same for
any number of processes; the state is the step alone, and resuming costs nothing.

Raw shards (parquet, jsonl: `shards`) are the exception for the train split: no host reads
another's shards. A process's `rows` (sharding.process_rows: one range, the same size on every
process) make it host h of H (`host_of`: H the batch's row ranges, so processes holding the same
rows are one host and read the same shards); host h packs its own shards (`ShardSource.share`)
into its own stream of rows, and its rows of batch k are that stream's rows k·w … k·w + w − 1
(w = batch_size / H). Global batch k is the hosts' rows in host order: a pure function of
(dataset, seed, k, H), still resumed from the step alone, and for H = 1 the batch above. The val
split stays whole on every host (the eval below).

Where the rows fall needs every document's token length, read once when the pipeline is built
(`split_index`): the bytes' length for the byte tokenizer, a tokenization for the others.

The eval (`eval_batches`) takes the val split's rows of one epoch in the same shuffled order, so a
few batches already sample documents from the whole split; asking for 0 batches makes every
next-token prediction of the split once, the last batch padded (loss_mask 0). It is the same
under both batchings, so eval_loss compares them.

Batches prefetch in a background thread (`config.data.prefetch` batches ahead), so the train step
does not wait on input.
"""

import abc
import collections.abc
import dataclasses
import functools

import grain
import numpy as np

from bigflax.data.packing import Layout, batch_fields
from bigflax.data.tokenizers import ByteTokenizer
from bigflax.data.windows import TRAIN, VAL, check_long_enough, window_batch
from bigflax.errors import DataError

SPLIT_NAMES = {TRAIN: "train", VAL: "val"}
# A split's tokens stay in memory while they number at most this (128 MB as uint16).
KEEP_TOKENS = 1 << 26
_INDEXES = {}  # (id(documents), id(tokenizer)) → (documents, tokenizer, index); a few splits


def tokenized(documents, tokenizer):
  """A split's documents as the pipeline reads them: examples that are more than text
  (fine-tuning examples, `sft`; labelled texts, `classify`) tokenize themselves, once."""
  return documents.tokenize(tokenizer) if hasattr(documents, "tokenize") else documents


def split_index(documents, tokenizer, source: str) -> tuple[np.ndarray, list | None]:
  """(every document's token count, every document's tokens or None), computed once per
  (documents, tokenizer): the train loop's and the eval's pipelines share it. Each document is
  tokenized once, and the tokens are kept while they fit in KEEP_TOKENS, so rows are slices of
  memory; past that, rows read their documents again (the byte tokenizer's lengths are then just
  the documents' sizes)."""
  key = (id(documents), id(tokenizer))
  if key not in _INDEXES and hasattr(documents, "token_lengths"):  # a token cache: no tokenizing
    _INDEXES[key] = (documents, tokenizer, (documents.token_lengths(), None))
  if key not in _INDEXES:
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
    lengths, kept, total = [], [], 0
    for i in range(len(documents)):
      if kept is None and isinstance(tokenizer, ByteTokenizer):
        lengths.append(len(documents[i]))  # a byte is a token
        continue
      tokens = tokenizer.encode_document(documents[i], f"{source} document ({i})")
      lengths.append(len(tokens))
      total += len(tokens)
      if total > KEEP_TOKENS:
        kept = None  # too many: from here on, only lengths
      else:
        kept.append(tokens.astype(dtype))
    while len(_INDEXES) >= 8:
      del _INDEXES[next(iter(_INDEXES))]
    # The entry holds the objects themselves, so their ids are not reused while it lives.
    _INDEXES[key] = (documents, tokenizer, (np.array(lengths, np.int64), kept))
  return _INDEXES[key][2]


class PackedRows:
  """Every row of one split's packing, epoch after epoch (see the module docstring)."""

  def __init__(self, documents, tokenizer, *, seed: int, split: int, block_size: int,
               source: int | None = None):
    # source: a mixture's source number, which joins the seed of its epochs' shuffles.
    name = SPLIT_NAMES[split]
    documents = tokenized(documents, tokenizer)
    self._source = () if source is None else (source,)
    lengths, kept = split_index(documents, tokenizer, f"a {name}")
    self._numbers = np.flatnonzero(lengths >= 2)  # a shorter document has nothing to predict
    if not len(self._numbers):
      raise DataError(f"no document of the {name} split has two or more tokens, so there is "
                      "nothing to predict; check config.data.source / config.data.path")
    self._lengths = lengths[self._numbers]
    self._seed, self._split, self.length = seed, split, block_size + 1
    self.num_documents = len(self._numbers)
    self.rows_per_epoch = Layout(self._numbers, self._lengths, self.length).num_rows
    # Documents that carry loss weights (`packing`) say how many of their targets count.
    self._weighted = hasattr(documents, "counted_targets")
    self.predictions = int(  # per epoch
        documents.counted_targets()[self._numbers].sum() if self._weighted
        else (self._lengths - 1).sum())
    self.notices = []
    if self.num_documents == 1:
      self.notices.append(
          f"the {name} split is a single document: packed rows are windows of it; give more "
          "documents (e.g. config.data.documents=paragraph) for batches that mix them")
    encode = lambda number: tokenizer.encode_document(documents[number],
                                                      f"a {name} document ({number})")
    if hasattr(documents, "tokens"):  # a token cache: documents are their tokens
      self._read = documents.tokens
    elif kept is not None:
      self._read = kept.__getitem__
    elif isinstance(tokenizer, ByteTokenizer):
      self._read = encode  # reading is tokenizing
    else:  # rows come from all over the split: a cache helps only where documents repeat
      self._read = functools.lru_cache(maxsize=1024)(encode)
    if kept is None and getattr(documents, "reads_whole_shards", False):
      self.notices.append(
          f"the {name} split has more than {KEEP_TOKENS:,} tokens, so rows read its documents "
          "again, each from a whole shard: slow; tokenize it once with tools/prepare_data.py and "
          "train from the cache (config.data.source=cache)")
    self.epoch = functools.lru_cache(maxsize=2)(self._make_epoch)  # a batch may span two

  def _make_epoch(self, epoch: int) -> tuple[Layout, np.ndarray]:
    """The epoch's layout and its rows in the order they are served; a last extra entry,
    rows_per_epoch, names a row of padding (a finite pass's last batch)."""
    rng = np.random.default_rng((self._seed, self._split, epoch, *self._source))
    documents = rng.permutation(self.num_documents)
    layout = Layout(self._numbers[documents], self._lengths[documents], self.length)
    return layout, np.append(rng.permutation(self.rows_per_epoch), self.rows_per_epoch)

  def _by_epoch(self, indices: np.ndarray, finite: bool):
    """(layout, which of `indices`, their rows) for each epoch the global rows `indices` fall in;
    finite: all in epoch 0, those past its end padding."""
    epochs = np.zeros_like(indices) if finite else indices // self.rows_per_epoch
    for epoch in np.unique(epochs):
      layout, order = self.epoch(int(epoch))
      which = epochs == epoch
      place = np.minimum(indices[which] - epoch * self.rows_per_epoch, self.rows_per_epoch)
      yield layout, which, order[place]

  def rows(self, indices: np.ndarray, *, finite: bool = False) -> dict[str, np.ndarray]:
    """The batch fields of global rows `indices`."""
    # tokens, segment ids, positions and, where the documents carry them, loss weights (0 on
    # padding, where no target counts anyway)
    arrays = [np.zeros((len(indices), self.length), np.int32)
              for _ in range(4 if self._weighted else 3)]
    for layout, which, rows in self._by_epoch(indices, finite):
      for array, part in zip(arrays, layout.rows(rows, self._read)):
        if part is not None:
          array[which] = part
    return batch_fields(*arrays)

  def coverage(self, indices: np.ndarray, *, finite: bool = False) -> tuple[np.ndarray, int]:
    """(the numbers of the documents global rows `indices` predict a token of, how many
    predictions they make), from the layout alone (no document is read) unless the documents
    carry loss weights."""
    found, predictions = [], 0
    for layout, _, rows in self._by_epoch(indices, finite):
      for chunk in np.array_split(rows, -(-len(rows) // 65536)):  # bounded memory
        place, _, segment_ids, _ = layout.segments(chunk)
        predicts = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
        found.append(layout.numbers[place[:, :-1][predicts]])
        if self._weighted:  # which targets count needs the documents' weights
          predicts = batch_fields(*layout.rows(chunk, self._read))["loss_mask"] > 0
        predictions += int(predicts.sum())
    return np.unique(np.concatenate(found)), predictions

  def padding(self) -> float:
    """The share of an epoch's row tokens that are padding (segment id 0)."""
    total = self.rows_per_epoch * self.length
    real = self.predictions + self.num_documents + self.rows_per_epoch - 1  # rows share an end
    return 1 - real / total


class StepIterator(abc.ABC):
  """Batch `step`, step after step: the whole state is the step, since a batch is a pure function
  of it. Subclasses say how batch `step` is made (`make`)."""
  _step = 0

  @abc.abstractmethod
  def make(self, step: int) -> dict[str, np.ndarray]:
    """This process's rows of global batch `step`."""

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.make(self._step)
    self._step += 1
    return batch

  def get_state(self) -> dict:
    return {"step": self._step}

  def set_state(self, state: dict) -> None:
    self._step = state["step"]


class PackedIterator(StepIterator):
  """This process's rows of every global batch of packed rows (a pure function of the step)."""

  def __init__(self, documents, tokenizer, *, seed: int, split: int, batch_size: int,
               block_size: int, rows: slice, finite: bool = False, packed=None):
    # `packed`: rows made elsewhere (a mixture's MixedRows) in place of the documents'.
    self.packed = packed if packed is not None else PackedRows(
        documents, tokenizer, seed=seed, split=split, block_size=block_size)
    self._batch_size, self._rows, self._finite = batch_size, rows, finite
    spans = len(self.packed.coverage(np.arange(batch_size), finite=finite)[0])
    name = SPLIT_NAMES[split]
    if packed is not None:  # a mixture
      self.description = (
          f"mixed {name} rows of {block_size + 1} tokens from " + ", ".join(
              f"{n} {w:.1%}" for n, w in zip(packed.names, packed.weights)) +
          f" ({self.packed.num_documents:,} documents, {self.packed.padding():.2%} padding); "
          f"batch 0's {batch_size} rows span {spans} documents")
    else:
      self.description = (
          f"packed {name} rows: {self.packed.num_documents:,} documents cut into "
          f"{self.packed.rows_per_epoch:,} rows of {block_size + 1} tokens an epoch "
          f"({self.packed.padding():.2%} padding); batch 0's {batch_size} rows span {spans} "
          "documents")
    self.notices = list(self.packed.notices)
    if 1 < self.packed.num_documents < batch_size:
      self.notices.append(
          f"the {name} split has {self.packed.num_documents} documents, fewer than a batch's "
          f"{batch_size} rows: a batch spans at most {self.packed.num_documents} documents")

  def indices(self, step: int) -> np.ndarray:
    """The global rows of batch `step` that this process makes."""
    return (step * self._batch_size + np.arange(self._batch_size))[self._rows]

  def make(self, step: int) -> dict[str, np.ndarray]:
    return self.packed.rows(self.indices(step), finite=self._finite)


class WindowIterator(StepIterator):
  """This process's rows of every global batch of random windows (a pure function of the step)."""

  def __init__(self, tokens: np.ndarray, *, seed: int, split: int, batch_size: int,
               block_size: int, rows: slice):
    self._kwargs = dict(batch_size=batch_size, block_size=block_size, seed=seed, split=split,
                        rows=rows)
    self._tokens = tokens
    self.description = (f"random windows of {block_size + 1} tokens of the "
                        f"{SPLIT_NAMES[split]} split's {len(tokens):,}")
    self.notices = []

  def make(self, step: int) -> dict[str, np.ndarray]:
    return window_batch(self._tokens, index=step, **self._kwargs)


class Batches:
  """Batch k of one split for this process, prefetched; `get_state`/`set_state` save and restore
  the position (a small JSON-able dict) with a checkpoint. Batch k is a pure function of k, so
  any k costs one batch; asking for k, k+1, … in turn keeps the prefetch running.

  `description` says what the batches are (one line); `notices` are lines worth printing once
  (a degenerate split)."""

  def __init__(self, iterator, prefetch: int):
    self.description, self.notices = iterator.description, iterator.notices
    self._iterator = grain.experimental.ThreadPrefetchDatasetIterator(iterator, prefetch)

  def batch(self, index: int) -> dict[str, np.ndarray]:
    if index != self.get_state()["step"]:
      self.set_state({"step": index})
    return next(self._iterator)

  def get_state(self) -> dict:
    return self._iterator.get_state()

  def set_state(self, state: dict) -> None:
    self._iterator.set_state({"step": int(state["step"])})


def host_of(rows: slice, batch_size: int) -> tuple[int, int]:
  """(h, H): the process holding `rows` of a global batch of `batch_size` rows is host h of the
  H that hold a range of their own (every process's range the same size: process_rows)."""
  start, stop, _ = rows.indices(batch_size)
  width = stop - start
  if width <= 0 or batch_size % width or start % width:
    raise DataError(f"rows {start}:{stop} of a batch of {batch_size} are not one of equal "
                    "ranges that split it; order config.mesh so the batch axes are outermost")
  return start // width, batch_size // width


def host_share(corpus, split: int, batch_size: int, rows: slice) -> tuple[int, int] | None:
  """(h, H) when the split's documents (every mixture source's) are raw shards split among
  several hosts (see the docstring), else None."""
  if split != TRAIN:
    return None
  mixture = getattr(corpus, "mixture", None)
  sources = [d for _, _, d in mixture] if mixture else [corpus.documents(split)]
  if not all(hasattr(d, "share") for d in sources):
    return None
  host, hosts = host_of(rows, batch_size)
  return (host, hosts) if hosts > 1 else None


def packed(corpus, split: int, *, batch_size: int, rows: slice, **kwargs) -> PackedIterator:
  documents = corpus.documents(split)
  mixture = getattr(corpus, "mixture", None) if split == TRAIN else None
  share = host_share(corpus, split, batch_size, rows)
  if share:  # this host's own shards, into its own stream of rows
    host, hosts = share
    if mixture:
      mixture = [(n, w, d.share(host, hosts)) for n, w, d in mixture]
    else:
      documents = documents.share(host, hosts)
    batch_size, rows = batch_size // hosts, slice(None)
  mixed = None
  if mixture:  # [(name, weight, documents)]
    from bigflax.data.mixture import MixedRows
    mixed = MixedRows([PackedRows(d, corpus.tokenizer, seed=kwargs["seed"], split=split,
                                  block_size=kwargs["block_size"], source=i)
                       for i, (_, _, d) in enumerate(mixture)],
                      [w for _, w, _ in mixture], [n for n, _, _ in mixture])
  iterator = PackedIterator(documents, corpus.tokenizer, split=split, packed=mixed,
                            batch_size=batch_size, rows=rows, **kwargs)
  if share:
    own = sum(len(d.urls) for d in ([d for _, _, d in mixture] if mixture else [documents]))
    iterator.description += (f"; this is host {share[0]} of {share[1]}, reading its {own} "
                             "train shard(s) alone")
  return iterator


def windows(corpus, split: int, **kwargs) -> WindowIterator:
  if host_share(corpus, split, kwargs["batch_size"], kwargs["rows"]):
    raise DataError("config.data.batching=windows joins the train split into one token array on "
                    "every host, and raw shards are split among the hosts so that none reads "
                    "another's; use config.data.batching=packed")
  tokens = corpus.tokens(split)
  # load_corpus leaves a raw source's train split unread, as a pod's hosts need: checked here
  check_long_enough(tokens, kwargs["block_size"], SPLIT_NAMES[split])
  return WindowIterator(tokens, split=split, **kwargs)


BATCHINGS = {"packed": packed, "windows": windows}


def make_batches(corpus, config, split: int, batch_size: int,
                 rows: slice = slice(None)) -> Batches:
  """The global batches of `batch_size` rows of `split` (TRAIN or VAL), or the `rows` of each
  that one process holds."""
  iterator = BATCHINGS[config.data.batching](
      corpus, split, seed=config.seed, batch_size=batch_size,
      block_size=config.model.block_size, rows=rows)
  return Batches(iterator, config.data.prefetch)


@dataclasses.dataclass(frozen=True)
class EvalInfo:
  num_batches: int  # batches the eval runs (after clamping)
  documents: int  # distinct val documents it predicts tokens of (all batches, all processes)
  split_documents: int  # val documents with a token to predict (two or more tokens)
  predictions: int  # next-token predictions it makes (the eval loss's denominator)
  split_predictions: int  # those of the whole split
  notices: tuple[str, ...]  # one-line messages worth printing once (clamping, a degenerate split)


class EvalBatches(collections.abc.Sequence):
  """The eval's batches (this process's rows of each), made on demand and prefetched when
  iterated in order."""

  def __init__(self, batches: Batches, num_batches: int):
    self._batches, self._num_batches = batches, num_batches

  def __len__(self) -> int:
    return self._num_batches

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < self._num_batches:
      raise IndexError(f"eval batch {index} of {self._num_batches}")
    return self._batches.batch(index)


def clamp_eval_batches(num_batches: int, num_rows: int, batch_size: int, unit: str,
                       notices: list) -> int:
  """The batches an eval runs: `num_batches`, or (0, or more than the split fills) every one of
  the split's `num_rows` rows once, with a notice appended when it was clamped."""
  whole = -(-num_rows // batch_size)
  if num_batches > whole:
    notices.append(f"config.eval_batches={num_batches} is more than the {whole} batches of "
                   f"{batch_size} {unit} the val split fills; evaluating those {whole} (the whole "
                   "split once, as eval_batches=0 does)")
  return whole if num_batches <= 0 else min(num_batches, whole)


def eval_batches(corpus, config, batch_size: int, num_batches: int,
                 rows: slice = slice(None)) -> tuple[EvalBatches, EvalInfo]:
  """The eval: the first `num_batches` global batches of the val split's rows of one epoch, in
  their shuffled order (the same every call), or all of them once when `num_batches` is 0 or more
  than the split fills (then clamped, with a notice). Rows past the split's end are padding.
  Whatever `config.data.batching`, these are packed rows of the val documents, nothing predicted
  across documents, so eval_loss means the same under both batchings."""
  iterator = PackedIterator(corpus.documents(VAL), corpus.tokenizer, seed=config.seed,
                            split=VAL, batch_size=batch_size, block_size=config.model.block_size,
                            rows=rows, finite=True)
  packed = iterator.packed
  notices = list(packed.notices)
  num_batches = clamp_eval_batches(num_batches, packed.rows_per_epoch, batch_size, "rows",
                                   notices)
  documents, predictions = packed.coverage(np.arange(num_batches * batch_size), finite=True)
  info = EvalInfo(num_batches, len(documents), packed.num_documents, predictions,
                  packed.predictions, tuple(notices))
  return EvalBatches(Batches(iterator, config.data.prefetch), num_batches), info
