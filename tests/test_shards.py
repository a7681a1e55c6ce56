"""Web-scale sources: parquet / JSON-lines shards (local and a fake gs://), train/val by shard,
train shards split among hosts (each built here as its process would), mixtures, the token cache
(tools/prepare_data.py) and their one-line errors."""

import gzip
import json
import pathlib
import re
import subprocess
import sys

import fsspec
import numpy as np
import portpicker
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from bigflax import data
from bigflax.config import base
from bigflax.data import cache, mixture, pipeline, shards
from bigflax.data.tokenizers import CharTokenizer
from bigflax.errors import ConfigError, DataError
from bigflax.rundir import read_metrics
from conftest import REPO, bigflax_env


def data_config(**fields):
  c = base().data
  for key, value in fields.items():
    c[key] = value
  return c


def documents_of(shard: int, n: int = 20, tag: str = "doc") -> list[str]:
  return [f"{tag} {shard}.{i} " + "the quick brown fox " * (1 + (7 * i + shard) % 9)
          for i in range(n)]


def write_parquet(path, texts, column="text"):
  pq.write_table(pa.table({column: texts, "id": list(range(len(texts)))}), str(path))


def jsonl_bytes(texts, field="text") -> bytes:
  return "".join(json.dumps({field: t, "meta": 1}) + "\n" for t in texts).encode()


def zstd(raw: bytes) -> bytes:
  sink = pa.BufferOutputStream()
  with pa.CompressedOutputStream(sink, "zstd") as stream:
    stream.write(raw)
  return sink.getvalue().to_pybytes()


@pytest.fixture
def parquet_dir(tmp_path):
  for s in range(4):
    write_parquet(tmp_path / f"part-{s:03d}.parquet", documents_of(s))
  return tmp_path


class FakeGCS(MemoryFileSystem):
  """fsspec's memory filesystem under the gs protocol: the remote code path, offline."""
  protocol = ("gs", "gcs")
  store, pseudo_dirs = {}, [""]

  @classmethod
  def _strip_protocol(cls, path):
    for prefix in ("gs://", "gcs://"):
      path = path.removeprefix(prefix)
    return super()._strip_protocol(path)

  def unstrip_protocol(self, name):  # gcsfs's paths are bucket/object, the memory fs's /bucket/…
    return "gs://" + name.lstrip("/")


@pytest.fixture
def fake_gcs(monkeypatch):
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = [""]
  registry = sys.modules["fsspec.registry"]._registry
  for protocol in FakeGCS.protocol:  # restored after the test
    monkeypatch.setitem(registry, protocol, FakeGCS)
  yield fsspec.filesystem("gs")
  FakeGCS.store.clear()


def test_parquet_shards_split_by_shard(parquet_dir):
  c = data_config(source="parquet", path=str(parquet_dir / "*.parquet"), val_shards=1)
  corpus = data.load_corpus(c, block_size=16)
  assert len(corpus.train) == 60 and len(corpus.val) == 20
  assert corpus.train[0] == documents_of(0)[0].encode()
  assert corpus.train[59] == documents_of(2)[19].encode()
  assert corpus.val[5] == documents_of(3)[5].encode()
  assert "3 train / 1 val shards" in corpus.description
  batch = data.make_batches(corpus, base(), data.TRAIN, 4).batch(0)
  assert batch["inputs"].shape == (4, base().model.block_size)


def test_val_path_is_a_separate_glob(parquet_dir, tmp_path_factory):
  val_dir = tmp_path_factory.mktemp("val")
  write_parquet(val_dir / "v.parquet", documents_of(9, 5))
  c = data_config(source="parquet", path=str(parquet_dir / "*.parquet"),
                  val_path=str(val_dir / "*.parquet"))
  corpus = data.load_corpus(c, block_size=16)
  assert len(corpus.train) == 80 and len(corpus.val) == 5


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_jsonl_shards_plain_gzip_zstd(tmp_path, suffix):
  pack = {".jsonl": lambda b: b, ".jsonl.gz": gzip.compress, ".jsonl.zst": zstd}[suffix]
  for s in range(3):
    (tmp_path / f"s{s}{suffix}").write_bytes(pack(jsonl_bytes(documents_of(s), field="content")))
  c = data_config(source="jsonl", path=str(tmp_path / f"*{suffix}"), text_feature="content")
  corpus = data.load_corpus(c, block_size=16)
  assert len(corpus.train) == 40 and corpus.train[21] == documents_of(1)[1].encode()
  assert corpus.val.in_order() == [d.encode() for d in documents_of(2)]


