"""Local raw text: which files a corpus has, how they cut into documents, and the train/val split.

A local corpus (`config.data.path`) is a file, a directory (every file under it, recursively) or a
glob (`data/*.txt`, `books/**/*.md`), read in sorted path order. `config.data.documents` says what
one document is: `file` (each file whole) or `paragraph` (each block of text between blank lines
of a file). The last `val_fraction` of the corpus's bytes, in that order, validate and the rest
trains (nanoGPT's split of a single file); the document the cut falls in is cut in two there.

A corpus is text: files that are not UTF-8 text (they do not decode, or hold NUL bytes: images,
archives, compiled files, UTF-16) are skipped, and the corpus's description says how many.

The default corpus, the Python standard library's own .py files, is split by file instead (see
`stdlib_split`): its files are independent programs, so a hash of each path picks its side.
"""

import codecs
import glob
import pathlib
import re
import sysconfig
import zlib

from bigflax.errors import DataError

DOCUMENT_UNITS = ("file", "paragraph")
_DECODE_SLICE = 1 << 24
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


def is_text(raw: bytes) -> bool:
  """Whether a file's bytes are UTF-8 text: they decode, and hold no NUL byte (which text never
  has, while binary formats and UTF-16 text do)."""
  if b"\0" in raw:
    return False
  decoder, view = codecs.getincrementaldecoder("utf-8")(), memoryview(raw)
  try:  # in slices, so a large file is not held a second time as a str
    for start in range(0, len(raw), _DECODE_SLICE):
      decoder.decode(view[start:start + _DECODE_SLICE])
    decoder.decode(b"", final=True)
  except UnicodeDecodeError:
    return False
  return True


def skipped_note(count: int, first: str) -> str:
  """Words for the `count` files left out as not UTF-8 text, `first` the first of them ("" when
  none were)."""
  if not count:
    return ""
  files = "1 file that is" if count == 1 else f"{count:,} files that are"
  return f"skipped {files} not UTF-8 text (first: {first})"


def _read(file: pathlib.Path, path: str) -> bytes:
  try:
    return file.read_bytes()
  except OSError as e:
    raise DataError(f"config.data.path={path!r}: cannot read {file} ({e.strerror or e}); make it "
                    "readable or leave it out of the path") from None


def text_split(path: str, unit: str,
               val_fraction: float) -> tuple[list[bytes], list[bytes], list[str]]:
  """(train, val) documents of the local corpus at `path`, and the files skipped as not UTF-8
  text."""
  documents, skipped = [], []
  for file in text_files(path):
    raw = _read(file, path)
    if is_text(raw):
      documents.extend(split_units(raw, unit))
    else:
      skipped.append(str(file))
  if not documents:
    if skipped:
      note = skipped_note(len(skipped), skipped[0])
      raise DataError(f"config.data.path={path!r} has no UTF-8 text: {note}; re-encode the "
                      "text as UTF-8 (e.g. iconv -f latin1 -t utf-8) or point config.data.path "
                      "at text files")
    raise DataError(f"config.data.path={path!r} is empty (no text in its files); it needs "
                    "text to train on")
  return (*tail_split(documents, val_fraction), skipped)
