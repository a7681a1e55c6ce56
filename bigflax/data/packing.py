"""Packing documents into fixed-length rows with segment ids and positions.

An epoch lays its documents end to end, in the epoch's order, as one stream of tokens, and cuts
the stream into rows of `length` = block_size + 1 tokens, each row starting on the token the row
before ended on: row r holds stream tokens r·(length−1) … r·(length−1) + length−1. Inputs are a
row's first block_size tokens and targets its last block_size (as in a window), so a row's last
token (a target only) is the next row's first input, and every pair of neighbouring stream
tokens — every next-token prediction — lies in exactly one row.

Each document's piece of a row is a segment (`segment_ids` 1, 2, … within the row; 0 is padding)
whose `positions` count from 0. The loss counts a target only where it continues the same
segment (`loss_mask`), and attention stays within a segment, so nothing is predicted across a
document boundary: every next-token prediction of every document is made exactly once an epoch.
A document is cut wherever a row ends, so rows are full to the end; the only padding is after
the stream's end, in the epoch's last row.

Where a row falls is arithmetic on the documents' token lengths (a cumulative sum), so any row is
made directly, reading only the documents it holds, without packing the rows before it.
"""

import numpy as np

from bigflax.errors import DataError


class Layout:
  """One epoch's stream: the documents `numbers` (all of ≥ 2 tokens) in stream order, with their
  token `lengths`, cut into rows of `length` tokens."""

  def __init__(self, numbers: np.ndarray, lengths: np.ndarray, length: int):
    self.numbers, self.length = numbers, length
    self.ends = np.cumsum(lengths)  # where each document ends in the stream
    self.starts = self.ends - lengths
    # The stream's (tokens − 1) neighbouring pairs, length − 1 of them to a row.
    self.num_rows = -(-(int(self.ends[-1]) - 1) // (length - 1))

  def segments(self, rows: np.ndarray) -> tuple[np.ndarray, ...]:
    """For each token of `rows` ([n] row numbers; a row ≥ num_rows is all padding), all
    [n, length]: its document's place in the stream, its offset in that document, its segment
    id and its position."""
    first = rows[:, None] * (self.length - 1)  # the stream token each row starts on
    slots = first + np.arange(self.length)
    real = (rows[:, None] < self.num_rows) & (slots < self.ends[-1])
    slots = np.where(real, slots, 0)
    place = np.searchsorted(self.ends, slots, side="right")
    # Documents in a row are consecutive in the stream, so their places number the segments.
    segment_ids = np.where(real, place - place[:, :1] + 1, 0).astype(np.int32)
    positions = np.where(real, slots - np.maximum(self.starts[place], first), 0).astype(np.int32)
    return place, slots - self.starts[place], segment_ids, positions

  def rows(self, rows: np.ndarray, read) -> tuple[np.ndarray, ...]:
    """(tokens, segment_ids, positions) of `rows`, each [n, length]; `read(number)` is a
    document's tokens. Each document the rows touch is read once."""
    place, offsets, segment_ids, positions = self.segments(rows)
    real = segment_ids > 0
    tokens = np.zeros(place.shape, np.int32)
    needed, which = np.unique(place[real], return_inverse=True)
    if len(needed):
      offsets = offsets[real]
      # Each document's span that the rows use (from its first to its last token used), laid
      # end to end, so one gather fills every row.
      first = np.full(len(needed), np.iinfo(np.int64).max)
      last = np.zeros(len(needed), np.int64)
      np.minimum.at(first, which, offsets)
      np.maximum.at(last, which, offsets)
      spans = []
      for p, a, b in zip(needed, first, last):
        text = read(int(self.numbers[p]))
        if len(text) != self.ends[p] - self.starts[p]:
          raise DataError(
              f"document {self.numbers[p]} has {len(text)} tokens now but had "
              f"{self.ends[p] - self.starts[p]} when the split was indexed; the data or the "
              "tokenizer changed under a running pipeline: rebuild it (restart the run)")
        spans.append(text[a:b + 1])
      span_starts = np.cumsum([0] + [len(span) for span in spans[:-1]])
      tokens[real] = np.concatenate(spans)[span_starts[which] + offsets - first[which]]
    return tokens, segment_ids, positions


def batch_fields(tokens: np.ndarray, segment_ids: np.ndarray,
                 positions: np.ndarray) -> dict[str, np.ndarray]:
  """[n, block_size + 1] rows → the batch fields, each [n, block_size]."""
  same_segment = segment_ids[:, :-1] == segment_ids[:, 1:]
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "loss_mask": (same_segment & (segment_ids[:, :-1] > 0)).astype(np.float32),
      "segment_ids": segment_ids[:, :-1],
      "positions": positions[:, :-1],
  }
