"""Local raw text: which files a corpus has, how they cut into documents, and the train/val split.

A local corpus (`config.data.path`) is a file, a directory (every file under it, recursively) or a
glob (`data/*.txt`, `books/**/*.md`), read in sorted path order. `config.data.documents` says what
one document is: `file` (each file whole) or `paragraph` (each block of text between blank lines
of a file). The last `val_fraction` of the corpus's bytes, in that order, validate and the rest
trains (nanoGPT's split of a single file); the document the cut falls in is cut in two there.

The default corpus, the Python standard library's own .py files, is split by file instead (see
`stdlib_split`): its files are independent programs, so a hash of each path picks its side.
"""

import glob
import pathlib
import re
import sysconfig
import zlib

from bigflax.errors import DataError

DOCUMENT_UNITS = ("file", "paragraph")
_BLANK_LINES = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[pathlib.Path]:
  """The Python standard library's own .py sources: a corpus every Python install has."""
  root = stdlib_root()
  skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
  return sorted(p for p in root.rglob("*.py")
                if not skip.intersection(p.relative_to(root).parts[:-1]))


def stdlib_split(val_fraction: float) -> tuple[list[bytes], list[bytes]]:
  """(train, val) documents, one per file. A file is in val iff crc32(its path relative to the
  stdlib root) falls in the lowest `val_fraction` of the hash range — stable across machines and
  Python versions (adding a file never moves another one), and no file is in both splits."""
  root = stdlib_root()
  train, val = [], []
  for path in stdlib_files():
    key = path.relative_to(root).as_posix().encode()
    (val if zlib.crc32(key) < val_fraction * 2**32 else train).extend(
        split_units(path.read_bytes(), "file"))  # empty files (__init__.py) are no documents
  return train, val


def text_files(path: str) -> list[pathlib.Path]:
  """The files of `config.data.path`: the file itself, every file under a directory, or the
  files a glob matches; sorted, hidden files and folders (`.git`) left out of directories."""
  root = pathlib.Path(path).expanduser()
  if root.is_file():
    return [root]
  if root.is_dir():
    files = (p for p in root.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
  else:
    files = (pathlib.Path(p) for p in glob.glob(str(root), recursive=True))
  files = sorted(p for p in files if p.is_file())
  if not files:
    raise DataError(f"config.data.path={path!r}: no such file (nor a directory or glob with "
                    "files); point it at text, or leave it empty to train on the Python standard "
                    "library")
  return files


def split_units(raw: bytes, unit: str) -> list[bytes]:
  """One file's documents."""
  if unit == "file":
    return [raw] if raw.strip() else []
  return [block for block in _BLANK_LINES.split(raw) if block.strip()]


def _char_boundary(raw: bytes, cut: int) -> int:
  """`cut` moved forward past UTF-8 continuation bytes, so no character is cut in two."""
  while cut < len(raw) and raw[cut] & 0xC0 == 0x80:
    cut += 1
  return cut


def tail_split(documents: list[bytes], val_fraction: float) -> tuple[list[bytes], list[bytes]]:
  """The first (1 - val_fraction) of the documents' bytes train, the rest validate."""
  total = sum(len(d) for d in documents)
  budget = int(total * (1 - val_fraction))
  for i, doc in enumerate(documents):
    if budget < len(doc):
      cut = _char_boundary(doc, budget)
      head, tail = doc[:cut], doc[cut:]
      return documents[:i] + ([head] if head else []), [tail] + documents[i + 1:]
    budget -= len(doc)
  return documents, []


def text_split(path: str, unit: str, val_fraction: float) -> tuple[list[bytes], list[bytes]]:
  """(train, val) documents of the local corpus at `path`."""
  documents = [doc for file in text_files(path) for doc in split_units(file.read_bytes(), unit)]
  if not documents:
    raise DataError(f"config.data.path={path!r} is empty (no text in its files); it needs "
                    "text to train on")
  return tail_split(documents, val_fraction)
