"""Mixtures: named sources with weights, mixed row by row into the train batches.

    config.data.mixture = ("web=gs://b/web/*.parquet:0.7;code=/data/code/*.jsonl.gz:0.2;"
                           "books=/cache/books:0.1")

Each part is NAME=WHERE:WEIGHT, WHERE being a glob of parquet / JSON-lines shards (format by file
name) or a token cache directory (tools/prepare_data.py); the weight follows the last colon, so
URLs keep theirs. Weights are relative (normalised to sum 1). Each source splits into train / val
like a single one (the last config.data.val_shards shards validate); the val split of a mixture
is every source's val documents, so the eval covers them all.

Rows are all block_size + 1 tokens and full but for one row an epoch, so the sources' shares of
rows are their shares of tokens. Global train row i comes from source `labels[i mod P]`, where
labels[p] places the low-discrepancy point frac(p·φ) (φ the golden ratio) in the cumulative
weights, P = 2^16: any run of n consecutive rows holds each source's share to within a few rows.
Row i is row (i // P)·count[c] + rank[i mod P] of source c's own packed rows (its epochs shuffled
by (seed, split, source number)), so batch k stays a pure function of (dataset, seed, k) and
resuming costs O(1). When the sources are raw shards on several hosts, each host mixes its own
share of every source's train shards this way into its own rows (pipeline.py), so every source
needs at least as many train shards as there are hosts.
"""

import functools

import numpy as np

from bigflax.errors import ConfigError

PERIOD = 1 << 16
_PHI = (np.sqrt(5.0) - 1) / 2


def parse(mixture: str) -> list[tuple[str, str, float]]:
  """[(name, where, weight)] of config.data.mixture; ConfigError naming the part that is wrong."""
  parts = []
  for part in filter(None, (p.strip() for p in mixture.split(";"))):
    name, equals, rest = part.partition("=")
    where, colon, weight = rest.rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = None
    if not (equals and colon and name.strip() and where.strip()) or value is None:
      raise ConfigError(f"config.data.mixture part {part!r} is not NAME=GLOB:WEIGHT; write e.g. "
                        "'web=/data/web/*.parquet:0.7;code=/data/code/*.jsonl.gz:0.3'")
    if not np.isfinite(value) or value < 0:
      raise ConfigError(f"config.data.mixture: the weight of {name.strip()!r} is {weight}; "
                        "weights must be finite and >= 0")
    parts.append((name.strip(), where.strip(), value))
  names = [p[0] for p in parts]
  if len(set(names)) != len(names):
    raise ConfigError(f"config.data.mixture names a source twice ({names}); give each its own "
                      "name")
  total = sum(p[2] for p in parts)
  if parts and total <= 0:
    raise ConfigError("config.data.mixture: every weight is 0; give at least one source a "
                      "positive weight")
  for name, _, weight in parts:
    if 0 < weight / total < 1 / PERIOD:
      raise ConfigError(f"config.data.mixture: {name!r} has {weight / total:.2g} of the weight, "
                        f"less than one row in {PERIOD:,} (the mixing period); raise it or give "
                        "it weight 0")
  return parts


def schedule(weights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(labels [P]: the source of each row of a period, counts [sources]: rows each source gets a
  period, ranks [P]: how many rows of the same source come before each in the period)."""
  weights = np.asarray(weights, np.float64)
  bounds = np.cumsum(weights / weights.sum())
  bounds[-1] = 1.0
  points = (np.arange(PERIOD) * _PHI) % 1.0
  labels = np.searchsorted(bounds, points, side="right").astype(np.int32)
  labels = np.minimum(labels, len(weights) - 1)
  counts = np.bincount(labels, minlength=len(weights))
  ranks = np.zeros(PERIOD, np.int64)
  for c in range(len(weights)):
    where = np.flatnonzero(labels == c)
    ranks[where] = np.arange(len(where))
  return labels, counts, ranks


class MixedRows:
  """Global rows of a mixture of PackedRows (`parts`, with their `weights`): PackedRows' interface
  (rows, coverage, padding, …) over the mixed stream, which has no epochs of its own."""

  def __init__(self, parts: list, weights, names: list[str]):
    self.parts, self.names = parts, names
    self.weights = np.asarray(weights, np.float64) / np.sum(weights)
    self._labels, self._counts, self._ranks = schedule(self.weights)
    self.length = parts[0].length
    self.num_documents = sum(p.num_documents for p in parts)
    self._offsets = np.cumsum([0] + [p.num_documents for p in parts])
    # An "epoch" for the description: a period's rows.
    self.rows_per_epoch = PERIOD
    self.predictions = sum(p.predictions for p in parts)
    self.notices = [n for p in parts for n in p.notices]

  def sources(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the source of each global row, its row in that source's own rows)."""
    indices = np.asarray(indices, np.int64)
    place = indices % PERIOD
    labels = self._labels[place]
    return labels, (indices // PERIOD) * self._counts[labels] + self._ranks[place]

  def rows(self, indices: np.ndarray, *, finite: bool = False) -> dict[str, np.ndarray]:
    del finite  # the mixture is the train split's; its eval reads the sources' val documents
    labels, local = self.sources(indices)
    out = None
    for c in np.unique(labels):
      which = labels == c
      part = self.parts[c].rows(local[which])
      if out is None:
        out = {k: np.zeros((len(indices),) + v.shape[1:], v.dtype) for k, v in part.items()}
      for k, v in part.items():
        out[k][which] = v
    return out

  def coverage(self, indices: np.ndarray, *, finite: bool = False) -> tuple[np.ndarray, int]:
    del finite
    labels, local = self.sources(indices)
    found, predictions = [], 0
    for c in np.unique(labels):
      documents, made = self.parts[c].coverage(local[labels == c])
      found.append(documents + self._offsets[c])
      predictions += made
    return np.unique(np.concatenate(found)), predictions

  def padding(self) -> float:
    return float(sum(w * p.padding() for w, p in zip(self.weights, self.parts)))


class Concat:
  """Documents of several sources one after another (a mixture's val split)."""

  def __init__(self, sources: list):
    self._sources = sources

  @functools.cached_property
  def _ends(self) -> np.ndarray:  # on first use: raw train shards are counted by their host
    return np.cumsum([len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  @property
  def reads_whole_shards(self) -> bool:
    return any(getattr(s, "reads_whole_shards", False) for s in self._sources)

  def _locate(self, index: int):
    number = int(np.searchsorted(self._ends, index, side="right"))
    return self._sources[number], index - (int(self._ends[number - 1]) if number else 0)

  def __getitem__(self, index: int):
    source, local = self._locate(index)
    return source[local]

  def in_order(self) -> list:
    return [d for s in self._sources for d in s.in_order()]


class TokenConcat(Concat):
  """Concat of token sources (token caches): lengths from their indexes, no tokenizing."""

  def token_lengths(self) -> np.ndarray:
    return np.concatenate([s.token_lengths() for s in self._sources])

  def tokens(self, index: int) -> np.ndarray:
    source, local = self._locate(index)
    return source.tokens(local)
