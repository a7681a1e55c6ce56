"""Tokenize a sharded source once into a token cache that training reads without tokenizing.

    python tools/prepare_data.py --path 'gs://bucket/web/*.parquet' --output /data/web_cache \\
        [--source parquet|jsonl] [--text_feature text] [--tokenizer byte|char|sentencepiece] \\
        [--tokenizer_model FILE] [--charset CHARS] [--workers N] [--overwrite]

then train with --config.data.source=cache --config.data.path=/data/web_cache (the same
--config.data.tokenizer / tokenizer_model; a cache built with another tokenizer is refused).
One cache shard per source shard, each written atomically: a killed run leaves no manifest.json
(the cache reads as incomplete) and rerunning the same command resumes it. The format is in
bigflax/data/cache.py.
"""

import argparse
import os
import sys

from bigflax.config import get_config
from bigflax.data import cache
from bigflax.errors import UserError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--path", required=True, help="a glob of parquet / JSON-lines shards")
  parser.add_argument("--output", required=True, help="the cache directory")
  parser.add_argument("--source", default="", choices=["", "parquet", "jsonl"],
                      help="the shards' format; default: by their file names")
  parser.add_argument("--text_feature", default="text")
  parser.add_argument("--tokenizer", default="byte", choices=["byte", "char", "sentencepiece"])
  parser.add_argument("--tokenizer_model", default="")
  parser.add_argument("--charset", default="")
  parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="shards tokenized in parallel (processes)")
  parser.add_argument("--overwrite", action="store_true",
                      help="rebuild a cache made with another tokenizer")
  args = parser.parse_args(argv)
  c = get_config().data
  c.update(path=args.path, source=args.source, text_feature=args.text_feature,
           tokenizer=args.tokenizer, tokenizer_model=args.tokenizer_model, charset=args.charset)
  try:
    manifest = cache.prepare(c, args.output, workers=args.workers, overwrite=args.overwrite,
                             log=print)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  tokens = sum(s["tokens"] for s in manifest["shards"])
  documents = sum(s["documents"] for s in manifest["shards"])
  print(f"{args.output}: {len(manifest['shards'])} shards, {documents:,} documents, {tokens:,} "
        f"tokens ({manifest['tokenizer']['name']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
