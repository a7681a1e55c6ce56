"""Trains a sentencepiece tokenizer (BPE or unigram) on the train split of any bigflax source.

    python tools/train_tokenizer.py --vocab_size 8000 --output stdlib.model
    python tools/train_tokenizer.py --path 'books/*.txt' --documents paragraph \
        --model_type unigram --vocab_size 16000 --output books.model
    python tools/train_tokenizer.py --source tfds:lm1b --data_dir gs://BUCKET/tfds \
        --max_documents 1000000 --output lm1b.model

then train with --config.data.tokenizer=sentencepiece --config.data.tokenizer_model=FILE (the
model's vocabulary follows, rounded up to a multiple of 128). The model round-trips any text
exactly; see bigflax.data.tokenizers.train_sentencepiece for its settings and special ids.
The model is written whole or not at all: training writes a temporary file beside --output and
renames it at the end, and an existing --output is only replaced with --overwrite.
"""

import argparse
import pathlib
import sys
import time

from bigflax.config import base
from bigflax.data import reader, tokenizers
from bigflax.errors import DataError, UserError

DESCRIPTION = (
    "Trains a sentencepiece tokenizer (BPE or unigram) on the train split of a bigflax data "
    "source and writes it to --output. The model is written whole or not at all, and an "
    "existing --output is replaced only with --overwrite. To train a model with it, give "
    "bigflax train --config.data.tokenizer=sentencepiece --config.data.tokenizer_model=FILE.")


def check_output(output: str, overwrite: bool) -> None:
  """Fails before the (possibly long) training when --output cannot be written as asked."""
  path = pathlib.Path(output).expanduser()
  if path.is_dir():
    raise DataError(f"--output {output} is a directory; give the path of a .model file")
  if path.exists() and not overwrite:
    raise DataError(f"--output {output} exists; give --overwrite to replace it, or another "
                    "--output")
  if not path.parent.is_dir():
    raise DataError(f"the directory of --output {output} ({path.parent}) does not exist; create "
                    "it first or give another --output")


def train(args) -> str:
  if args.vocab_size < 1:
    raise DataError(f"--vocab_size {args.vocab_size} must be positive; give e.g. --vocab_size 8000")
  if args.max_documents < 0:
    raise DataError(f"--max_documents {args.max_documents} must be 0 (every train document) or "
                    "positive")
  if not 0 < args.character_coverage <= 1:
    raise DataError(f"--character_coverage {args.character_coverage} must be in (0, 1]; "
                    "sentencepiece's default is 0.9995")
  check_output(args.output, args.overwrite)
  data_config = base().data
  for key in ("source", "path", "documents", "data_dir", "text_feature"):
    data_config[key] = getattr(args, key)
  train_split, _, description = reader.open_splits(data_config)
  count = min(len(train_split), args.max_documents or len(train_split))
  if not count:
    raise DataError(f"the train split of {description} has no documents; give more text")
  start = time.perf_counter()
  tokenizer = tokenizers.train_sentencepiece(
      (train_split[i] for i in range(count)), args.output, vocab_size=args.vocab_size,
      model_type=args.model_type, character_coverage=args.character_coverage,
      overwrite=args.overwrite)
  sample = b"".join(train_split[i] for i in range(min(count, 100)))
  ids = tokenizer.encode_bytes(sample, "sample")
  return (f"{args.output}: {args.model_type}, {tokenizer.vocab_size} pieces, trained on "
          f"{count:,} document{'s' if count != 1 else ''} of {description} in "
          f"{time.perf_counter() - start:.1f}s; "
          f"{len(sample) / max(len(ids), 1):.2f} bytes per token on the first 100 of them")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=DESCRIPTION)
  parser.add_argument("--source", default="", help="The data source, as config.data.source "
                      "(default: stdlib, or text when --path is given).")
  parser.add_argument("--path", default="", help="The local text corpus (a file, a directory or "
                      "a glob), as config.data.path.")
  parser.add_argument("--documents", default="file", choices=["file", "paragraph"],
                      help="What one document of a local corpus is, as config.data.documents.")
  parser.add_argument("--data_dir", default="", help="Where TFDS datasets are read and built, as "
                      "config.data.data_dir.")
  parser.add_argument("--text_feature", default="text", help="The feature that holds the text of "
                      "a tfds: source.")
  parser.add_argument("--model_type", default="bpe", choices=["bpe", "unigram"],
                      help="The sentencepiece algorithm.")
  parser.add_argument("--vocab_size", type=int, default=8000, help="The number of pieces, "
                      f"including {tokenizers.FIXED_PIECES} fixed ones (special, byte and newline "
                      "pieces).")
  parser.add_argument("--character_coverage", type=float, default=0.9995,
                      help="The fraction of the text whose characters get pieces of their own; "
                      "rarer characters are spelled in bytes.")
  parser.add_argument("--max_documents", type=int, default=0, help="How many train documents to "
                      "read; 0 reads every one.")
  parser.add_argument("--output", required=True, help="The .model file to write.")
  parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
  args = parser.parse_args(argv)
  try:
    print(train(args))
  except UserError as e:  # bad input: one line, no traceback
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(1) from None


if __name__ == "__main__":
  main()