def test_gs_path_through_fsspec(fake_gcs):
  for s in range(3):
    with fake_gcs.open(f"gs://bucket/web/part-{s}.parquet", "wb") as f:
      pq.write_table(pa.table({"text": documents_of(s)}), f)
    fake_gcs.pipe(f"gs://bucket/code/part-{s}.jsonl.gz", gzip.compress(jsonl_bytes(
        documents_of(s, tag="code"))))
  urls = shards.expand("gs://bucket/web/*.parquet")
  assert urls == [f"gs://bucket/web/part-{s}.parquet" for s in range(3)]
  corpus = data.load_corpus(data_config(source="parquet", path="gs://bucket/web/*.parquet"), 16)
  assert len(corpus.train) == 40 and corpus.val[0] == documents_of(2)[0].encode()
  corpus = data.load_corpus(data_config(source="jsonl", path="gs://bucket/code/*.jsonl.gz"), 16)
  assert corpus.train[0] == documents_of(0, tag="code")[0].encode()


def test_token_cache_matches_raw_batches_and_resumes(parquet_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("cache")
  raw = data_config(source="parquet", path=str(parquet_dir / "*.parquet"))
  manifest = cache.prepare(raw, str(out))
  assert manifest["tokenizer"] == {"name": "byte", "hash": "byte"}
  assert [s["source"] for s in manifest["shards"]] == shards.expand(raw.path)
  assert all(s["size"] == pathlib.Path(s["source"]).stat().st_size for s in manifest["shards"])
  config = base()
  cached = data.load_corpus(data_config(source="cache", path=str(out)), 16)
  corpus = data.load_corpus(raw, 16)
  for split in (data.TRAIN, data.VAL):
    a = data.make_batches(corpus, config, split, 8)
    b = data.make_batches(cached, config, split, 8)
    for k in (0, 3, 17):
      for key, value in a.batch(k).items():
        np.testing.assert_array_equal(value, b.batch(k)[key])
  # Resuming: a killed run left shard 2's entry missing and no manifest.
  (out / "00002.json").unlink()
  (out / cache.MANIFEST).unlink()
  with pytest.raises(DataError, match=r"incomplete token cache \(3 shard\(s\) done"):
    data.load_corpus(data_config(source="cache", path=str(out)), 16)
  before = (out / "00000.tokens.npy").stat().st_mtime_ns
  lines = []
  cache.prepare(raw, str(out), log=lines.append)
  assert lines[0] == "4 shards: 3 already tokenized, 1 to go"
  assert (out / "00000.tokens.npy").stat().st_mtime_ns == before
  assert not list(out.glob(".*partial"))


def test_killed_shard_write_leaves_no_complete_looking_cache(parquet_dir, tmp_path, monkeypatch):
  out = tmp_path / "cache"
  real = cache._atomic_write
  writes = []

  def dies_on_third_shard(path, write):
    writes.append(path.name)
    if path.name == "00002.index.npy":
      raise KeyboardInterrupt  # killed mid-shard
    real(path, write)

  monkeypatch.setattr(cache, "_atomic_write", dies_on_third_shard)
  with pytest.raises(KeyboardInterrupt):
    cache.prepare(data_config(source="parquet", path=str(parquet_dir / "*.parquet")), str(out))
  assert not (out / cache.MANIFEST).exists() and not (out / "00002.json").exists()
  assert not list(out.glob(".*partial"))
  with pytest.raises(DataError, match="incomplete token cache"):
    data.load_corpus(data_config(source="cache", path=str(out)), 16)


def test_cache_refuses_another_tokenizer(parquet_dir, tmp_path):
  out = tmp_path / "cache"
  cache.prepare(data_config(source="parquet", path=str(parquet_dir / "*.parquet")), str(out))
  for charset in ("abc", ""):
    other = data_config(source="cache", path=str(out), tokenizer="char", charset=charset)
    with pytest.raises(DataError, match=r"^the token cache .* built with the tokenizer byte "
                                        r"\(hash byte\), but config.data asks for char"):
      data.load_corpus(other, 16)
  with pytest.raises(DataError, match=r"holds a cache built with the tokenizer byte.*--overwrite"):
    cache.prepare(data_config(path=str(parquet_dir / "*.parquet"), tokenizer="char",
                              charset="abc"), str(out))


def test_prepare_data_tool(parquet_dir, tmp_path):
  out = tmp_path / "cache"
  run = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_data.py"), "--path",
                        str(parquet_dir / "*.parquet"), "--output", str(out), "--workers", "2"],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
  assert run.returncode == 0, run.stderr
  assert "4 shards, 80 documents" in run.stdout
  assert json.loads((out / cache.MANIFEST).read_text())["format"] == cache.FORMAT


