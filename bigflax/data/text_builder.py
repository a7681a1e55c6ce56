"""Local text → a TFDS dataset in the array_record format, so local corpora and catalog datasets
(lm1b, c4, …) are read by one reader (`tfds` random-access data sources).

The dataset `local_text` has one config per corpus, named by a digest of what it was built from
(the files' paths, sizes and modification times, the document unit, the val fraction): edit a
file and the next run rebuilds; otherwise it is read from `<data_dir>/local_text/<digest>/`.
Each record is {"text": the document's bytes, "index": its position in corpus order}; TFDS
stores records shuffled by key hash, and `index` restores the order where it matters (windows).
Building needs no TensorFlow and no network.
"""

import hashlib
import json
import sys

import numpy as np
import tensorflow_datasets as tfds

from bigflax.data import sources

TRAIN_SPLIT, VAL_SPLIT = "train", "validation"
# Bump when the records' content or layout changes, so old caches are not read as new.
_FORMAT = 1


class LocalText(tfds.core.GeneratorBasedBuilder):
  """A local corpus's documents; `splits` (only called when building) returns (train, val)."""
  VERSION = tfds.core.Version("1.0.0")
  # No source files to locate (checksums, metadata): TFDS's lookup of them needs the optional
  # importlib_resources package for a builder that lives in a regular package like this one.
  code_path = None

  def __init__(self, *, splits=None, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: the catalog's metadata lookup needs a registered package's files.
    return tfds.core.DatasetInfo(
        builder=self, description="Documents of a local text corpus, built by bigflax.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "index": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    train, val = self._splits()
    return {TRAIN_SPLIT: self._generate_examples(train),
            VAL_SPLIT: self._generate_examples(val)}

  def _generate_examples(self, documents):
    for index, text in enumerate(documents):
      yield index, {"text": text, "index": index}


def _digest(spec: dict) -> str:
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def name_of(spec: dict) -> str:
  """The dataset's TFDS name (`tfds:NAME` reads it like any prepared dataset)."""
  return f"{LocalText.name}/{_digest(spec)}"


def _listing(files, root=None) -> list:
  return [[str(f.relative_to(root) if root else f.resolve()), f.stat().st_size,
           f.stat().st_mtime_ns] for f in files]


def text_spec(path: str, unit: str, val_fraction: float) -> dict:
  return {"format": _FORMAT, "files": _listing(sources.text_files(path)), "unit": unit,
          "val_fraction": val_fraction}


def stdlib_spec(val_fraction: float) -> dict:
  return {"format": _FORMAT, "python": sys.version, "val_fraction": val_fraction,
          "files": _listing(sources.stdlib_files(), sources.stdlib_root())}


def prepare(spec: dict, splits, data_dir: str | None) -> LocalText:
  """The built dataset for `spec` in `data_dir` (TFDS's default when empty), built now if it is
  not there yet; `splits()` gives its (train, val) documents."""
  def builder():
    return LocalText(splits=splits, config=tfds.core.BuilderConfig(name=_digest(spec)),
                     data_dir=data_dir or None, file_format="array_record")
  built = builder()
  if not built.is_prepared():
    tfds.disable_progress_bar()
    try:
      built.download_and_prepare()
    except FileExistsError:
      # Another process of the run (sharing data_dir) finished the same build first: the
      # content is a function of `spec`, so its files are the ones this build would write.
      built = builder()
  return built
