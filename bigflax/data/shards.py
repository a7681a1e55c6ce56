"""Sharded web-scale sources: parquet and JSON-lines shards, local or remote (`gs://…`, any
fsspec URL), as TextSource-like sequences of documents (`bytes`).

    config.data.source = "parquet" | "jsonl"
    config.data.path   = a glob of shards: /data/c4/*.parquet, gs://bucket/web/*.jsonl.gz
    config.data.text_feature = the parquet column / JSON field holding each document's text

A JSON-lines shard is `.jsonl`, `.jsonl.gz` or `.jsonl.zst` (zstd through pyarrow's codec, so no
extra dependency); every line one JSON object. The glob is expanded by fsspec and sorted; the
last `config.data.val_shards` shards validate, or those of a separate glob `config.data.val_path`.
Nothing is opened until a document (or the count of them) is asked for.

Hosts: every process expands the same glob itself (listing names only), and the train shards are
split among the hosts that hold their own rows of each batch: host h of H (from its rows,
`pipeline.host_of`) takes shards h, h + H, h + 2H, … of the sorted list (`share`), opens no
other train shard, and packs its rows from its own documents alone (see pipeline.py). Striding
rather than contiguous ranges spreads each host over the whole sorted list (shard names often
follow the crawl date or the source); either way shares differ by at most one shard, so give a
number of shards that is a multiple of the hosts, of similar sizes (a host that runs out of
rows sooner starts its next epoch sooner). Fewer train shards than hosts is an error naming
both. Batch k is then a pure function of (dataset, seed, k, number of hosts) and a run resumes
from its step alone; resumed on another number of hosts it goes on with that number's batches.
The val shards are not divided: every host reads them all (keep them few: the default is
one), so the eval is the same global batches for any number of hosts and its counts (documents,
predictions) are exact. Two more exceptions: the char tokenizer with no config.data.charset
learns its characters from the whole corpus, so it reads every shard on every host (give the
charset, or tokenize once, below, on a pod); and config.data.batching=windows, which joins the
split into one array, is refused on several hosts.

At web scale, tokenize once with tools/prepare_data.py and train from the cache
(`config.data.source=cache`): there every host makes the same global batch and keeps its rows,
the lengths a small index per shard and a host reading only the token slices of its own rows.
"""

import bisect
import collections
import functools
import gzip
import io
import json
import os
import threading

import fsspec
import numpy as np

from bigflax.errors import DataError, first_line

FORMATS = ("parquet", "jsonl")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".json.zst")


def filesystem(url: str):
  """(fsspec filesystem, its path) of `url`; a DataError saying what to install for a protocol
  fsspec knows but cannot load (gs:// needs gcsfs)."""
  try:
    return fsspec.core.url_to_fs(url)
  except ImportError as e:
    protocol = url.split("://")[0]
    raise DataError(f"reading {url} needs the fsspec backend for {protocol}:// ({e}); install it "
                    f"(gs://: pip install gcsfs; s3://: pip install s3fs)") from None
  except ValueError as e:
    raise DataError(f"cannot read {url}: {e}") from None


def expand(pattern: str, field: str = "config.data.path") -> list[str]:
  """The sorted URLs (local paths stay plain) that the glob `pattern` matches; a DataError when
  it matches nothing."""
  fs, path = filesystem(pattern if "://" in pattern else os.path.expanduser(pattern))
  matches = sorted(p for p, info in fs.glob(path, detail=True).items()
                   if info.get("type") != "directory")
  if not matches:
    raise DataError(f"{field}={pattern!r} matches no file; check the glob (quote it so the shell "
                    "leaves it alone) and that the shards exist")
  local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
  return matches if local else [fs.unstrip_protocol(p) for p in matches]


def format_of(url: str) -> str:
  if url.endswith(".parquet"):
    return "parquet"
  if url.endswith(JSONL_SUFFIXES):
    return "jsonl"
  raise DataError(f"{url}: cannot tell its format from its name; shards end in .parquet, "
                  f"{', '.join(JSONL_SUFFIXES)}")


def _open(url: str):
  fs, path = filesystem(url)
  return fs.open(path, "rb")


def size_of(url: str) -> int:
  fs, path = filesystem(url)
  return int(fs.size(path))


def _parquet_file(url: str, handle):
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    return pq.ParquetFile(handle)
  except (pa.ArrowInvalid, OSError) as e:
    raise DataError(f"{url} is not a parquet file ({first_line(e)}); give "
                    "config.data.source=jsonl for JSON lines, or remove the file from the glob"
                    ) from None


def _parquet_column(url: str, schema_names, feature: str):
  if feature not in schema_names:
    raise DataError(f"config.data.text_feature={feature!r}: {url} has no such column; its "
                    f"columns are {sorted(schema_names)}")


def parquet_count(url: str, feature: str) -> int:
  """The shard's rows, from its footer alone."""
  with _open(url) as handle:
    parquet = _parquet_file(url, handle)
    _parquet_column(url, parquet.schema_arrow.names, feature)
    return parquet.metadata.num_rows


def read_parquet(url: str, feature: str) -> list[bytes]:
  import pyarrow as pa
  with _open(url) as handle:
    parquet = _parquet_file(url, handle)
    _parquet_column(url, parquet.schema_arrow.names, feature)
    column = parquet.read(columns=[feature]).column(feature)
  if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
    column = column.cast(pa.large_binary())
  elif not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
    raise DataError(f"config.data.text_feature={feature!r}: the column of {url} holds "
                    f"{column.type}, not text; name a string column")
  return [b"" if d is None else d for d in column.to_pylist()]