def mixture_corpus(tmp_path, weights=(0.7, 0.2, 0.1), prepare=False):
  parts = []
  for name, weight in zip(("web", "code", "books"), weights):
    directory = tmp_path / name
    directory.mkdir()
    for s in range(3):
      write_parquet(directory / f"{s}.parquet", documents_of(s, n=30, tag=name))
    where = str(directory / "*.parquet")
    if prepare:
      cache.prepare(data_config(path=where), str(tmp_path / f"{name}_cache"))
      where = str(tmp_path / f"{name}_cache")
    parts.append(f"{name}={where}:{weight}")
  return data.load_corpus(data_config(mixture=";".join(parts)), 16)


@pytest.mark.parametrize("prepare", [False, True])
def test_mixture_token_shares_within_one_percent(tmp_path, prepare):
  corpus = mixture_corpus(tmp_path, prepare=prepare)
  config = base()
  config.model.block_size = 32
  iterator = pipeline.packed(corpus, data.TRAIN, seed=config.seed, batch_size=8, block_size=32,
                             rows=slice(None))
  mixed = iterator.packed
  tokens = np.zeros(3)
  for k in range(1000):
    indices = iterator.indices(k)
    labels, _ = mixed.sources(indices)
    segment_ids = mixed.rows(indices)["segment_ids"]
    np.add.at(tokens, labels, (segment_ids > 0).sum(axis=1))
  shares = tokens / tokens.sum()
  np.testing.assert_allclose(shares, [0.7, 0.2, 0.1], atol=0.01)
  # A pure function of (data, seed, k): a fresh pipeline's batch 500 is the same, any order.
  again = data.make_batches(corpus, config, data.TRAIN, 8)
  first = data.make_batches(corpus, config, data.TRAIN, 8).batch(500)
  for key, value in again.batch(500).items():
    np.testing.assert_array_equal(value, first[key])
  assert len(corpus.val) == 90  # every source's last shard


def test_mixture_schedule_counts():
  labels, counts, ranks = mixture.schedule([0.5, 0.25, 0.25])
  assert counts.sum() == mixture.PERIOD
  np.testing.assert_allclose(counts / mixture.PERIOD, [0.5, 0.25, 0.25], atol=1e-3)
  for c in range(3):
    np.testing.assert_array_equal(ranks[labels == c], np.arange(counts[c]))


@pytest.mark.parametrize("value, message", [
    ("web=/a/*.parquet:-0.5", r"the weight of 'web' is -0.5; weights must be finite and >= 0"),
    ("web=/a/*.parquet:0;code=/b/*.jsonl:0", r"every weight is 0"),
    ("web=/a/*.parquet", r"part 'web=/a/\*.parquet' is not NAME=GLOB:WEIGHT"),
    ("web=/a:1;web=/b:1", r"names a source twice"),
    ("web=/a:1;rare=/b:1e-6", r"'rare' has 1e-06 of the weight, less than one row in 65,536"),
])
def test_mixture_config_errors(value, message):
  with pytest.raises(ConfigError, match=message):
    data.check_config(data_config(mixture=value))


def test_mixture_parses_urls_with_colons():
  assert mixture.parse("web=gs://b/w/*.parquet:0.7; code=/c/*.jsonl.gz:0.3") == [
      ("web", "gs://b/w/*.parquet", 0.7), ("code", "/c/*.jsonl.gz", 0.3)]


def one_line(error) -> str:
  message = str(error.value)
  assert "\n" not in message
  return message


def test_glob_matching_nothing(tmp_path):
  with pytest.raises(DataError, match=r"config.data.path='.*/nothing-\*.parquet' matches no "
                                      "file") as e:
    data.load_corpus(data_config(source="parquet", path=str(tmp_path / "nothing-*.parquet")), 16)
  one_line(e)


