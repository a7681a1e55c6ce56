"""A token cache: a source's shards tokenized once (tools/prepare_data.py), read by the packed
pipeline without tokenizing (`config.data.source=cache`, `config.data.path=DIR`).

DIR holds, for source shard i (in the source glob's sorted order):

  NNNNN.tokens.npy   every document's tokens (encode_document: BOS … EOS where the tokenizer has
                     them) laid end to end, uint16 when the vocabulary fits, else int32
  NNNNN.index.npy    int64 offsets, documents + 1 of them: document j is tokens[o[j]:o[j+1]]
  NNNNN.json         the shard's entry: its source URL and size, documents, tokens, tokenizer

and, once every shard is there, `manifest.json`: the tokenizer (name, hash of what defines it:
the sentencepiece model file's bytes, the char tokenizer's charset), the text feature and every
shard's entry. Each file is written to a temporary name and renamed once whole, the shard's
entry last, and the manifest after all shards: a killed preparation leaves no manifest (the
cache reads as incomplete) and resumes where it stopped, skipping every shard whose entry
matches its source (URL and size) and the tokenizer. A cache built with another tokenizer is
refused, both when preparing into it and when training from it.

Reading memory-maps the .npy files: document lengths come from the indexes (small), and a
process reads only the token slices of the rows it makes.
"""

import concurrent.futures
import contextlib
import hashlib
import json
import os
import pathlib
import uuid

import numpy as np

from bigflax.data import shards
from bigflax.data.tokenizers import make_tokenizer
from bigflax.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "bigflax-token-cache/1"


def fingerprint(data_config) -> dict:
  """What identifies the tokenizer of `config.data`: its name and a hash of what defines it."""
  name = data_config.tokenizer
  if name == "sentencepiece":
    try:
      digest = hashlib.sha256(pathlib.Path(data_config.tokenizer_model).expanduser()
                              .read_bytes()).hexdigest()
    except OSError as e:
      raise DataError(f"config.data.tokenizer_model={data_config.tokenizer_model!r} cannot be "
                      f"read ({e.strerror or e}); point it at the sentencepiece .model file"
                      ) from None
    return {"name": name, "hash": digest, "model": str(data_config.tokenizer_model)}
  if name == "char":
    if not data_config.charset:
      raise DataError("a token cache with the char tokenizer needs its charset: give "
                      "config.data.charset (--charset to tools/prepare_data.py)")
    return {"name": name, "hash": hashlib.sha256(data_config.charset.encode()).hexdigest(),
            "charset": data_config.charset}
  return {"name": name, "hash": name}


def _describe(tokenizer: dict) -> str:
  return f"{tokenizer['name']} (hash {tokenizer['hash'][:12]})"


