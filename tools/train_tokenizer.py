"""Trains a sentencepiece tokenizer (BPE or unigram) on the train split of any bigflax source.

    python tools/train_tokenizer.py --vocab_size 8000 --output stdlib.model
    python tools/train_tokenizer.py --path 'books/*.txt' --documents paragraph \
        --model_type unigram --vocab_size 16000 --output books.model
    python tools/train_tokenizer.py --source tfds:lm1b --data_dir gs://BUCKET/tfds \
        --max_documents 1000000 --output lm1b.model

then train with --config.data.tokenizer=sentencepiece --config.data.tokenizer_model=FILE (the
model's vocabulary follows, rounded up to a multiple of 128). The model round-trips any text
exactly; see bigflax.data.tokenizers.train_sentencepiece for its settings and special ids.
"""

import argparse
import time

from bigflax.config import base
from bigflax.data import reader, tokenizers


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--source", default="", help="as config.data.source (default: stdlib, or "
                      "text when --path is given)")
  parser.add_argument("--path", default="", help="as config.data.path")
  parser.add_argument("--documents", default="file", choices=["file", "paragraph"])
  parser.add_argument("--data_dir", default="", help="as config.data.data_dir")
  parser.add_argument("--text_feature", default="text", help="tfds: the feature with the text")
  parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"])
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--max_documents", type=int, default=0, help="0 = every train document")
  parser.add_argument("--output", required=True, help="the .model file to write")
  args = parser.parse_args()

  data_config = base().data
  for key in ("source", "path", "documents", "data_dir", "text_feature"):
    data_config[key] = getattr(args, key)
  train, _, description = reader.open_splits(data_config)
  count = min(len(train), args.max_documents or len(train))
  start = time.perf_counter()
  tokenizer = tokenizers.train_sentencepiece(
      (train[i] for i in range(count)), args.output, vocab_size=args.vocab_size,
      model_type=args.model_type)
  sample = b"".join(train[i] for i in range(min(count, 100)))
  ids = tokenizer.encode_bytes(sample, "sample")
  print(f"{args.output}: {args.model_type}, {tokenizer.vocab_size} pieces, trained on {count} "
        f"documents of {description} in {time.perf_counter() - start:.1f}s; "
        f"{len(sample) / max(len(ids), 1):.2f} bytes per token on the first 100 of them")


if __name__ == "__main__":
  main()
