"""Prompt files: paths and glob patterns, JSONL and Parquet records."""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from typing import Any

from opd_jax.data.jsonl import iter_jsonl

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
  """Files of a path, a glob pattern or a sequence of them (FileNotFoundError
  for a missing file or an empty pattern)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    p = os.fspath(p)
    if glob.has_magic(p):
      matches = sorted(glob.glob(p))
      if not matches:
        raise FileNotFoundError(f"No files match the pattern {p!r}.")
      out.extend(matches)
    else:
      if not os.path.exists(p):
        raise FileNotFoundError(f"Prompt file not found: {p!r}.")
      out.append(p)
  if not out:
    raise ValueError("No prompt files given.")
  return out


def iter_file(path: str) -> Iterable[tuple[int, Any, str | None]]:
  """``(line or row, record, error)`` of one file; a file that cannot be
  read at all (corrupt gzip / Parquet) is a ValueError naming it."""
  if not path.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES):
    raise ValueError(
      f"{path}: unsupported file type; expected one of {JSONL_SUFFIXES + PARQUET_SUFFIXES}."
    )
  lineno = 0
  try:
    if path.endswith(JSONL_SUFFIXES):
      for lineno, record, error in iter_jsonl(path):
        yield lineno, record, error
    else:
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

      for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
        yield row, record, None
  except (OSError, EOFError, ValueError) as e:  # gzip.BadGzipFile, pyarrow.ArrowInvalid
    raise ValueError(
      f"{path}: cannot read the file after line {lineno}: {type(e).__name__}: {e}"
    ) from None


def source_from_path(path: str) -> str:
  name = os.path.basename(path)
  for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name