def _atomic_write(path: pathlib.Path, write) -> None:
  """`write(file)` into a temporary file beside `path`, renamed over it once whole."""
  temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.partial"
  try:
    with open(temporary, "wb") as f:
      write(f)
    os.replace(temporary, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(temporary)
    raise


def _write_json(path: pathlib.Path, value) -> None:
  _atomic_write(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


_SHARD_GLOB = "[0-9][0-9][0-9][0-9][0-9]"


def _stem(number: int) -> str:
  return f"{number:05d}"


def _entry_matches(path: pathlib.Path, source: str, size: int, tokenizer: dict) -> bool:
  try:
    entry = json.loads(path.read_text())
  except (OSError, ValueError):
    return False
  return (entry.get("source"), entry.get("size"), entry.get("tokenizer", {}).get("hash")) == (
      source, size, tokenizer["hash"])


def _prepare_shard(job) -> dict:
  """Tokenizes one shard into its files (a worker process's job)."""
  number, url, size, out, data_config, file_format = job
  out = pathlib.Path(out)
  tokenizer = make_tokenizer(data_config)
  dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.int32
  documents = shards.read_shard(url, data_config.text_feature, file_format)
  pieces = [tokenizer.encode_document(d, f"{url} document {j}").astype(dtype)
            for j, d in enumerate(documents)]
  offsets = np.zeros(len(pieces) + 1, np.int64)
  np.cumsum([len(p) for p in pieces], out=offsets[1:])
  tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype)
  stem = _stem(number)
  _atomic_write(out / f"{stem}.tokens.npy", lambda f: np.save(f, tokens))
  _atomic_write(out / f"{stem}.index.npy", lambda f: np.save(f, offsets))
  entry = {"source": url, "size": size, "documents": len(pieces), "tokens": int(offsets[-1]),
           "tokens_file": f"{stem}.tokens.npy", "index_file": f"{stem}.index.npy",
           "tokenizer": fingerprint(data_config)}
  _write_json(out / f"{stem}.json", entry)
  return entry


def prepare(data_config, output: str, *, workers: int = 1, overwrite: bool = False,
            log=lambda line: None) -> dict:
  """Tokenizes the shards of `data_config.path` (source parquet | jsonl, or by their names)
  into the cache `output`; resumes a killed run; returns the manifest."""
  out = pathlib.Path(output).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = fingerprint(data_config)
  existing = out / MANIFEST
  ours = [existing] if existing.exists() else []
  ours += sorted(out.glob(_SHARD_GLOB + ".json"))
  if ours:
    try:
      previous = json.loads(ours[0].read_text()).get("tokenizer", {})
    except ValueError:
      previous = {"name": "unknown", "hash": "unreadable"}
    if previous.get("hash") != tokenizer["hash"]:
      if not overwrite:
        raise DataError(f"{output} holds a cache built with the tokenizer "
                        f"{_describe(previous)}, not {_describe(tokenizer)}; give another "
                        "output directory, or --overwrite to rebuild it")
      for pattern in (MANIFEST, _SHARD_GLOB + ".json", _SHARD_GLOB + ".tokens.npy",
                      _SHARD_GLOB + ".index.npy"):
        for p in out.glob(pattern):
          p.unlink()
  file_format = data_config.source if data_config.source in shards.FORMATS else ""
  urls = shards.expand(data_config.path)
  with contextlib.suppress(OSError):
    existing.unlink()  # it is rewritten below once every shard is there
  jobs, entries = [], {}
  for number, url in enumerate(urls):
    size = shards.size_of(url)
    entry_path = out / f"{_stem(number)}.json"
    if (not overwrite and _entry_matches(entry_path, url, size, tokenizer)
        and (out / f"{_stem(number)}.tokens.npy").exists()
        and (out / f"{_stem(number)}.index.npy").exists()):
      entries[number] = json.loads(entry_path.read_text())
    else:
      jobs.append((number, url, size, str(out), data_config, file_format))
  log(f"{len(urls)} shards: {len(entries)} already tokenized, {len(jobs)} to go")
  if workers > 1 and len(jobs) > 1:
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
      for job, entry in zip(jobs, pool.map(_prepare_shard, jobs)):
        entries[job[0]] = entry
        log(f"  {job[1]}: {entry['documents']:,} documents, {entry['tokens']:,} tokens")
  else:
    for job in jobs:
      entries[job[0]] = _prepare_shard(job)
      log(f"  {job[1]}: {entries[job[0]]['documents']:,} documents, "
          f"{entries[job[0]]['tokens']:,} tokens")
  manifest = {"format": FORMAT, "tokenizer": tokenizer, "text_feature": data_config.text_feature,
              "source": data_config.path, "shards": [entries[n] for n in range(len(urls))]}
  _write_json(existing, manifest)
  return manifest


def read_manifest(directory: str, field: str = "config.data.path") -> dict:
  path = pathlib.Path(directory).expanduser()
  manifest = path / MANIFEST
  if not manifest.exists():
    if not path.is_dir():
      raise DataError(f"{field}={directory!r} is not a directory; a token cache is the "
                      "directory tools/prepare_data.py writes")
    done = len(list(path.glob(_SHARD_GLOB + ".json")))
    raise DataError(f"{field}={directory!r} is an incomplete token cache ({done} shard(s) done, "
                    "no manifest.json): rerun tools/prepare_data.py with the same arguments to "
                    "finish it")
  value = json.loads(manifest.read_text())
  if value.get("format") != FORMAT:
    raise DataError(f"{field}={directory!r}: {manifest} is not a bigflax token cache manifest "
                    f"(format {value.get('format')!r}, expected {FORMAT!r})")
  return value


def check_tokenizer(manifest: dict, data_config, directory: str) -> None:
  built = manifest["tokenizer"]
  if data_config.tokenizer == "char" and not data_config.charset and built["name"] == "char":
    return  # the cache's charset is used (data._tokenizer_for)
  if data_config.tokenizer != built["name"]:
    wanted = data_config.tokenizer
  else:
    wanted = fingerprint(data_config)
    if built["hash"] == wanted["hash"]:
      return
    wanted = _describe(wanted)
  raise DataError(f"the token cache {directory} was built with the tokenizer "
                  f"{_describe(built)}, but config.data asks for {wanted}; set "
                  "config.data.tokenizer / tokenizer_model to the cache's, or rebuild the "
                  "cache with tools/prepare_data.py")


class TokenSource:
  """The documents of some shards of a token cache, as token arrays (`tokens(i)`), with their
  lengths (`token_lengths()`) read from the indexes alone; the packed pipeline reads these
  instead of tokenizing."""

  def __init__(self, directory: str, entries: list[dict]):
    base = pathlib.Path(directory).expanduser()
    self.files = [str(base / e["tokens_file"]) for e in entries]
    self._offsets = [np.load(base / e["index_file"]) for e in entries]
    self._arrays = [None] * len(entries)
    counts = [len(o) - 1 for o in self._offsets]
    self._ends = np.cumsum(counts)
    self.num_tokens = sum(int(o[-1]) for o in self._offsets)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def token_lengths(self) -> np.ndarray:
    return (np.concatenate([np.diff(o) for o in self._offsets]) if self._offsets
            else np.zeros(0, np.int64))

  def tokens(self, index: int) -> np.ndarray:
    number = int(np.searchsorted(self._ends, index, side="right"))
    start = int(self._ends[number - 1]) if number else 0
    if self._arrays[number] is None:
      self._arrays[number] = np.load(self.files[number], mmap_mode="r")
    offsets = self._offsets[number]
    j = index - start
    return self._arrays[number][offsets[j]:offsets[j + 1]]

  def __getitem__(self, index: int) -> np.ndarray:
    return self.tokens(index)


def open_cache(data_config, directory: str, val_directory: str = "", val_shards: int = 1):
  """(train TokenSource, val TokenSource, description, manifest) of a cache; val: the last
  `val_shards` of its shards, or the cache `val_directory`."""
  manifest = read_manifest(directory)
  check_tokenizer(manifest, data_config, directory)
  entries = manifest["shards"]
  if val_directory:
    val_manifest = read_manifest(val_directory, "config.data.val_path")
    check_tokenizer(val_manifest, data_config, val_directory)
    train, val = entries, val_manifest["shards"]
    val_source = TokenSource(val_directory, val)
  else:
    if val_shards >= len(entries):
      raise DataError(f"the token cache {directory} has {len(entries)} shard(s), and "
                      f"config.data.val_shards={val_shards} of them would validate, leaving none "
                      "to train; lower config.data.val_shards or set config.data.val_path")
    train, val = entries[:len(entries) - val_shards], entries[len(entries) - val_shards:]
    val_source = TokenSource(directory, val)
  train_source = TokenSource(directory, train)
  description = (f"token cache {directory} ({_describe(manifest['tokenizer'])}; "
                 f"{len(train)} train / {len(val)} val shards, "
                 f"{train_source.num_tokens:,} train tokens)")
  return train_source, val_source, description, manifest


def is_cache(where: str) -> bool:
  """Whether `where` is a token cache directory (complete or not) rather than a glob."""
  path = pathlib.Path(where).expanduser()
  return "://" not in where and path.is_dir() and (
      (path / MANIFEST).exists() or any(path.glob(_SHARD_GLOB + ".index.npy")))
