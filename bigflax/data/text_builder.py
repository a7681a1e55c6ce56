"""Local text → a TFDS dataset in the array_record format, so local corpora and catalog datasets
(lm1b, c4, …) are read by one reader (`tfds` random-access data sources).

The dataset `local_text` has one config per corpus, named by a digest of what it was built from
(the files' paths, sizes and modification times, the document unit, the val fraction): edit a
file and the next run rebuilds; otherwise it is read from `<data_dir>/local_text/<digest>/`.
Each record is {"text": the document's bytes, "index": its position in corpus order}; TFDS
stores records shuffled by key hash, and `index` restores the order where it matters (windows).
Building needs no TensorFlow and no network: nothing is downloaded. A build says so in one line
("building the local dataset (N documents) → DIR", on stderr); TFDS's own chatter about it
(custom configs, download sizes, fresh variant folders) is kept quiet (`quiet`).
"""

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds

from bigflax.data import sources
from bigflax.errors import DataError

TRAIN_SPLIT, VAL_SPLIT = "train", "validation"
# Bump when the records' content or layout changes, so old caches are not read as new.
# 2: files that are not UTF-8 text are skipped (and counted in the metadata).
_FORMAT = 2


class _TfdsBelowError(logging.Filter):
  """Drops TFDS's log records below ERROR."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


@contextlib.contextmanager
def quiet():
  """TFDS's warnings and infos about local builds ("Using custom data configuration", "Variant
  folder … has no dataset_info.json", …) silenced while it lasts; other libraries' and TFDS's
  errors still show. TFDS logs through absl, whose records go to the Python logger "absl"."""
  logger, only_errors = logging.getLogger("absl"), _TfdsBelowError()
  logger.addFilter(only_errors)
  try:
    yield
  finally:
    logger.removeFilter(only_errors)


class LocalText(tfds.core.GeneratorBasedBuilder):
  """A local corpus's documents; `splits` (only called when building) returns (train, val)."""
  VERSION = tfds.core.Version("1.0.0")
  # No source files to locate (checksums, metadata): TFDS's lookup of them needs the optional
  # importlib_resources package for a builder that lives in a regular package like this one.
  code_path = None

  def __init__(self, *, splits=None, **kwargs):
    self._splits = splits
    super().__init__(**kwargs)
    self._target = str(self.data_dir)  # during a build, data_dir is a temporary folder

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: the catalog's metadata lookup needs a registered package's files.
    # metadata (metadata.json): {"skipped": count, "first_skipped": path} of the files skipped.
    return tfds.core.DatasetInfo(
        builder=self, description="Documents of a local text corpus, built by bigflax.",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "index": np.int64}),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    train, val, skipped = self._splits()
    self.info.metadata.update(skipped=len(skipped), first_skipped=skipped[0] if skipped else "")
    count = len(train) + len(val)
    print(f"building the local dataset ({count:,} document{'s' if count != 1 else ''}) → "
          f"{self._target}", file=sys.stderr, flush=True)
    return {TRAIN_SPLIT: self._generate_examples(train),
            VAL_SPLIT: self._generate_examples(val)}

  # TFDS prints these to stdout around a build; they speak of downloads, and there are none.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

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


def skipped_note(builder) -> str:
  """The built dataset's line about the files it skipped as not UTF-8 text ("" when none)."""
  metadata = builder.info.metadata or {}
  return sources.skipped_note(metadata.get("skipped", 0), metadata.get("first_skipped", ""))


def _check_data_dir(data_dir: str | None) -> None:
  """A DataError when `data_dir` (or a folder above it) is a file: there is no directory to build
  in."""
  if not data_dir or "://" in data_dir:
    return
  path = pathlib.Path(data_dir).expanduser().absolute()
  for folder in (path, *path.parents):
    if folder.exists():
      if not folder.is_dir():
        raise DataError(f"config.data.data_dir={data_dir!r}: {folder} is a file, not a "
                        "directory; point config.data.data_dir at a directory (it is created if "
                        "missing)")
      return


def _write_error(data_dir: str | None, error: OSError) -> DataError:
  where = (f"config.data.data_dir={data_dir!r}" if data_dir else
           f"TFDS's default data directory {tfds.core.constants.DATA_DIR} (config.data.data_dir "
           "is empty)")
  what = error.strerror or str(error)
  at = f": {error.filename}" if error.filename else ""
  return DataError(f"cannot build the local dataset in {where} ({what}{at}); point "
                   "config.data.data_dir at a writable directory")


def prepare(spec: dict, splits, data_dir: str | None) -> LocalText:
  """The built dataset for `spec` in `data_dir` (TFDS's default when empty), built now if it is
  not there yet; `splits()` gives its (train, val) documents and the paths of skipped files."""
  def builder():
    return LocalText(splits=splits, config=tfds.core.BuilderConfig(name=_digest(spec)),
                     data_dir=data_dir or None, file_format="array_record")
  _check_data_dir(data_dir)
  built = None
  with quiet():
    try:
      built = builder()
      if built.is_prepared():
        return built
      tfds.disable_progress_bar()
      try:
        built.download_and_prepare()
      except OSError:
        # Another process of the run (sharing data_dir) may have finished the same build first:
        # the content is a function of `spec`, so its files are the ones this build would write.
        built_by_another = builder()
        if not built_by_another.is_prepared():
          raise
        return built_by_another
      return built
    except BaseException as e:
      if built is not None:
        _remove_if_empty(pathlib.Path(built.data_dir).parent)
      if isinstance(e, OSError):
        raise _write_error(data_dir, e) from None
      raise


def _remove_if_empty(folder: pathlib.Path) -> None:
  """A failed build leaves no empty `<data_dir>/local_text/<digest>` folder behind."""
  with contextlib.suppress(OSError):
    os.rmdir(folder)