def _decompressed(url: str, raw: bytes) -> bytes:
  if url.endswith(".gz"):
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError) as e:
      raise DataError(f"{url} is not gzip data ({e}); rename it or recompress it") from None
  if url.endswith(".zst"):
    import pyarrow as pa
    try:
      with pa.CompressedInputStream(pa.BufferReader(raw), "zstd") as stream:
        return stream.read()
    except (pa.ArrowInvalid, OSError) as e:
      raise DataError(f"{url} is not zstd data ({first_line(e)}); rename it or "
                      "recompress it") from None
  return raw


def json_lines(lines, url: str, fix: str):
  """(line number, value) of each non-blank JSON line of `lines` (str or bytes lines of `url`);
  a DataError naming the file and line, then `fix`, for one that is not JSON."""
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      yield number, json.loads(line)
    except ValueError as e:
      raise DataError(f"{url} line {number} is not JSON ({e}); {fix}") from None


def read_jsonl(url: str, feature: str) -> list[bytes]:
  with _open(url) as handle:
    raw = _decompressed(url, handle.read())
  documents = []
  for number, record in json_lines(
      io.BytesIO(raw), url, "each line of a JSON-lines shard is one JSON object (give "
      "config.data.source=parquet for parquet)"):
    if not isinstance(record, dict) or feature not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"config.data.text_feature={feature!r}: {url} line {number} has no such "
                      f"field; its fields are {keys}")
    text = record[feature]
    documents.append(text.encode("utf-8") if isinstance(text, str) else
                     b"" if text is None else str(text).encode("utf-8"))
  return documents


def read_shard(url: str, feature: str, file_format: str = "") -> list[bytes]:
  """Every document of one shard, in order."""
  file_format = file_format or format_of(url)
  return read_parquet(url, feature) if file_format == "parquet" else read_jsonl(url, feature)


class ShardSource:
  """The documents of a list of shards, by index across them (random access: a shard is read
  whole when one of its documents is asked for, and the last few read are kept). Nothing is
  opened until a document or the count is asked for; `share` is one host's part of the list."""

  reads_whole_shards = True  # a document read out of order costs its whole shard

  def __init__(self, urls: list[str], feature: str, file_format: str = "", keep: int = 2,
               field: str = "config.data.path"):
    # field: the setting that named these shards, for errors.
    self.urls, self._feature, self._format = list(urls), feature, file_format
    self._field = field
    self._loaded = collections.OrderedDict()
    self._lock = threading.Lock()
    self._keep = keep
    self._shares = {}

  @functools.cached_property
  def counts(self) -> list[int]:
    """Each shard's documents: a parquet footer, or a JSON-lines shard read (and kept)."""
    return [parquet_count(url, self._feature) if (self._format or format_of(url)) == "parquet"
            else len(self._shard(number)) for number, url in enumerate(self.urls)]

  @functools.cached_property
  def _ends(self) -> list[int]:
    return np.cumsum(self.counts).tolist()

  def share(self, host: int, hosts: int) -> "ShardSource":
    """Host `host` of `hosts`' shards: every `hosts`-th from the `host`-th (the same object each
    time, so pipelines share its index); a DataError when there are fewer shards than hosts."""
    if len(self.urls) < hosts:
      raise DataError(f"{self._field} has {len(self.urls)} train shard(s) for {hosts} hosts, "
                      f"so {hosts - len(self.urls)} host(s) would have none to read; give at "
                      f"least {hosts} train shards (ideally a multiple of {hosts}: split the "
                      "files further) or train on fewer hosts")
    if (host, hosts) not in self._shares:
      self._shares[host, hosts] = ShardSource(self.urls[host::hosts], self._feature,
                                              self._format, self._keep, self._field)
    return self._shares[host, hosts]

  def _shard(self, number: int) -> list[bytes]:
    with self._lock:  # pipelines' prefetch threads may share the source
      if number not in self._loaded:
        self._loaded[number] = read_shard(self.urls[number], self._feature, self._format)
        while len(self._loaded) > self._keep:
          self._loaded.popitem(last=False)
      self._loaded.move_to_end(number)
      return self._loaded[number]

  def __len__(self) -> int:
    return self._ends[-1] if self._ends else 0

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(index)
    number = bisect.bisect_right(self._ends, index)
    start = self._ends[number - 1] if number else 0
    return self._shard(number)[index - start]

  def in_order(self) -> list[bytes]:
    return [document for number in range(len(self.urls)) for document in self._shard(number)]


def split_shards(urls: list[str], val_shards: int, what: str) -> tuple[list[str], list[str]]:
  """(train shards, val shards): the last `val_shards` of the sorted `urls` validate."""
  if val_shards >= len(urls):
    raise DataError(f"{what} matches {len(urls)} shard(s), and config.data.val_shards="
                    f"{val_shards} of them would validate, leaving none to train; give more "
                    "shards, lower config.data.val_shards or set config.data.val_path")
  return urls[:len(urls) - val_shards], urls[len(urls) - val_shards:]


def open_shards(path: str, val_path: str, val_shards: int, feature: str, file_format: str = "",
                field: str = "config.data.path"):
  """(train ShardSource, val ShardSource, description) of a glob, the val shards being the last
  `val_shards` or those of the glob `val_path`."""
  urls = expand(path, field)
  if val_path:
    train, val = urls, expand(val_path, "config.data.val_path")
  else:
    train, val = split_shards(urls, val_shards, f"{field}={path!r}")
  how = (f"val: {val_path}" if val_path else f"the last {len(val)} validate")
  return (ShardSource(train, feature, file_format, field=f"{field}={path!r}"),
          ShardSource(val, feature, file_format),
          f"{path} ({len(train)} train / {len(val)} val shards, {how})")