def train_batches(c, rows=slice(None), batch_size=4):
  """The train pipeline of `config.data` c, as the process holding `rows` builds it (loading
  the corpus leaves raw train shards unread: the pipeline reads this host's)."""
  config = base()
  config.data.update(c)
  config.model.block_size = 16
  return data.make_batches(data.load_corpus(c, 16), config, data.TRAIN, batch_size, rows)


def test_not_parquet_names_the_file(tmp_path):
  write_parquet(tmp_path / "a.parquet", documents_of(0))
  (tmp_path / "b.parquet").write_text("just text\n")
  with pytest.raises(DataError, match=r"b.parquet is not a parquet file") as e:
    train_batches(data_config(source="parquet", path=str(tmp_path / "*.parquet"), val_shards=0,
                              val_path=str(tmp_path / "a.parquet")))
  one_line(e)


def test_bad_json_names_the_file_and_line(tmp_path):
  (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(["one", "two"]) + b"{not json\n")
  (tmp_path / "b.jsonl").write_bytes(jsonl_bytes(["three"]))
  with pytest.raises(DataError, match=r"a.jsonl line 3 is not JSON") as e:
    train_batches(data_config(source="jsonl", path=str(tmp_path / "*.jsonl")))
  one_line(e)


def test_missing_text_column_lists_the_columns(parquet_dir, tmp_path):
  with pytest.raises(DataError, match=r"text_feature='body'.*no such column; its columns are "
                                      r"\['id', 'text'\]") as e:
    data.load_corpus(data_config(source="parquet", path=str(parquet_dir / "*.parquet"),
                                 text_feature="body"), 16)
  one_line(e)
  (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(["x"]) * 2)
  with pytest.raises(DataError, match=r"a.jsonl line 1 has no such field; its fields are "
                                      r"\['meta', 'text'\]"):
    shards.read_jsonl(str(tmp_path / "a.jsonl"), "body")


def test_too_few_shards_for_val(parquet_dir):
  with pytest.raises(DataError, match=r"matches 4 shard\(s\), and config.data.val_shards=4"):
    data.load_corpus(data_config(source="parquet", path=str(parquet_dir / "*.parquet"),
                                 val_shards=4), 16)


def test_cache_and_mixture_need_packed_batching():
  with pytest.raises(ConfigError, match="use config.data.batching=packed"):
    data.check_config(data_config(source="cache", path="/x", batching="windows"))
  for field in ("path", "val_path", "source"):
    with pytest.raises(ConfigError, match="leave config.data.source, path and val_path empty"):
      data.check_config(data_config(mixture="a=/x:1", **{field: "parquet"}))


def test_cache_from_gs_shards(fake_gcs, tmp_path):
  for s in range(3):
    fake_gcs.pipe(f"gs://bucket/web/{s}.jsonl.zst", zstd(jsonl_bytes(documents_of(s))))
  manifest = cache.prepare(data_config(path="gs://bucket/web/*.jsonl.zst"), str(tmp_path / "c"))
  assert [e["source"] for e in manifest["shards"]] == [f"gs://bucket/web/{s}.jsonl.zst"
                                                       for s in range(3)]
  assert [e["size"] for e in manifest["shards"]] == [
      len(fake_gcs.cat(f"gs://bucket/web/{s}.jsonl.zst")) for s in range(3)]
  corpus = data.load_corpus(data_config(source="cache", path=str(tmp_path / "c")), 16)
  np.testing.assert_array_equal(corpus.val.tokens(1),
                                np.frombuffer(documents_of(2)[1].encode(), np.uint8))


def test_sentencepiece_fingerprint_is_the_model_files_hash(tmp_path):
  one, two = tmp_path / "one.model", tmp_path / "two.model"
  one.write_bytes(b"model one")
  two.write_bytes(b"model two")
  a = cache.fingerprint(data_config(tokenizer="sentencepiece", tokenizer_model=str(one)))
  b = cache.fingerprint(data_config(tokenizer="sentencepiece", tokenizer_model=str(two)))
  assert a["name"] == b["name"] == "sentencepiece" and a["hash"] != b["hash"]
  manifest = {"tokenizer": a}
  with pytest.raises(DataError, match=r"built with the tokenizer sentencepiece \(hash "):
    cache.check_tokenizer(manifest, data_config(tokenizer="sentencepiece",
                                                tokenizer_model=str(two)), "DIR")


