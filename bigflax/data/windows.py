"""Batches of random windows from a flat token array (nanoGPT's `get_batch`, made deterministic).

A batch holds `batch_size` windows of `block_size + 1` consecutive tokens; each window's start is
drawn uniformly from every valid offset. Inputs are the first `block_size` tokens and targets the
last `block_size` (the same window shifted by one). The draw for step k comes from a numpy
generator seeded with (seed, split, k): the batch at step k is a pure function of the data, the
seed and k — restarting a run or skipping ahead never needs to replay earlier batches.
"""

import numpy as np

from bigflax.errors import DataError

TRAIN, VAL = 0, 1


def check_long_enough(tokens: np.ndarray, block_size: int, split: str) -> None:
  if len(tokens) < block_size + 1:
    raise DataError(
        f"the {split} split has {len(tokens):,} tokens, fewer than model.block_size + 1 = "
        f"{block_size + 1}; lower --config.model.block_size, give more text, or (for val) "
        "raise --config.data.val_fraction")


def window_batch(tokens: np.ndarray, *, batch_size: int, block_size: int, seed: int,
                 split: int, index: int, rows: slice = slice(None)) -> dict[str, np.ndarray]:
  """The global batch's `rows` (one process's share): the draw covers all `batch_size` windows,
  so a row's content does not depend on how many processes share the batch."""
  rng = np.random.default_rng((seed, split, index))
  starts = rng.integers(0, len(tokens) - block_size, size=batch_size)[rows]
  windows = tokens[starts[:, None] + np.arange(block_size + 1)]
  return {
      "inputs": windows[:, :-1].astype(np.int32),
      "targets": windows[:, 1:].astype(np.int32),
      "loss_mask": np.ones((len(starts), block_size), np.float32),
  }
