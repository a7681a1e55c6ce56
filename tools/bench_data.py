"""How fast the data pipeline makes batches, next to how fast the train step eats them.

    python tools/bench_data.py [--rounds 5] [--batches 100] [--tokenizer_model FILE]

Tokenize + pack + batch of the default experiment's data (the standard library, packed rows of
batch_size × block_size) with the byte tokenizer and a sentencepiece BPE model (trained here on
the train split unless --tokenizer_model is given), in the foreground (no prefetch), against the
tokens/s of the default experiment's train step fed by the real pipeline (prefetch on), which
bigflax.train.Trainer runs. Rounds alternate between the three; each figure is the median.
The target is a pipeline ≥ 10× the step, so input never holds the step up.
"""

import argparse
import os
import statistics
import tempfile
import time

import jax

from bigflax import data
from bigflax.config import get_config
from bigflax.data import reader, tokenizers
from bigflax.train import Trainer


def pipeline_rate(corpus, config, batches: int) -> float:
  """Tokens/s of a fresh pipeline (nothing tokenized yet) making `batches` global batches."""
  stream = data.make_batches(corpus, config, data.TRAIN, config.batch_size)
  begin = time.perf_counter()
  for i in range(batches):
    stream.batch(i)
  return batches * config.batch_size * config.model.block_size / (time.perf_counter() - begin)


def step_rate(trainer, steps: int, start: int) -> float:
  begin = time.perf_counter()
  for i in range(start, start + steps):
    metrics = trainer.step(i)
  jax.block_until_ready(metrics)
  config = trainer.config
  return steps * config.batch_size * config.model.block_size / (time.perf_counter() - begin)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--batches", type=int, default=100, help="per pipeline measurement")
  parser.add_argument("--steps", type=int, default=10, help="per train-step measurement")
  parser.add_argument("--tokenizer_model", default="")
  parser.add_argument("--vocab_size", type=int, default=8000)
  args = parser.parse_args()

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
    pipeline_config[name] = (data.load_corpus(c.data, c.model.block_size), c)

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


if __name__ == "__main__":
  main()
