"""Packing tokenized documents into fixed-length rows with segment ids and positions.

A row holds `block_size + 1` tokens: inputs are the first `block_size`, targets the last
`block_size` (as in a window). Documents are laid in one after another, each a segment
(`segment_ids` 1, 2, … within the row; 0 is padding) whose `positions` count from 0. The loss
counts a target only where it continues the same segment (`loss_mask`), so nothing is predicted
across a document boundary or from padding.

A document that fits in a row is never split: when it does not fit in what is left of the
current row, the rest of that row is padding and it starts the next one. A document longer than a
whole row is split instead: its pieces fill rows to the end, and consecutive pieces overlap by one
token (a row's last target is the next row's first input), so every one of its next-token
predictions is made exactly once. Each piece is its own segment, with positions from 0.
"""

import numpy as np

from bigflax.errors import DataError


class RowStream:
  """Packs `documents[0], documents[1], …` (token arrays) into rows, one row per call. Its whole
  position is (document number, token offset) — `state` — so it restarts anywhere in O(1): it
  re-tokenizes at most the one document it was inside."""

  def __init__(self, documents, *, length: int, num_documents: int):
    self._documents = documents
    self._length = length  # tokens per row: block_size + 1
    self._num_documents = num_documents  # one epoch: a stream that skips this many is stuck
    self.state = (0, 0)
    self._cached = (-1, None)

  def _document(self, number: int) -> np.ndarray:
    if self._cached[0] != number:
      self._cached = (number, self._documents[number])
    return self._cached[1]

  def row(self, tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> None:
    """Fills one row (arrays of `length`, zero on entry) and advances the stream past it."""
    number, offset = self.state
    fill, segment, skipped = 0, 0, 0
    while fill < self._length:
      doc = self._document(number)
      rest, space = len(doc) - offset, self._length - fill
      if len(doc) < 2:  # nothing to predict in it
        number, skipped = number + 1, skipped + 1
        if skipped > self._num_documents:
          raise DataError("no document of the split has two or more tokens, so there is "
                          "nothing to predict; check config.data.source / config.data.path")
        continue
      if rest <= space:
        piece, number, offset = doc[offset:], number + 1, 0
      elif rest > self._length and space >= 2:
        piece, offset = doc[offset:offset + space], offset + space - 1
      else:
        break  # it fits in a fresh row: pad this one
      segment += 1
      tokens[fill:fill + len(piece)] = piece
      segment_ids[fill:fill + len(piece)] = segment
      positions[fill:fill + len(piece)] = np.arange(len(piece))
      fill += len(piece)
    self.state = (number, offset)

  def set_state(self, state) -> None:
    self.state = tuple(int(x) for x in state)


def packed_batch(stream: RowStream, batch_size: int, block_size: int) -> dict[str, np.ndarray]:
  """The stream's next `batch_size` rows → the batch fields."""
  shape = (batch_size, block_size + 1)
  tokens, segment_ids, positions = (np.zeros(shape, np.int32) for _ in range(3))
  for i in range(batch_size):
    stream.row(tokens[i], segment_ids[i], positions[i])
  same_segment = segment_ids[:, :-1] == segment_ids[:, 1:]
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "loss_mask": (same_segment & (segment_ids[:, :-1] > 0)).astype(np.float32),
      "segment_ids": segment_ids[:, :-1],
      "positions": positions[:, :-1],
  }
