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

A document is its tokens ([n]) or its tokens with a per-token loss weight ([2, n]: tokens, then 1
where the token is one the loss counts as a target, 0 where it is context only: a fine-tuning
example's prompt, `sft`). Weights travel with their tokens into the rows, and the loss counts a
target only where its weight is 1 as well.

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
    """(tokens, segment_ids, positions, weights) of `rows`, each [n, length]; `read(number)` is a
    document ([n] tokens, or [2, n] tokens and weights). weights is None where the documents
    carry none (or the rows are all padding). Each document the rows touch is read once."""
    place, offsets, segment_ids, positions = self.segments(rows)
    real = segment_ids > 0
    tokens, weights = np.zeros(place.shape, np.int32), None
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
        document = read(int(self.numbers[p]))
        if document.shape[-1] != self.ends[p] - self.starts[p]:
          raise DataError(
              f"document {self.numbers[p]} has {document.shape[-1]} tokens now but had "
              f"{self.ends[p] - self.starts[p]} when the split was indexed; the data or the "
              "tokenizer changed under a running pipeline: rebuild it (restart the run)")
        spans.append(document[..., a:b + 1])
      span_starts = np.cumsum([0] + [span.shape[-1] for span in spans[:-1]])
      # A split's documents all carry weights ([2, n]) or none do.
      joined = np.concatenate(spans, axis=-1)[..., span_starts[which] + offsets - first[which]]
      tokens[real] = joined[0] if joined.ndim == 2 else joined
      if joined.ndim == 2:
        weights = np.zeros(place.shape, np.int32)
        weights[real] = joined[1]
    return tokens, segment_ids, positions, weights


def batch_fields(tokens: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                 weights: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """[n, block_size + 1] rows → the batch fields, each [n, block_size]. A target counts in the
  loss where it continues its input's segment and (with weights) its weight is 1."""
  counted = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
  if weights is not None:
    counted &= weights[:, 1:] > 0
  return {
      "inputs": tokens[:, :-1],
      "targets": tokens[:, 1:],
      "loss_mask": counted.astype(np.float32),
      "segment_ids": segment_ids[:, :-1],
      "positions": positions[:, :-1],
  }
