"""One reader for every source: a TFDS dataset in the array_record format, read by random access.

`config.data.source` names the source (registry `SOURCES`):

  ""                  `text` when config.data.path is set, else `stdlib`
  stdlib              the Python standard library's .py files (built into a local TFDS dataset)
  text                the local corpus at config.data.path (built into a local TFDS dataset)
  parquet, jsonl      shards matched by the glob config.data.path, local or gs://… (`shards`)
  cache               a token cache directory config.data.path (tools/prepare_data.py; `cache`)
  sft                 fine-tuning examples, prompt/completion or messages, in the JSON-lines
                      file(s) config.data.path; the loss counts the answers only (`sft`)
  tfds:NAME           a prepared TFDS dataset, NAME as TFDS spells it: `lm1b`, `c4/en:3.1.0`;
                      splits config.data.train_split / val_split, documents in the feature
                      config.data.text_feature, files under config.data.data_dir

Nothing here needs TensorFlow: `tfds` reads array_record files with `data_source`.
"""

import difflib
import importlib

import tensorflow_datasets as tfds

from bigflax.data import cache, sft, shards, sources, text_builder
from bigflax.errors import DataError, first_line


TEXT_CATEGORIES = ("text", "summarization", "translate", "question_answering",
                   "text_simplification")


class TextSource:
  """A split's documents as bytes, by index (grain's random-access data source protocol)."""

  def __init__(self, records, feature: str):
    self._records, self._feature = records, feature

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> bytes:
    return self._records[index][self._feature]

  def in_order(self) -> list[bytes]:
    """Every document, in corpus order where the records carry it (`index`), else as stored."""
    records = [self._records[i] for i in range(len(self._records))]
    if records and "index" in records[0]:
      records.sort(key=lambda r: r["index"])
    return [r[self._feature] for r in records]


def _local(builder, what: str, how: str) -> tuple[TextSource, TextSource, str]:
  """The splits of a built local dataset; its description says what and how, and how many files
  were skipped as not UTF-8 text."""
  with text_builder.quiet():
    train, val = (TextSource(builder.as_data_source(split), "text")
                  for split in (text_builder.TRAIN_SPLIT, text_builder.VAL_SPLIT))
  notes = "; ".join(filter(None, (how, text_builder.skipped_note(builder))))
  return train, val, f"{what} ({notes}) (TFDS dataset {builder.data_dir})"


def stdlib(data_config) -> tuple[TextSource, TextSource, str]:
  fraction = data_config.val_fraction
  builder = text_builder.prepare(text_builder.stdlib_spec(fraction),
                                 lambda: (*sources.stdlib_split(fraction), []),
                                 data_config.data_dir)
  return _local(builder, "the Python standard library's .py files", "split by file")


def text(data_config) -> tuple[TextSource, TextSource, str]:
  c = data_config
  if not c.path:
    raise DataError("config.data.source='text' needs config.data.path: a text file, a directory "
                    "or a glob")
  builder = text_builder.prepare(text_builder.text_spec(c.path, c.documents, c.val_fraction),
                                 lambda: sources.text_split(c.path, c.documents, c.val_fraction),
                                 c.data_dir)
  return _local(builder, c.path, f"one document per {c.documents}")


def _catalog_builder(name: str, data_dir: str):
  field = f"config.data.source='tfds:{name}'"
  # Older catalog datasets (c4, wiki40b, …) are registered by importing their category's module,
  # which `import tensorflow_datasets` defers; text lives in these.
  for category in TEXT_CATEGORIES:
    importlib.import_module(f"tensorflow_datasets.{category}")
  try:
    return tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    base = name.split("/")[0].split(":")[0]
    catalog_names = tfds.list_builders(with_community_datasets=False)  # offline
    close = difflib.get_close_matches(base, catalog_names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise DataError(f"{field}: TFDS has no dataset named {base!r}{hint}; see "
                    "tfds.list_builders() for the catalog") from None
  except (ValueError, AssertionError) as e:  # an unknown config or version of a known dataset
    raise DataError(f"{field}: {first_line(e)}") from None


def catalog(data_config, name: str) -> tuple[TextSource, TextSource, str]:
  with text_builder.quiet():
    return _catalog(data_config, name)


def _catalog(data_config, name: str) -> tuple[TextSource, TextSource, str]:
  c = data_config
  field = f"config.data.source='tfds:{name}'"
  builder = _catalog_builder(name, c.data_dir)
  prepare = (f"prepare them on a machine with TensorFlow and network access with `tfds build "
             f"{name.split(':')[0]} --data_dir=DIR --file_format=array_record` (or copy a "
             "prepared copy there) and set config.data.data_dir=DIR")
  if not builder.is_prepared():
    raise DataError(f"{field}: no prepared files in {builder.data_dir} (config.data.data_dir="
                    f"{c.data_dir!r}); {prepare}")
  file_format = builder.info.file_format
  if file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(f"{field}: the files in {builder.data_dir} are {file_format.value}, which "
                    f"has no random access; bigflax reads array_record: {prepare}")
  splits = {}
  for key, split in (("train_split", c.train_split), ("val_split", c.val_split)):
    if split not in builder.info.splits:
      raise DataError(f"config.data.{key}={split!r}: tfds:{name} has the splits "
                      f"{sorted(builder.info.splits)}")
    splits[key] = builder.as_data_source(split)
  if c.text_feature not in builder.info.features:
    raise DataError(f"config.data.text_feature={c.text_feature!r}: tfds:{name} has the "
                    f"features {sorted(builder.info.features)}")
  return (TextSource(splits["train_split"], c.text_feature),
          TextSource(splits["val_split"], c.text_feature),
          f"tfds:{name} ({builder.data_dir}), splits {c.train_split} / {c.val_split}")


def _sharded(file_format: str):
  def open_source(data_config) -> tuple[TextSource, TextSource, str]:
    c = data_config
    if not c.path:
      raise DataError(f"config.data.source={file_format!r} needs config.data.path: a glob of "
                      f"{file_format} shards, local or gs://…")
    return shards.open_shards(c.path, c.val_path, c.val_shards, c.text_feature, file_format)
  return open_source


def token_cache(data_config) -> tuple:
  c = data_config
  if not c.path:
    raise DataError("config.data.source='cache' needs config.data.path: the directory "
                    "tools/prepare_data.py wrote")
  train, val, description, manifest = cache.open_cache(c, c.path, c.val_path, c.val_shards)
  train.tokenizer = val.tokenizer = manifest["tokenizer"]
  return train, val, description


SOURCES = {"stdlib": stdlib, "text": text, "parquet": _sharded("parquet"),
           "jsonl": _sharded("jsonl"), "cache": token_cache, "sft": sft.open_splits}


def open_splits(data_config) -> tuple[TextSource, TextSource, str]:
  """(train documents, val documents, a description) of `config.data`."""
  source = data_config.source or ("text" if data_config.path else "stdlib")
  if source.startswith("tfds:"):
    return catalog(data_config, source.removeprefix("tfds:"))
  if source not in SOURCES:
    raise DataError(f"config.data.source={source!r} is unknown; use one of {sorted(SOURCES)}, "
                    "tfds:NAME (e.g. tfds:lm1b) or leave it empty")
  return SOURCES[source](data_config)
