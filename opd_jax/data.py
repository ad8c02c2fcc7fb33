"""Prompt datasets for on-policy distillation, served with grain.

Prompt sets are small, so everything expensive happens once in
:meth:`PromptData.build`: the JSONL / Parquet files are read, every record is
validated (errors name ``file:line``), prompts are rendered (optionally through
the tokenizer's chat template) and tokenised into fixed-shape numpy arrays.
:meth:`PromptData.iterator` then serves batches with a grain ``MapDataset``
pipeline over record *indices*:

  range(n) -> repeat(num_epochs) -> per-epoch seeded permutation
           -> [mix(sources, weights)] -> batch(global_batch)
           -> take this process's rows -> gather arrays

Because the pipeline batches the global batch before sharding, process ``i`` of
``k`` always receives rows ``[i * b, (i + 1) * b)`` (``b = batch_size // k``) of
exactly the batch a single-process run would see at the same step.

Batches are dicts of numpy arrays::

  prompt_ids      [b, P] int32   left-padded with the tokenizer's pad id
  prompt_mask     [b, P] bool
  completion_ids  [b, N] int32   right-padded (only with a completion field)
  completion_mask [b, N] bool
  index           [b]    int64   record index into the PromptData
  source_id       [b]    int32   index into ``PromptData.source_names``
  valid           [b]    bool    False only for padding rows of a final
                                 partial batch (``drop_remainder=False``)

The iterator is a plain grain ``DatasetIterator``; its state
(``{"next_index": int}``) is JSON-serialisable, see :func:`save_iterator_state`.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_MAX_ERRORS_KEPT = 20

Batch = dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# JSONL utilities.


def _open_text(path: str, mode: str):
  if path.endswith(".gz"):
    return gzip.open(path, mode + "t", encoding="utf-8")
  return open(path, mode, encoding="utf-8")


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]):
  """Atomically writes ``records`` as JSON lines (temp file + rename)."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp"
  )
  os.close(fd)
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(tmp, "wt", encoding="utf-8") as f:
      for record in records:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _iter_jsonl(path: str) -> Iterable[tuple[int, Any, str | None]]:
  """Yields ``(line_number, record, error)``; blank lines are skipped."""
  with _open_text(path, "r") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        yield lineno, None, f"invalid JSON ({e.msg} at column {e.colno})"
        continue
      if not isinstance(record, dict):
        yield lineno, None, (
            f"expected a JSON object, got {type(record).__name__}"
        )
        continue
      yield lineno, record, None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Reads a JSONL file into a list of dicts; bad lines raise ``file:line``."""
  path = os.fspath(path)
  records = []
  for lineno, record, error in _iter_jsonl(path):
    if error is not None:
      raise ValueError(f"{path}:{lineno}: {error}")
    records.append(record)
  return records


# ----------------------------------------------------------------------------
# Reading raw records.


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


def _iter_file(path: str) -> Iterable[tuple[int, Any, str | None]]:
  if path.endswith(_JSONL_SUFFIXES):
    yield from _iter_jsonl(path)
  elif path.endswith(_PARQUET_SUFFIXES):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

    for row, record in enumerate(pq.read_table(path).to_pylist(), start=1):
      yield row, record, None
  else:
    raise ValueError(
        f"{path}: unsupported file type; expected one of "
        f"{_JSONL_SUFFIXES + _PARQUET_SUFFIXES}."
    )


def _source_from_path(path: str) -> str:
  name = os.path.basename(path)
  for suffix in _JSONL_SUFFIXES + _PARQUET_SUFFIXES:
    if name.endswith(suffix):
      return name[: -len(suffix)]
  return name


# ----------------------------------------------------------------------------
# Validation / rendering of one record.


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """How records become fixed-shape arrays (:meth:`PromptData.build`).

  Attributes:
    max_prompt_len: prompt length P; prompts are left-padded to it.
    max_completion_len: completion length N (required with a
      ``completion_field``); longer completions are truncated.
    prompt_field: string prompt, or a list of ``{role, content}`` messages
      rendered with the chat template (``add_generation_prompt=True``).
    completion_field: optional off-policy completion (e.g. teacher rollout).
    answer_field: optional reference answer kept for evaluation lookups.
    source_field: optional data-source name; defaults to the file stem.
    use_chat_template: also wrap plain string prompts as one user message.
    add_special_tokens: passed to the tokenizer for plain (non-chat)
      prompts; chat-rendered prompts never get extra special tokens.
    append_eos: append EOS to completions when it fits in N.
    overlong: ``"drop"`` or ``"truncate"`` (keep the last P tokens).
    on_error: ``"raise"`` (ValueError naming ``file:line``) or ``"skip"``.
  """
  max_prompt_len: int
  max_completion_len: int | None = None
  prompt_field: str = "prompt"
  completion_field: str | None = None
  answer_field: str | None = "answer"
  source_field: str | None = None
  use_chat_template: bool = False
  add_special_tokens: bool = True
  append_eos: bool = True
  overlong: str = "drop"
  on_error: str = "raise"


def data_options(options: DataOptions | None = None, **kwargs: Any) -> DataOptions:
  """``options`` with ``kwargs`` (fields of :class:`DataOptions`) replaced."""
  if options is None:
    return DataOptions(**kwargs)
  return dataclasses.replace(options, **kwargs) if kwargs else options


@dataclasses.dataclass(frozen=True)
class _FieldSpec:
  prompt_field: str
  completion_field: str | None
  answer_field: str | None
  source_field: str | None
  use_chat_template: bool


def _check_messages(messages: list[Any]) -> str | None:
  if not messages:
    return "empty message list"
  for i, m in enumerate(messages):
    if not isinstance(m, dict):
      return f"message {i} is a {type(m).__name__}, expected an object"
    for key in ("role", "content"):
      if not isinstance(m.get(key), str):
        return f"message {i} needs a string {key!r}"
  return None


def _parse_record(
    record: dict[str, Any], spec: _FieldSpec, default_source: str
) -> tuple[dict[str, Any] | None, str | None]:
  """Returns ``(parsed, None)`` or ``(None, error message)``."""
  prompt = record.get(spec.prompt_field)
  if prompt is None:
    return None, f"missing field {spec.prompt_field!r}"
  if isinstance(prompt, str):
    if not prompt:
      return None, f"field {spec.prompt_field!r} is empty"
    messages = [{"role": "user", "content": prompt}]
    if not spec.use_chat_template:
      messages = None
  elif isinstance(prompt, list):
    error = _check_messages(prompt)
    if error is not None:
      return None, f"field {spec.prompt_field!r}: {error}"
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
  else:
    return None, (
        f"field {spec.prompt_field!r} must be a string or a list of messages, "
        f"got {type(prompt).__name__}"
    )
  parsed = {
      "prompt": prompt if messages is None else None,
      "messages": messages,
      "completion": None,
      "answer": None,
      "source": default_source,
  }
  if spec.completion_field is not None:
    completion = record.get(spec.completion_field)
    if completion is None:
      return None, f"missing field {spec.completion_field!r}"
    if not isinstance(completion, str):
      return None, (
          f"field {spec.completion_field!r} must be a string, got "
          f"{type(completion).__name__}"
      )
    parsed["completion"] = completion
  if spec.answer_field is not None:
    parsed["answer"] = record.get(spec.answer_field)
  if spec.source_field is not None:
    source = record.get(spec.source_field)
    if source is None:
      return None, f"missing field {spec.source_field!r}"
    if not isinstance(source, str):
      return None, (
          f"field {spec.source_field!r} must be a string, got "
          f"{type(source).__name__}"
      )
    parsed["source"] = source
  return parsed, None


# ----------------------------------------------------------------------------
# The dataset.


def _encode(tokenizer, texts: list[str], add_special_tokens: bool):
  if not texts:
    return []
  return list(
      tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
  )


def _pad_id(tokenizer) -> int:
  for pid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if pid is not None:
      return int(pid)
  raise ValueError("Tokenizer has neither a pad token nor an EOS token.")


class _EpochShuffle:
  """Maps stream position ``i`` to ``members[perm_e[i % n]]``, ``e = i // n``.

  Equivalent to grain's ``MapDataset.shuffle(...).repeat()`` (a fresh
  permutation per epoch, deterministic from ``(seed, stream, epoch)``), but
  with a cached numpy permutation per epoch: grain's per-index Feistel
  shuffle costs milliseconds per element on small datasets.
  """

  def __init__(self, members: np.ndarray, seed: int, stream: int,
               shuffle: bool):
    self._members = np.asarray(members, np.int64)
    self._seed = int(seed)
    self._stream = int(stream)
    self._shuffle = shuffle
    self._cache: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    order = self._cache.get(epoch)
    if order is None:
      if self._shuffle:
        rng = np.random.default_rng([self._seed, self._stream, epoch])
        order = self._members[rng.permutation(len(self._members))]
      else:
        order = self._members
      if len(self._cache) >= 4:  # Batches can straddle epoch boundaries.
        self._cache.pop(min(self._cache))
      self._cache[epoch] = order
    return order

  def __call__(self, index: int, _: Any) -> int:
    epoch, pos = divmod(int(index), len(self._members))
    return int(self._order(epoch)[pos])


@dataclasses.dataclass(frozen=True, eq=False)
class PromptData:
  """Tokenised prompt set held in memory; build with :meth:`build`.

  Attributes:
    prompt_ids: ``[n, P]`` int32, left-padded.
    prompt_mask: ``[n, P]`` bool.
    completion_ids: ``[n, N]`` int32, right-padded, or None.
    completion_mask: ``[n, N]`` bool, or None.
    source_ids: ``[n]`` int32 indices into ``source_names``.
    source_names: sorted distinct source names.
    prompt_texts: rendered prompt text per record (after the chat template).
    completion_texts: completion text per record, or None.
    answers: answer value per record (None where absent).
    origins: ``"file:line"`` per record.
    stats: counts for the logs (see :meth:`build`).
    errors: the first malformed-record messages skipped with
      ``on_error="skip"``.
    pad_id: padding token id.
    eos_id: EOS token id (or None).
  """

  prompt_ids: np.ndarray
  prompt_mask: np.ndarray
  completion_ids: np.ndarray | None
  completion_mask: np.ndarray | None
  source_ids: np.ndarray
  source_names: tuple[str, ...]
  prompt_texts: tuple[str, ...]
  completion_texts: tuple[str, ...] | None
  answers: tuple[Any, ...]
  origins: tuple[str, ...]
  stats: dict[str, int]
  errors: tuple[str, ...]
  pad_id: int
  eos_id: int | None

  # --------------------------------------------------------------- building

  @classmethod
  def build(
      cls,
      paths: str | os.PathLike | Sequence[str | os.PathLike],
      tokenizer,
      options: DataOptions | None = None,
      **kwargs: Any,
  ) -> PromptData:
    """Reads, validates and tokenises JSONL / Parquet prompt files.

    Args:
      paths: a file, a glob pattern, or a sequence of them (``.jsonl``,
        ``.jsonl.gz``, ``.ndjson``, ``.parquet``).
      tokenizer: a ``transformers`` tokenizer.
      options: the :class:`DataOptions`; ``kwargs`` set (or replace) its
        fields (``max_prompt_len=12, on_error="skip"``).

    Returns:
      The PromptData. ``stats`` holds ``num_records`` (kept),
      ``num_read`` (well-formed records read), ``num_malformed_skipped``,
      ``num_dropped_overlong``, ``num_truncated`` (prompts) and
      ``num_completion_truncated``.
    """
    records = []
    for path in expand_paths(paths):
      default_source = _source_from_path(path)
      for lineno, record, error in _iter_file(path):
        records.append((f"{path}:{lineno}", record, error, default_source))
    return cls._from_raw(records, tokenizer, data_options(options, **kwargs))

  @classmethod
  def from_records(
      cls,
      records: Sequence[Mapping[str, Any]],
      tokenizer,
      options: DataOptions | None = None,
      *,
      name: str = "<records>",
      **kwargs: Any,
  ) -> PromptData:
    """Like :meth:`build` for in-memory dicts (origins are ``name:i``)."""
    raw = []
    for i, record in enumerate(records, start=1):
      if isinstance(record, Mapping):
        raw.append((f"{name}:{i}", dict(record), None, name))
      else:
        raw.append((f"{name}:{i}", None, (
            f"expected a mapping, got {type(record).__name__}"), name))
    return cls._from_raw(raw, tokenizer, data_options(options, **kwargs))

  @classmethod
  def _from_raw(
      cls,
      raw: list[tuple[str, Any, str | None, str]],
      tokenizer,
      opts: DataOptions,
  ) -> PromptData:
    (max_prompt_len, max_completion_len, prompt_field, completion_field, answer_field,
     source_field, use_chat_template, add_special_tokens, append_eos, overlong,
     on_error) = dataclasses.astuple(opts)
    if overlong not in ("drop", "truncate"):
      raise ValueError(
          f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_prompt_len <= 0:
      raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
    if completion_field is not None and (
        max_completion_len is None or max_completion_len <= 0
    ):
      raise ValueError(
          "max_completion_len must be a positive int with a completion_field."
      )
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
      raise ValueError("use_chat_template=True but the tokenizer has no "
                       "chat_template.")
    spec = _FieldSpec(prompt_field, completion_field, answer_field,
                      source_field, use_chat_template)

    # 1. Validate and render.
    errors: list[str] = []
    parsed: list[dict[str, Any]] = []
    for origin, record, error, default_source in raw:
      item = None
      if error is None:
        item, error = _parse_record(record, spec, default_source)
      if error is None and item["messages"] is not None:
        if not has_template:
          raise ValueError(
              f"{origin}: prompt is a message list but the tokenizer has no "
              "chat_template."
          )
        try:
          item["prompt"] = tokenizer.apply_chat_template(
              item["messages"], add_generation_prompt=True, tokenize=False
          )
        except Exception as e:  # pylint: disable=broad-except
          error = f"chat template failed: {e}"
        if error is None and not isinstance(item["prompt"], str):
          error = "chat template did not render to a string"
      if error is not None:
        message = f"{origin}: {error}"
        if on_error == "raise":
          raise ValueError(message)
        if len(errors) < _MAX_ERRORS_KEPT:
          logging.warning("Skipping malformed record %s", message)
        errors.append(message)
        continue
      item["origin"] = origin
      parsed.append(item)

    # 2. Tokenise (one batched call per kind).
    plain = [p["messages"] is None for p in parsed]
    texts = [p["prompt"] for p in parsed]
    plain_ids = iter(_encode(
        tokenizer, [t for t, is_plain in zip(texts, plain) if is_plain],
        add_special_tokens))
    chat_ids = iter(_encode(
        tokenizer, [t for t, is_plain in zip(texts, plain) if not is_plain],
        False))
    prompt_tokens = [
        next(plain_ids) if is_plain else next(chat_ids) for is_plain in plain
    ]
    completion_tokens = None
    if completion_field is not None:
      completion_tokens = _encode(
          tokenizer, [p["completion"] for p in parsed], False
      )

    # 3. Length handling.
    num_dropped = num_truncated = num_empty = num_completion_truncated = 0
    keep = []
    for i, ids in enumerate(prompt_tokens):
      if not ids:
        message = f"{parsed[i]['origin']}: prompt tokenises to zero tokens"
        if on_error == "raise":
          raise ValueError(message)
        errors.append(message)
        num_empty += 1
        continue
      if len(ids) > max_prompt_len:
        if overlong == "drop":
          num_dropped += 1
          continue
        prompt_tokens[i] = ids[len(ids) - max_prompt_len:]
        num_truncated += 1
      keep.append(i)

    n = len(keep)
    pad_id = _pad_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    prompt_ids = np.full((n, max_prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((n, max_prompt_len), bool)
    for row, i in enumerate(keep):
      ids = prompt_tokens[i]
      prompt_ids[row, max_prompt_len - len(ids):] = ids
      prompt_mask[row, max_prompt_len - len(ids):] = True

    completion_ids = completion_mask = completion_texts = None
    if completion_tokens is not None:
      completion_ids = np.full((n, max_completion_len), pad_id, np.int32)
      completion_mask = np.zeros((n, max_completion_len), bool)
      for row, i in enumerate(keep):
        ids = list(completion_tokens[i])
        if len(ids) > max_completion_len:
          ids = ids[:max_completion_len]
          num_completion_truncated += 1
        elif (append_eos and eos_id is not None
              and len(ids) < max_completion_len):
          ids.append(int(eos_id))
        completion_ids[row, :len(ids)] = ids
        completion_mask[row, :len(ids)] = True
      completion_texts = tuple(parsed[i]["completion"] for i in keep)

    source_names = tuple(sorted({parsed[i]["source"] for i in keep}))
    source_index = {s: k for k, s in enumerate(source_names)}
    stats = {
        "num_records": n,
        "num_read": len(raw) - len(errors) + num_empty,
        "num_malformed_skipped": len(errors),
        "num_dropped_overlong": num_dropped,
        "num_truncated": num_truncated,
        "num_completion_truncated": num_completion_truncated,
    }
    return cls(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=completion_ids,
        completion_mask=completion_mask,
        source_ids=np.array(
            [source_index[parsed[i]["source"]] for i in keep], np.int32
        ),
        source_names=source_names,
        prompt_texts=tuple(parsed[i]["prompt"] for i in keep),
        completion_texts=completion_texts,
        answers=tuple(parsed[i]["answer"] for i in keep),
        origins=tuple(parsed[i]["origin"] for i in keep),
        stats=stats,
        errors=tuple(errors[:_MAX_ERRORS_KEPT]),
        pad_id=pad_id,
        eos_id=None if eos_id is None else int(eos_id),
    )

  # ------------------------------------------------------------- accessors

  def __len__(self) -> int:
    return int(self.prompt_ids.shape[0])

  @property
  def has_completions(self) -> bool:
    return self.completion_ids is not None

  @property
  def source_counts(self) -> dict[str, int]:
    counts = np.bincount(self.source_ids, minlength=len(self.source_names))
    return {s: int(c) for s, c in zip(self.source_names, counts)}

  def answers_for(self, index: Iterable[int]) -> list[Any]:
    """Reference answers for a batch's ``index`` array."""
    return [self.answers[int(i)] for i in index]

  def gather(self, index: np.ndarray) -> Batch:
    """The batch dict for record indices ``index`` (all rows valid)."""
    index = np.asarray(index, np.int64)
    batch = {
        "prompt_ids": self.prompt_ids[index],
        "prompt_mask": self.prompt_mask[index],
        "index": index,
        "source_id": self.source_ids[index],
        "valid": np.ones(index.shape, bool),
    }
    if self.completion_ids is not None:
      batch["completion_ids"] = self.completion_ids[index]
      batch["completion_mask"] = self.completion_mask[index]
    return batch

  # ------------------------------------------------------------- iteration

  def _index_dataset(
      self,
      seed: int,
      num_epochs: int | None,
      shuffle: bool,
      mixture: Mapping[str, float] | None,
  ) -> grain.MapDataset:
    """Record-index stream (before batching)."""
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")

    def stream(members: np.ndarray, stream_id: int, epochs: int | None):
      ds = grain.MapDataset.range(len(members)).repeat(epochs)
      return ds.map_with_index(_EpochShuffle(members, seed, stream_id, shuffle))

    if mixture is None:
      return stream(np.arange(len(self)), 0, num_epochs)
    weights = validate_mixture(mixture, self.source_names)
    parts, total = [], 0
    for name in weights:
      source_id = self.source_names.index(name)
      members = np.flatnonzero(self.source_ids == source_id)
      total += len(members)
      parts.append(stream(members, 1 + source_id, None))
    ds = grain.MapDataset.mix(parts, list(weights.values()))
    if num_epochs is not None:
      # One "epoch" of a mixture = as many draws as records in its sources.
      ds = ds[: num_epochs * total]
    return ds

  def dataset(
      self,
      batch_size: int,
      *,
      seed: int = 0,
      num_epochs: int | None = None,
      shard_index: int | None = None,
      shard_count: int | None = None,
      drop_remainder: bool = True,
      shuffle: bool = True,
      mixture: Mapping[str, float] | None = None,
      num_threads: int = 0,
  ) -> grain.IterDataset:
    """The grain pipeline behind :meth:`iterator` (same arguments)."""
    if len(self) == 0:
      raise ValueError("PromptData is empty (all records dropped or skipped?).")
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size <= 0 or batch_size % shard_count:
      raise ValueError(
          f"batch_size={batch_size} must be a positive multiple of "
          f"shard_count={shard_count}."
      )
    if not 0 <= shard_index < shard_count:
      raise ValueError(f"shard_index={shard_index} not in [0, {shard_count}).")
    local = batch_size // shard_count
    start = shard_index * local

    def to_batch(global_index: np.ndarray) -> Batch:
      global_index = np.asarray(global_index, np.int64)
      n_valid = len(global_index)
      if n_valid < batch_size:  # Final partial batch: pad with valid=False.
        global_index = np.resize(global_index, batch_size)
      batch = self.gather(global_index[start:start + local])
      batch["valid"] = np.arange(start, start + local) < n_valid
      return batch

    ds = self._index_dataset(seed, num_epochs, shuffle, mixture)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(to_batch)
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=0
                          if num_threads == 0 else max(1, 2 * num_threads))
    )

  def iterator(
      self,
      batch_size: int,
      *,
      seed: int = 0,
      num_epochs: int | None = None,
      shard_index: int | None = None,
      shard_count: int | None = None,
      drop_remainder: bool = True,
      shuffle: bool = True,
      mixture: Mapping[str, float] | None = None,
      num_threads: int = 0,
  ) -> grain.DatasetIterator:
    """Returns a grain iterator of this process's share of global batches.

    Args:
      batch_size: GLOBAL batch size; each process gets
        ``batch_size // shard_count`` rows.
      seed: shuffle seed (each epoch is reshuffled deterministically).
      num_epochs: passes over the data; None repeats forever.
      shard_index: this process's index (default ``jax.process_index()``).
      shard_count: number of processes (default ``jax.process_count()``).
      drop_remainder: drop the final partial global batch; otherwise it is
        padded to full size with repeated rows marked ``valid=False``.
      shuffle: shuffle records (False: file order, e.g. for evaluation).
      mixture: optional ``{source_name: weight}``; sources are interleaved
        deterministically in these proportions (grain ``MapDataset.mix``),
        each one shuffled and repeated independently. Sources not named are
        not used. With ``num_epochs``, an epoch is as many draws as the mixed
        sources hold records.
      num_threads: grain read threads (0 is best for in-memory data).

    Returns:
      A ``grain.DatasetIterator`` of batch dicts (see module docstring) with
      JSON-serialisable ``get_state()`` / ``set_state()``.
    """
    return iter(self.dataset(
        batch_size, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
        shard_count=shard_count, drop_remainder=drop_remainder,
        shuffle=shuffle, mixture=mixture, num_threads=num_threads))


