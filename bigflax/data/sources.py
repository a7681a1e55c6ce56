"""Raw text sources. Each returns the bytes of its train and val splits, split deterministically."""

import pathlib
import sysconfig
import zlib

from bigflax.data.tokenizers import DataError


def stdlib_files() -> list[pathlib.Path]:
  """The Python standard library's own .py sources: a corpus every Python install has."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
  return sorted(p for p in root.rglob("*.py")
                if not skip.intersection(p.relative_to(root).parts[:-1]))


def stdlib_split(val_fraction: float) -> tuple[bytes, bytes, str]:
  """File-level split: a file is in val iff crc32(its path relative to the stdlib root) falls in
  the lowest `val_fraction` of the hash range — stable across machines and Python versions
  (adding a file never moves another one), and no file is in both splits."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  train, val = [], []
  for path in stdlib_files():
    key = path.relative_to(root).as_posix().encode()
    (val if zlib.crc32(key) < val_fraction * 2**32 else train).append(path.read_bytes())
  # Files are joined with a blank line; windows may span two files, as in any flat corpus.
  description = (f"Python {sysconfig.get_python_version()} standard library: {len(train)} train "
                 f"files, {len(val)} val files")
  return b"\n\n".join(train), b"\n\n".join(val), description


def read_text_file(path: str) -> bytes:
  file = pathlib.Path(path).expanduser()
  if not file.is_file():
    raise DataError(f"config.data.path={path!r}: no such file. Point it at a text file, or "
                    "leave it empty to train on the Python standard library")
  raw = file.read_bytes()
  if not raw:
    raise DataError(f"config.data.path={path!r} is empty; it needs text to train on")
  return raw