def test_mixture_description_names_the_weights(tmp_path):
  corpus = mixture_corpus(tmp_path, weights=(2, 1, 1))
  iterator = pipeline.packed(corpus, data.TRAIN, seed=0, batch_size=8, block_size=32,
                             rows=slice(None))
  assert iterator.description.startswith(
      "mixed train rows of 33 tokens from web 50.0%, code 25.0%, books 25.0%")


@pytest.mark.slow
def test_bench_data_web_report_runs():
  run = subprocess.run([sys.executable, str(REPO / "tools" / "bench_data.py"), "--web",
                        "--web_shards", "2", "--web_mb", "0.3", "--batches", "5"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert run.returncode == 0, run.stderr
  assert "cache → pack" in run.stdout and "raw path at 1.2 M tokens/s needs" in run.stdout


@pytest.mark.slow  # a compile: about 20 s on 2 cores
def test_trainer_steps_and_evaluates_on_a_cached_mixture(tmp_path):
  import jax
  from bigflax import train
  from conftest import tiny_config
  corpus = mixture_corpus(tmp_path, prepare=True)
  config = tiny_config("")
  config.data.path, config.data.tokenizer = "", "byte"
  config.data.mixture = ";".join(f"{n}={tmp_path / (n + '_cache')}:{w}"
                                 for n, w in (("web", 0.7), ("code", 0.2), ("books", 0.1)))
  data.check_config(config.data)
  trainer = train.Trainer(config, devices=jax.devices()[:1])
  assert trainer.corpus.description.startswith("mixture of web 0.7: token cache")
  trainer.step(0)
  result = trainer.evaluate()
  assert 4.0 < result["eval_loss"] < 7.0  # near log(256) at init
  del corpus


def test_gs_without_gcsfs_says_what_to_install(monkeypatch):
  monkeypatch.delitem(sys.modules["fsspec.registry"]._registry, "gs", raising=False)
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # not installed
  with pytest.raises(DataError, match=r"gs://b/web/\*.parquet needs the fsspec backend for "
                                      r"gs://.*pip install gcsfs") as e:
    data.load_corpus(data_config(source="parquet", path="gs://b/web/*.parquet"), 16)
  one_line(e)


def test_big_raw_split_suggests_the_cache(parquet_dir, monkeypatch):
  c = data_config(source="parquet", path=str(parquet_dir / "*.parquet"))
  byte = data.make_tokenizer(c)
  kept = pipeline.PackedRows(data.load_corpus(c, 16).train, byte, seed=0, split=data.TRAIN,
                             block_size=16)
  assert not kept.notices
  monkeypatch.setattr(pipeline, "KEEP_TOKENS", 1000)
  reread = pipeline.PackedRows(data.load_corpus(c, 16).train, byte, seed=0, split=data.TRAIN,
                               block_size=16)
  assert any("tools/prepare_data.py" in notice for notice in reread.notices)
  for key, value in kept.rows(np.arange(40)).items():  # the same rows, however read
    np.testing.assert_array_equal(value, reread.rows(np.arange(40))[key])


def test_overwrite_rebuilds_with_the_new_tokenizer_and_keeps_other_files(parquet_dir, tmp_path):
  out = tmp_path / "cache"
  path = str(parquet_dir / "*.parquet")
  cache.prepare(data_config(path=path), str(out))
  (out / "notes.json").write_text("{}")
  charset = CharTokenizer.charset_of("".join(documents_of(0)) + "0123456789.")
  manifest = cache.prepare(data_config(path=path, tokenizer="char", charset=charset), str(out),
                           overwrite=True)
  assert manifest["tokenizer"]["name"] == "char" and (out / "notes.json").exists()
  corpus = data.load_corpus(data_config(source="cache", path=str(out), tokenizer="char"), 16)
  assert corpus.tokenizer.decode(corpus.val.tokens(0)) == documents_of(3)[0]


def host_rows(host: int, hosts: int, batch_size: int) -> slice:
  """The rows of a global batch that host `host` of `hosts` holds (sharding.process_rows)."""
  width = batch_size // hosts
  return slice(host * width, (host + 1) * width)


@pytest.fixture
def opened(monkeypatch):
  """The shard URLs opened (every shard read goes through shards._open), in order."""
  urls = []
  real = shards._open

  def recording(url):
    urls.append(url)
    return real(url)

  monkeypatch.setattr(shards, "_open", recording)
  return urls


def jsonl_shards(directory, count: int, tag: str = "doc") -> str:
  directory.mkdir(exist_ok=True)
  for s in range(count):
    (directory / f"s{s:02d}.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(
        documents_of(s, tag=tag))))
  return str(directory / "*.jsonl.gz")


