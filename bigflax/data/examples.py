"""Example files for fine-tuning: JSON lines or CSV, one example a line, each kept with the place
it came from (`FILE line N`), so a bad one is named where it is.

`config.data.path` is a file or a glob (local or any fsspec URL), read in sorted order; a name
ending in .csv is CSV with a header row (its columns the fields), any other JSON lines (one
object a line; blank lines are skipped). The validation examples are those of the glob
`config.data.val_path`, else the last `config.data.val_fraction` of the examples, in file order
(shuffle the file first if it is sorted by anything that matters).
"""

import csv
import dataclasses
import io

from bigflax.data import shards
from bigflax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Record:
  fields: dict
  place: str  # "FILE line N", for errors


def _lines(url: str) -> str:
  fs, path = shards.filesystem(url)
  try:
    with fs.open(path, "rb") as handle:
      raw = handle.read()
  except OSError as e:
    raise DataError(f"cannot read {url} ({e.strerror or e}); make it readable or leave it out "
                    "of config.data.path") from None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{url} is not UTF-8 text (byte {e.start}); re-encode it as UTF-8") from None


def _json_records(url: str) -> list[Record]:
  records = []
  for number, fields in shards.json_lines(io.StringIO(_lines(url)), url, "each line of an "
                                          "example file is one JSON object"):
    if not isinstance(fields, dict):
      raise DataError(f"{url} line {number} is a JSON {type(fields).__name__}, not an object; "
                      "each line of an example file is one JSON object")
    records.append(Record(fields, f"{url} line {number}"))
  return records


def _csv_records(url: str) -> list[Record]:
  reader = csv.DictReader(io.StringIO(_lines(url), newline=""))
  records = []
  try:
    for row in reader:
      if None in row:  # more cells than the header names
        raise DataError(f"{url} line {reader.line_num} has more cells than the header's "
                        f"{len(reader.fieldnames)} columns; quote cells that hold commas")
      records.append(Record({k: v for k, v in row.items() if v is not None},
                            f"{url} line {reader.line_num}"))
  except csv.Error as e:
    raise DataError(f"{url} line {reader.line_num} is not CSV ({e}); fix the line") from None
  return records


def read(pattern: str, field: str) -> list[Record]:
  """Every example of the files the glob `pattern` (config.data.`field`) matches, in order."""
  records = []
  for url in shards.expand(pattern, f"config.data.{field}"):
    records.extend(_csv_records(url) if url.endswith(".csv") else _json_records(url))
  if not records:
    raise DataError(f"config.data.{field}={pattern!r} holds no examples; give a JSON-lines or "
                    "CSV file with one example a line")
  return records


def open_splits(data_config) -> tuple[list[Record], list[Record], str]:
  """(train examples, val examples, a description) of config.data.path and val_path."""
  c = data_config
  if not c.path:
    raise DataError("fine-tuning examples need config.data.path: a JSON-lines or CSV file (or a "
                    "glob of them)")
  records = read(c.path, "path")
  if c.val_path:
    return records, read(c.val_path, "val_path"), f"{c.path} (val: {c.val_path})"
  count = max(1, round(len(records) * c.val_fraction))
  if count >= len(records):
    raise DataError(f"config.data.path={c.path!r} has {len(records)} example(s): too few to "
                    f"keep {count} for validation (config.data.val_fraction={c.val_fraction}); "
                    "give more examples or a separate config.data.val_path")
  return (records[:-count], records[-count:],
          f"{c.path} (the last {c.val_fraction:g} of its examples validate)")


def field(record: Record, name: str, kinds: tuple = (str,)):
  """The record's field `name`, which must be one of `kinds`; a DataError naming the place."""
  if name not in record.fields:
    raise DataError(f"{record.place} has no field {name!r}; its fields are "
                    f"{sorted(record.fields)}")
  value = record.fields[name]
  if not isinstance(value, kinds) or isinstance(value, bool):
    raise DataError(f"{record.place}: the field {name!r} is a {type(value).__name__}, not "
                    f"{' or '.join(k.__name__ for k in kinds)}")
  return value
