"""What the packed pipeline's rows hold, and how fast it makes them next to the train step.

    python tools/bench_data.py [--rounds 5] [--batches 100] [--tokenizer_model FILE] [--no_rates]

Packing (no model needed): of the default experiment's data (the standard library, byte
tokenizer, batch_size rows of block_size + 1 tokens) and of web-like synthetic documents
(log-normal lengths, median 1,000 tokens, rows of 2,048), the padding fraction of an epoch's rows
(padded tokens — segment id 0 — over all tokens, measured row by row), how many documents a
train batch spans, and how many val documents the default eval and the whole-split eval cover.

Rates: tokenize + pack + batch with the byte tokenizer and a sentencepiece BPE model (trained here
on the train split unless --tokenizer_model is given), in the foreground (no prefetch), against the
tokens/s of the default experiment's train step fed by the real pipeline (prefetch on), which
bigflax.train.Trainer runs. Rounds alternate between the three; each figure is the median. The
target is a pipeline ≥ 10× the step, so input never holds the step up.

    python tools/bench_data.py --web [--web_shards 8] [--web_mb 4] [--tokenizer_model FILE]

Web-scale sources (`--web`, this report alone): synthetic web-like parquet shards (Zipf words,
log-normal document lengths) in a temporary directory, tokens/s on one host, one core each:
raw parquet → tokenize → pack (reading and tokenizing every shard, as a raw source's host does
with its share of the shards when its pipeline is built, then packed batches of 64 rows of 2,048), and cache → pack
(tools/prepare_data.py's token cache, memory-mapped, the same batches), for the byte tokenizer
and a sentencepiece BPE model (8,000 pieces trained here unless --tokenizer_model). Targets: the
cache path ≥ 1.5 M tokens/s; and how many cores the raw path would need for 1.2 M tokens/s
(tokenizing is per shard, so it parallelises across cores as prepare_data.py's --workers does).
Each figure is given by the wall clock and per CPU-second of the process: on a shared machine the
second is what one core gives, and it sizes the cores needed.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from bigflax import data
from bigflax.config import get_config
from bigflax.data import cache, pipeline, reader, shards, tokenizers


def measured_padding(packed: pipeline.PackedRows) -> float:
  """Padded tokens / all tokens of epoch 0's rows, [rows, block_size + 1], counted."""
  layout, _ = packed.epoch(0)
  padded = sum(int((layout.segments(rows)[2] == 0).sum())
               for rows in np.array_split(np.arange(layout.num_rows), -(-layout.num_rows // 8192)))
  return padded / (layout.num_rows * layout.length)


def packing_report(batches: int) -> None:
  config = get_config()
  corpus = data.load_corpus(config.data, config.model.block_size)
  iterator = pipeline.PackedIterator(
      corpus.documents(data.TRAIN), corpus.tokenizer, seed=config.seed, split=data.TRAIN,
      batch_size=config.batch_size, block_size=config.model.block_size, rows=slice(None))
  spans = [len(iterator.packed.coverage(iterator.indices(k))[0]) for k in range(batches)]
  print(f"default experiment ({corpus.description}):")
  print(f"  {iterator.description}")
  print(f"  padding {measured_padding(iterator.packed):.4%} of an epoch's row tokens")
  print(f"  documents a train batch of {config.batch_size} rows spans, over {batches} batches: "
        f"min {min(spans)}, median {statistics.median(spans):g}, max {max(spans)}")
  for num_batches in (config.eval_batches, 0):
    _, info = data.eval_batches(corpus, config, config.batch_size, num_batches)
    print(f"  eval_batches={num_batches}: {info.num_batches} batches, {info.documents} of "
          f"{info.split_documents} val documents, {info.predictions:,} of "
          f"{info.split_predictions:,} predictions")

  lengths = np.maximum(np.random.default_rng(0).lognormal(np.log(1000), 1.0, 5000), 1)
  documents = [bytes(int(n)) for n in lengths]  # only the lengths matter here
  packed = pipeline.PackedRows(documents, tokenizers.ByteTokenizer(), seed=0, split=data.TRAIN,
                               block_size=2047)
  print(f"web-like synthetic: {len(documents):,} documents, log-normal lengths (median "
        f"{np.median(lengths):,.0f}, mean {lengths.mean():,.0f} tokens), rows of 2,048:")
  print(f"  padding {measured_padding(packed):.4%} of an epoch's row tokens")


def pipeline_rate(corpus, config, batches: int) -> float:
  """Tokens/s of a fresh pipeline making `batches` global batches; the split's index (document
  lengths, and the tokens a non-byte tokenizer keeps) is built once per run, before the clock."""
  stream = data.make_batches(corpus, config, data.TRAIN, config.batch_size)
  begin = time.perf_counter()
  for i in range(batches):
    stream.batch(i)
  return batches * config.batch_size * config.model.block_size / (time.perf_counter() - begin)


def step_rate(trainer, steps: int, start: int) -> float:
  import jax
  begin = time.perf_counter()
  for i in range(start, start + steps):
    metrics = trainer.step(i)
  jax.block_until_ready(metrics)
  config = trainer.config
  return steps * config.batch_size * config.model.block_size / (time.perf_counter() - begin)


def rates_report(args) -> None:
  import jax
  from bigflax.train import Trainer
  config = get_config()
  trainer = Trainer(config)
  trainer.step(0)  # compile
  model_path = args.tokenizer_model
  if not model_path:
    model_path = os.path.join(tempfile.mkdtemp(), "stdlib.model")
    train, _, _ = reader.open_splits(config.data)
    tokenizers.train_sentencepiece((train[i] for i in range(len(train))), model_path,
                                   vocab_size=args.vocab_size, model_type="bpe")
  pipeline_config = {}
  for name, overrides in (("byte", {}), ("sentencepiece", {"tokenizer": "sentencepiece",
                                                           "tokenizer_model": model_path})):
    c = get_config()
    c.data.update(overrides, prefetch=0)
    corpus = data.load_corpus(c.data, c.model.block_size)
    begin = time.perf_counter()
    pipeline.split_index(corpus.documents(data.TRAIN), corpus.tokenizer, "a train")
    print(f"  ({name}: the train split's index — document lengths — in "
          f"{time.perf_counter() - begin:.1f} s, once per run)")
    pipeline_config[name] = (corpus, c)

  rates = {"step": [], "byte": [], "sentencepiece": []}
  step = 1
  for _ in range(args.rounds):
    rates["step"].append(step_rate(trainer, args.steps, step))
    step += args.steps
    for name, (corpus, c) in pipeline_config.items():
      rates[name].append(pipeline_rate(corpus, c, args.batches))
  median = {name: statistics.median(values) for name, values in rates.items()}
  print(f"default experiment: batch {config.batch_size} × block {config.model.block_size}, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), median of {args.rounds} "
        "alternating rounds")
  print(f"  train step consumes        {median['step']:>12,.0f} tokens/s")
  for name in ("byte", "sentencepiece"):
    print(f"  pipeline ({name:13s})   {median[name]:>12,.0f} tokens/s  = "
          f"{median[name] / median['step']:.1f}× the step")


def web_shards(directory: str, shards: int, megabytes: float) -> int:
  """Writes `shards` parquet shards of about `megabytes` MB of web-like text each; returns the
  bytes written (of text)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  rng = np.random.default_rng(0)
  letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
  words = np.array(["".join(rng.choice(letters, rng.integers(1, 10))) for _ in range(20000)])
  frequency = 1 / np.arange(1, len(words) + 1)
  frequency /= frequency.sum()
  total = 0
  for s in range(shards):
    documents, size = [], 0
    while size < megabytes * 1e6:
      n = max(int(rng.lognormal(np.log(180), 1.0)), 5)  # words; median ≈ 1,000 bytes
      chosen = rng.choice(words, n, p=frequency)
      lines = [" ".join(chosen[i:i + 12]) for i in range(0, n, 12)]
      documents.append("\n".join(lines) + "\n")
      size += len(documents[-1])
    pq.write_table(pa.table({"text": documents}), os.path.join(directory, f"web-{s:05d}.parquet"))
    total += size
  return total


class Clock:
  """Wall and CPU (this process's) seconds since it started: tokens per CPU-second is what a
  core gives when others share the machine, and what sizes the cores needed."""

  def __init__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()

  def rates(self, tokens: float) -> tuple[float, float]:
    return (tokens / (time.perf_counter() - self.wall),
            tokens / max(time.process_time() - self.cpu, 1e-9))


def packed_rate(corpus, config, batches: int) -> tuple[float, float]:
  stream = data.make_batches(corpus, config, data.TRAIN, config.batch_size)
  stream.batch(0)
  clock = Clock()
  for k in range(1, batches + 1):
    stream.batch(k)
  return clock.rates(batches * config.batch_size * config.model.block_size)


def combined(*rates: float) -> float:
  """The rate of stages run one after another on one core."""
  return 1 / sum(1 / r for r in rates)


def web_report(args) -> None:
  directory = tempfile.mkdtemp(prefix="bigflax-web-")
  text = web_shards(directory, args.web_shards, args.web_mb)
  model_path = args.tokenizer_model
  if not model_path:
    model_path = os.path.join(directory, "web.model")
    sample = shards.read_shard(os.path.join(directory, "web-00000.parquet"), "text")
    tokenizers.train_sentencepiece(sample, model_path, vocab_size=8000, model_type="bpe",
                                   max_sentences=200_000)
  print(f"web-like parquet: {args.web_shards} shards, {text / 1e6:,.1f} MB of text "
        f"({os.cpu_count()} cores here; one used per figure)")
  print("  tokens/s: wall clock | per CPU-second of this process (what one core gives)")
  needed = {}
  for name, overrides in (("byte", {}), ("sentencepiece", {"tokenizer": "sentencepiece",
                                                           "tokenizer_model": model_path})):
    config = get_config()
    config.batch_size, config.model.block_size = 64, 2047
    config.data.update(source="parquet", path=os.path.join(directory, "*.parquet"), val_shards=1,
                       prefetch=0, **overrides)
    # raw: read every shard and tokenize every document (the index a raw source builds)…
    clock = Clock()
    corpus = data.load_corpus(config.data, config.model.block_size)
    documents = corpus.documents(data.TRAIN)
    tokens = raw_bytes = 0
    for i in range(len(documents)):
      raw_bytes += len(documents[i])
      tokens += len(corpus.tokenizer.encode_document(documents[i], "web"))
    tokenize = clock.rates(tokens)
    pack_raw = packed_rate(corpus, config, args.batches)  # …then packing what it kept
    raw = [combined(t, p) for t, p in zip(tokenize, pack_raw)]
    cache_dir = os.path.join(directory, f"cache-{name}")
    clock = Clock()
    manifest = cache.prepare(config.data, cache_dir, workers=1)
    prepare_rate = clock.rates(sum(s["tokens"] for s in manifest["shards"]))
    cached_config = get_config()
    cached_config.batch_size, cached_config.model.block_size = 64, 2047
    cached_config.data.update(source="cache", path=cache_dir, prefetch=0, **overrides)
    cached = data.load_corpus(cached_config.data, cached_config.model.block_size)
    pack_cache = packed_rate(cached, cached_config, args.batches)
    needed[name] = raw[1]
    line = lambda rates: f"{rates[0]:>12,.0f} | {rates[1]:>12,.0f}"
    print(f"  {name}: {tokens:,} train tokens ({raw_bytes / tokens:.2f} bytes a token)")
    print(f"    raw parquet → tokenize         {line(tokenize)}")
    print(f"    raw parquet → tokenize → pack  {line(raw)}  (packing alone: {line(pack_raw)})")
    print(f"    prepare_data (1 worker)        {line(prepare_rate)}  (tokenize + write, once)")
    print(f"    cache → pack                   {line(pack_cache)}  "
          f"({'meets' if pack_cache[0] >= 1.5e6 else 'MISSES'} the 1.5 M target)")
  for name, raw in needed.items():
    print(f"  raw path at 1.2 M tokens/s needs ≈ {1.2e6 / raw:.1f} cores ({name}; "
          f"{int(np.ceil(1.2e6 / raw))} whole cores; tokenizing is per shard, so it spreads)")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=100, help="per pipeline measurement")
  parser.add_argument("--steps", type=int, default=10, help="per train-step measurement")
  parser.add_argument("--tokenizer_model", default="")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--no_rates", action="store_true", help="the packing report alone")
  parser.add_argument("--web", action="store_true", help="the web-scale sources report alone")
  parser.add_argument("--web_shards", type=int, default=8)
  parser.add_argument("--web_mb", type=float, default=4, help="MB of text per shard")
  args = parser.parse_args()
  if args.web:
    web_report(args)
    return
  packing_report(args.batches)
  if not args.no_rates:
    rates_report(args)


if __name__ == "__main__":
  main()