def validate_mixture(
    mixture: Mapping[str, float], source_names: Sequence[str]
) -> dict[str, float]:
  """Checks source names and weights; returns ``{name: float weight}``."""
  if not mixture:
    raise ValueError("mixture must name at least one source.")
  unknown = sorted(set(mixture) - set(source_names))
  if unknown:
    raise ValueError(
        f"Unknown mixture source(s) {unknown}; available: {list(source_names)}."
    )
  out = {}
  for name, weight in mixture.items():
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
      raise ValueError(
          f"Mixture weight for {name!r} must be positive and finite, got "
          f"{weight!r}."
      )
    out[name] = w
  return out


# ----------------------------------------------------------------------------
# Iterator state.


def _to_json(value: Any) -> Any:
  if isinstance(value, dict):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_json(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"Iterator state value {value!r} is not JSON-serialisable.")


def save_iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """Returns the iterator state as a JSON-serialisable dict."""
  state = _to_json(it.get_state())
  json.dumps(state)  # Fail here, not inside the checkpointer.
  return state


def restore_iterator_state(
    it: grain.DatasetIterator, state: Mapping[str, Any]
) -> grain.DatasetIterator:
  """Restores ``state`` (from :func:`save_iterator_state`) into ``it``."""
  if not isinstance(state, Mapping):
    raise TypeError(f"Iterator state must be a dict, got {type(state)}.")
  it.set_state(dict(state))
  return it
