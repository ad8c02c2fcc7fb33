"""JSON lines: the one reader and writer of the repository (``.jsonl``,
``.jsonl.gz``, ``.ndjson``). Writes are atomic (a unique temp file, then a
rename); a bad line is an error naming ``file:line``."""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]):
  """Atomically writes ``records`` as JSON lines (temp file + rename)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  os.close(fd)
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
      for record in records:
        record = dict(record) if isinstance(record, Mapping) else record
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def iter_jsonl(path: str) -> Iterable[tuple[int, Any, str | None]]:
  """Yields ``(line_number, record, error)``; blank lines are skipped. A line
  that is not UTF-8, not JSON or not an object is an ``error`` (the line is
  read as bytes, so bad bytes on one line never hide the others)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield lineno, None, f"invalid UTF-8 ({e.reason} at byte {e.start + 1} of the line)"
        continue
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
        continue
      if not isinstance(record, dict):
        yield lineno, None, (f"expected a JSON object, got {type(record).__name__}")
        continue
      yield lineno, record, None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a JSONL file into a list of dicts; bad lines raise ``file:line``."""
  path = os.fspath(path)
  records = []
  for lineno, record, error in iter_jsonl(path):
    if error is not None:
      raise ValueError(f"{path}:{lineno}: {error}")
    records.append(record)
  return records