def shards_in(batch: dict, tag: str = "doc") -> set[int]:
  """The shard numbers of the documents whose text the batch's rows hold (byte tokenizer)."""
  text = b"|".join(bytes(row.astype(np.uint8)) for row in batch["targets"])
  return {int(m) for m in re.findall(rb"%s (\d+)\." % tag.encode(), text)}


@pytest.mark.parametrize("hosts", [2, 3])
def test_each_host_reads_only_its_own_train_shards(tmp_path, opened, hosts):
  path = jsonl_shards(tmp_path / "web", 7)  # 6 train shards, the last validates
  urls = shards.expand(path)
  train, val = urls[:6], urls[6]
  c, config, batch_size = data_config(source="jsonl", path=path), base(), 12
  config.model.block_size = 32
  owned = []
  for host in range(hosts):  # each host in turn, as its process would
    opened.clear()
    corpus = data.load_corpus(c, 32)
    assert set(opened) == {val}  # loading counts the val documents alone
    rows = host_rows(host, hosts, batch_size)
    batches = data.make_batches(corpus, config, data.TRAIN, batch_size, rows)
    local = [batches.batch(k) for k in range(6)]
    own = set(opened) - {val}
    assert own == set(train[host::hosts])
    owned.append(own)
    assert f"this is host {host} of {hosts}, reading its {6 // hosts} train" in (
        batches.description)
    seen = set()
    for batch in local:
      assert batch["inputs"].shape == (batch_size // hosts, 32)
      assert batch["loss_mask"].sum() > 0.9 * batch["loss_mask"].size  # full rows
      seen |= shards_in(batch)
    assert seen and seen <= set(range(host, 6, hosts))  # its own documents alone
    # The eval is the whole val split's global batches: this host's rows of them.
    eval_set, info = data.eval_batches(corpus, config, batch_size, 2, rows)
    assert eval_set[0]["inputs"].shape == (batch_size // hosts, 32) and info.split_documents == 20
    assert set(opened) - {val} == own
    # Resuming at step 5 of a fresh process: the same batch, read from the step alone.
    again = data.make_batches(data.load_corpus(c, 32), config, data.TRAIN, batch_size, rows)
    again.set_state({"step": 5})
    for key, value in again.batch(5).items():
      np.testing.assert_array_equal(value, local[5][key], err_msg=key)
  assert set.union(*owned) == set(train)
  assert sum(map(len, owned)) == len(train)  # disjoint


def test_one_host_makes_the_global_batch_as_before(tmp_path, opened):
  path = jsonl_shards(tmp_path / "web", 4)
  c = data_config(source="jsonl", path=path)
  whole, one = train_batches(c, batch_size=8), train_batches(c, slice(0, 8), batch_size=8)
  assert "host" not in whole.description
  for key, value in whole.batch(3).items():
    np.testing.assert_array_equal(value, one.batch(3)[key])
  assert set(opened) == set(shards.expand(path))  # every train shard, and the val shard


def test_fewer_train_shards_than_hosts(tmp_path, opened):
  c = data_config(source="jsonl", path=jsonl_shards(tmp_path / "web", 4))
  with pytest.raises(DataError, match=r"^config.data.path='.*' has 3 train shard\(s\) for 4 "
                                      r"hosts, so 1 host\(s\) would have none to read; give at "
                                      "least 4 train shards") as e:
    train_batches(c, host_rows(2, 4, 8), batch_size=8)
  one_line(e)
  assert all(url.endswith("s03.jsonl.gz") for url in opened)  # no train shard was read


def test_mixture_hosts_mix_their_own_shares_of_every_source(tmp_path, opened):
  web, code = jsonl_shards(tmp_path / "web", 4), jsonl_shards(tmp_path / "code", 4, tag="code")
  c = data_config(mixture=f"web={web}:0.5;code={code}:0.5")
  config = base()
  config.model.block_size = 32
  for host in range(3):
    opened.clear()
    corpus = data.load_corpus(c, 32)
    batches = data.make_batches(corpus, config, data.TRAIN, 6, host_rows(host, 3, 6))
    batch = batches.batch(4)
    assert batch["inputs"].shape == (2, 32)
    read = {(u.split("/")[-2], u.split("/")[-1]) for u in opened} - {
        ("web", "s03.jsonl.gz"), ("code", "s03.jsonl.gz")}  # the val shards
    assert read == {("web", f"s{host:02d}.jsonl.gz"), ("code", f"s{host:02d}.jsonl.gz")}
    mixed = set()
    for k in range(10):
      mixed |= shards_in(batches.batch(k)) | {s + 10 for s in shards_in(batches.batch(k), "code")}
    assert mixed == {host, host + 10}  # both sources, this host's shard of each
  with pytest.raises(DataError, match=r"^config.data.mixture source 'web'='.*' has 3 train "
                                      r"shard\(s\) for 6 hosts") as e:
    data.make_batches(data.load_corpus(c, 32), config, data.TRAIN, 6, host_rows(0, 6, 6))
  one_line(e)


def test_windows_batching_refuses_raw_shards_split_among_hosts(tmp_path, opened):
  c = data_config(source="jsonl", path=jsonl_shards(tmp_path / "web", 3), batching="windows")
  with pytest.raises(DataError, match=r"^config.data.batching=windows joins the train split .* "
                                      "use config.data.batching=packed") as e:
    train_batches(c, host_rows(1, 2, 8), batch_size=8)
  one_line(e)
  assert all(url.endswith("s02.jsonl.gz") for url in opened)
  assert train_batches(c, batch_size=8).batch(0)["inputs"].shape == (8, 16)  # one host: as before


RECORDING = """
import sys
from bigflax import cli
from bigflax.data import shards
log, real = open(sys.argv[1], "w"), shards._open

def recording(url):
  log.write(url + "\\n")
  log.flush()
  return real(url)

shards._open = recording
cli.main(sys.argv[2:])
"""


@pytest.mark.slow  # 2 processes compile a tiny model: 41-46 CPU-s, 55-82 s on the loaded machine
def test_two_processes_train_each_on_its_own_jsonl_shards(tmp_path):
  path = jsonl_shards(tmp_path / "web", 5)  # 4 train shards, the last validates
  urls = shards.expand(path)
  address = f"127.0.0.1:{portpicker.pick_unused_port()}"
  args = ["train", f"--workdir={tmp_path / 'run'}", "--config.data.source=jsonl",
          f"--config.data.path={path}", "--config.data.tokenizer=byte", "--config.steps=3",
          "--config.log_every=1", "--config.eval_every=3", "--config.eval_batches=1",
          "--config.batch_size=8", "--config.model.block_size=32", "--config.model.num_layers=1",
          "--config.model.num_heads=2", "--config.model.embed_dim=32", "--config.mesh.data=8",
          "--config.optimizer.warmup_steps=1", "--config.sample.max_new_tokens=2",
          "--config.sample.prompt=doc", f"--config.distributed.coordinator_address={address}",
          "--config.distributed.num_processes=2", "--config.distributed.initialization_timeout=60"]
  workers = [subprocess.Popen(
      [sys.executable, "-c", RECORDING, str(tmp_path / f"opened{i}.txt"), *args,
       f"--config.distributed.process_id={i}"], cwd=REPO, env=bigflax_env(4),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = [w.communicate(timeout=240) for w in workers]
  for worker, (_, err) in zip(workers, results):
    assert worker.returncode == 0, err[-3000:]
  for host in range(2):
    opened = set((tmp_path / f"opened{host}.txt").read_text().split())
    assert opened == set(urls[host:4:2]) | {urls[4]}  # its train shards and the val shard
  assert "batches: packed train rows" in results[0][0]
  assert "this is host 0 of 2, reading its 2 train shard(s) alone" in results[0][0]
  records = read_metrics(tmp_path / "run")
  assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert 4.0 < next(r["eval_loss"] for r in records if "eval_loss" in r) < 7.0
