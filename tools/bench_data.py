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
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from bigflax import data
from bigflax.config import get_config
from bigflax.data import pipeline, reader, tokenizers


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=100, help="per pipeline measurement")
  parser.add_argument("--steps", type=int, default=10, help="per train-step measurement")
  parser.add_argument("--tokenizer_model", default="")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--no_rates", action="store_true", help="the packing report alone")
  args = parser.parse_args()
  packing_report(args.batches)
  if not args.no_rates:
    rates_report(args)


if __name__ == "__main__":
  main()
