"""The tokenised prompt set (:class:`PromptData`) and its grain pipeline."""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from opd_jax.data.files import expand_paths, iter_file, source_from_path
from opd_jax.data.records import DataOptions, FieldSpec, data_options, parse_record
from opd_jax.data.tokens import encode, pad_id_of

_MAX_ERRORS_KEPT = 20

# Why a record is skipped (on_error="skip"), counted as num_skipped_<reason>.
SKIP_REASONS = {
  "invalid_utf8": "not UTF-8",
  "invalid_json": "not a JSON object",
  "missing_field": "a missing field",
  "invalid_field": "a field of the wrong type or empty (or a failing chat template)",
  "empty_prompt": "a prompt of zero tokens",
}


def _reason(error: str) -> str:
  """The :data:`SKIP_REASONS` key of a record's error message."""
  for prefix, reason in (
    ("invalid UTF-8", "invalid_utf8"),
    ("invalid JSON", "invalid_json"),
    ("expected a JSON object", "invalid_json"),
    ("expected a mapping", "invalid_json"),
    ("missing field", "missing_field"),
  ):
    if error.startswith(prefix):
      return reason
  return "invalid_field"


Batch = dict[str, np.ndarray]


class _EpochShuffle:
  """Maps stream position ``i`` to ``members[perm_e[i % n]]``, ``e = i // n``.

  Equivalent to grain's ``MapDataset.shuffle(...).repeat()`` (a fresh
  permutation per epoch, deterministic from ``(seed, stream, epoch)``), but
  with a cached numpy permutation per epoch: grain's per-index Feistel
  shuffle costs milliseconds per element on small datasets.
  """

  def __init__(self, members: np.ndarray, seed: int, stream: int, shuffle: bool):
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


class _ScheduledMix:
  """Draw ``i`` (global batch ``t = i // batch_size``) -> a record id: source
  ``s`` with probability w_s(t)/Σ_u w_u(t) (weights from their schedules, or
  static), by inverse CDF of a uniform seeded by (seed, i); then element
  ``i`` of that source's own shuffled, repeated stream. A pure function of
  ``i``, so the iterator state (its position) resumes it exactly."""

  def __init__(self, parts, weights, schedules, seed: int, batch_size: int):
    self.parts, self.names = parts, list(weights)
    self.static, self.schedules = weights, dict(schedules)
    self.seed, self.batch_size = seed, batch_size

  def weights_at(self, t: int) -> np.ndarray:
    from opd_jax import schedules as schedules_lib  # pylint: disable=g-import-not-at-top

    w = np.array(
      [
        schedules_lib.host_value(self.schedules[n], t) if n in self.schedules else self.static[n]
        for n in self.names
      ],
      np.float64,
    )
    if not np.all(np.isfinite(w)) or np.any(w < 0) or not w.sum() > 0:
      raise ValueError(
        f"mixture weights at batch {t} must be >= 0 with a positive sum, "
        f"got {dict(zip(self.names, w.tolist()))}"
      )
    return w / w.sum()

  def __call__(self, index: int, _: Any) -> int:
    w = self.weights_at(index // self.batch_size)
    u = np.random.default_rng([self.seed, 7, index]).random()
    src = min(int(np.searchsorted(np.cumsum(w), u, side="right")), len(w) - 1)
    return int(self.parts[src][index])


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
    files: the files read (``build``; ``from_records``: its ``name``).
    counts: more counts for the logs: ``num_files``, ``num_empty_files``,
      ``num_lines`` (non-blank lines / rows read, malformed ones included),
      the records skipped by reason (``num_skipped_<reason>``, reasons
      :data:`SKIP_REASONS`) and ``max_prompt_tokens`` (the longest prompt read).
    empty_files: the files without a record.
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
  files: tuple[str, ...] = ()
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  empty_files: tuple[str, ...] = ()
  options: DataOptions | None = None
  # [n, A] int32 token ids of each record's answer (-1 padded), or None; set
  # (dataclasses.replace, tasks.verify.encode_answers) for steps that verify
  # in the step (opd_grpo): batches then carry "answer_ids".
  answer_ids: np.ndarray | None = None

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
    records, files, empty = [], expand_paths(paths), []
    for path in files:
      default_source, n = source_from_path(path), len(records)
      for lineno, record, error in iter_file(path):
        records.append((f"{path}:{lineno}", record, error, default_source))
      if len(records) == n:
        logging.warning("%s: no records (empty file)", path)
        empty.append(path)
    return cls._from_raw(
      records,
      tokenizer,
      data_options(options, **kwargs),
      files=tuple(files),
      empty_files=tuple(empty),
    )

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
        raw.append(
          (f"{name}:{i}", None, (f"expected a mapping, got {type(record).__name__}"), name)
        )
    return cls._from_raw(
      raw,
      tokenizer,
      data_options(options, **kwargs),
      files=(name,),
      empty_files=() if raw else (name,),
    )

  @classmethod
  def _from_raw(
    cls,
    raw: list[tuple[str, Any, str | None, str]],
    tokenizer,
    opts: DataOptions,
    files: tuple[str, ...] = (),
    empty_files: tuple[str, ...] = (),
  ) -> PromptData:
    max_prompt_len, max_completion_len = opts.max_prompt_len, opts.max_completion_len
    prompt_field, completion_field = opts.prompt_field, opts.completion_field
    answer_field, source_field = opts.answer_field, opts.source_field
    use_chat_template, add_special_tokens = opts.use_chat_template, opts.add_special_tokens
    append_eos, overlong, on_error = opts.append_eos, opts.overlong, opts.on_error
    if overlong not in ("drop", "truncate"):
      raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_prompt_len <= 0:
      raise ValueError(f"max_prompt_len must be positive, got {max_prompt_len}")
    if completion_field is not None and (max_completion_len is None or max_completion_len <= 0):
      raise ValueError("max_completion_len must be a positive int with a completion_field.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if use_chat_template and not has_template:
      raise ValueError("use_chat_template=True but the tokenizer has no chat_template.")
    spec = FieldSpec(prompt_field, completion_field, answer_field, source_field, use_chat_template)

    # 1. Validate and render.
    errors: list[str] = []
    reasons = collections.Counter()  # skipped records by reason (labels)
    parsed: list[dict[str, Any]] = []
    for origin, record, error, default_source in raw:
      item = None
      if error is None:
        item, error = parse_record(record, spec, default_source)
      if error is None and item["messages"] is not None:
        if not has_template:
          raise ValueError(
            f"{origin}: prompt is a message list but the tokenizer has no chat_template."
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
          logging.warning("Skipping malformed record %s (on_error='skip')", message)
        errors.append(message)
        reasons[_reason(error)] += 1
        continue
      item["origin"] = origin
      parsed.append(item)

    # 2. Tokenise (one batched call per kind).
    plain = [p["messages"] is None for p in parsed]
    texts = [p["prompt"] for p in parsed]
    plain_ids = iter(
      encode(tokenizer, [t for t, is_plain in zip(texts, plain) if is_plain], add_special_tokens)
    )
    chat_ids = iter(
      encode(tokenizer, [t for t, is_plain in zip(texts, plain) if not is_plain], False)
    )
    prompt_tokens = [next(plain_ids) if is_plain else next(chat_ids) for is_plain in plain]
    completion_tokens = None
    if completion_field is not None:
      completion_tokens = encode(tokenizer, [p["completion"] for p in parsed], False)

    # 3. Length handling.
    longest = max(map(len, prompt_tokens), default=0)
    num_dropped = num_truncated = num_empty = num_completion_truncated = 0
    keep = []
    for i, ids in enumerate(prompt_tokens):
      if not ids:
        message = f"{parsed[i]['origin']}: prompt tokenises to zero tokens"
        if on_error == "raise":
          raise ValueError(message)
        errors.append(message)
        reasons["empty_prompt"] += 1
        num_empty += 1
        continue
      if len(ids) > max_prompt_len:
        if overlong == "drop":
          num_dropped += 1
          continue
        prompt_tokens[i] = ids[len(ids) - max_prompt_len :]
        num_truncated += 1
      keep.append(i)

    n = len(keep)
    pad_id = pad_id_of(tokenizer)
    eos_id = tokenizer.eos_token_id
    prompt_ids = np.full((n, max_prompt_len), pad_id, np.int32)
    prompt_mask = np.zeros((n, max_prompt_len), bool)
    for row, i in enumerate(keep):
      ids = prompt_tokens[i]
      prompt_ids[row, max_prompt_len - len(ids) :] = ids
      prompt_mask[row, max_prompt_len - len(ids) :] = True

    completion_ids = completion_mask = completion_texts = None
    if completion_tokens is not None:
      completion_ids = np.full((n, max_completion_len), pad_id, np.int32)
      completion_mask = np.zeros((n, max_completion_len), bool)
      for row, i in enumerate(keep):
        ids = list(completion_tokens[i])
        if len(ids) > max_completion_len:
          ids = ids[:max_completion_len]
          num_completion_truncated += 1
        elif append_eos and eos_id is not None and len(ids) < max_completion_len:
          ids.append(int(eos_id))
        completion_ids[row, : len(ids)] = ids
        completion_mask[row, : len(ids)] = True
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
    counts = {
      "num_files": len(files),
      "num_empty_files": len(empty_files),
      "num_lines": len(raw),
      **{f"num_skipped_{r}": reasons[r] for r in SKIP_REASONS},
      "max_prompt_tokens": longest,
    }
    return cls(
      prompt_ids=prompt_ids,
      prompt_mask=prompt_mask,
      completion_ids=completion_ids,
      completion_mask=completion_mask,
      source_ids=np.array([source_index[parsed[i]["source"]] for i in keep], np.int32),
      source_names=source_names,
      prompt_texts=tuple(parsed[i]["prompt"] for i in keep),
      completion_texts=completion_texts,
      answers=tuple(parsed[i]["answer"] for i in keep),
      origins=tuple(parsed[i]["origin"] for i in keep),
      stats=stats,
      errors=tuple(errors[:_MAX_ERRORS_KEPT]),
      pad_id=pad_id,
      eos_id=None if eos_id is None else int(eos_id),
      files=tuple(files),
      counts=counts,
      empty_files=tuple(empty_files),
      options=opts,
    )

  # ------------------------------------------------------------- accessors

  def __len__(self) -> int:
    return int(self.prompt_ids.shape[0])

  def empty_reason(self) -> str:
    """Why no record is left: the files and the records lost, by reason."""
    st, c, o = self.stats, self.counts, self.options
    files = ", ".join(self.files) or "no files"
    parts = []
    if st["num_dropped_overlong"]:
      limit = f" max_prompt_len={o.max_prompt_len}" if o else " max_prompt_len"
      parts.append(
        f"{st['num_dropped_overlong']} longer than{limit} tokens (overlong='drop'; "
        f"the longest has {c.get('max_prompt_tokens')} tokens: raise max_prompt_len "
        "or set overlong='truncate')"
      )
    first = {}  # reason -> its first error ("file:line: message")
    for e in self.errors:
      m = re.match(r"^(.*?:\d+): (.*)$", e)
      first.setdefault(_reason(m.group(2)) if m else "", e)
    skipped = [
      f"{c[f'num_skipped_{r}']} {label}" + (f" (first: {first[r]})" if r in first else "")
      for r, label in SKIP_REASONS.items()
      if c.get(f"num_skipped_{r}")
    ]
    if skipped:
      field = f" (prompt_field={o.prompt_field!r})" if o else ""
      parts.append(
        f"{st['num_malformed_skipped']} skipped (on_error='skip'): " + ", ".join(skipped) + field
      )
    if self.empty_files:
      parts.append(f"{len(self.empty_files)} empty file(s): {', '.join(self.empty_files)}")
    return (
      f"no prompt records left from {files} ({c.get('num_lines', 0)} non-blank lines "
      "read): " + ("; ".join(parts) or "no records")
    )

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
    if self.answer_ids is not None:
      batch["answer_ids"] = self.answer_ids[index]
    return batch

  # ------------------------------------------------------------- iteration

  def _index_dataset(
    self,
    seed: int,
    num_epochs: int | None,
    shuffle: bool,
    mixture: Mapping[str, float] | None,
    mixture_schedules: Mapping[str, Any] | None = None,
    batch_size: int = 1,
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
    unknown = sorted(set(mixture_schedules or {}) - set(weights))
    if unknown:
      raise ValueError(
        f"mixture schedules for {unknown} name no source of the mixture {sorted(weights)}"
      )
    parts, total = [], 0
    for name in weights:
      source_id = self.source_names.index(name)
      members = np.flatnonzero(self.source_ids == source_id)
      total += len(members)
      parts.append(stream(members, 1 + source_id, None))
    if mixture_schedules:
      ds = (
        grain.MapDataset.range(total)
        .repeat(None)
        .map_with_index(_ScheduledMix(parts, weights, mixture_schedules, seed, batch_size))
      )
    else:
      ds = grain.MapDataset.mix(parts, list(weights.values()))
    if num_epochs is not None:
      # One "epoch" of a mixture = as many draws as records in its sources.
      ds = ds[: num_epochs * total]
    return ds

  def _group_batches(
    self,
    seed: int,
    num_epochs: int | None,
    shuffle: bool,
    mixture: Mapping[str, float] | None,
    groups: Sequence[tuple[Sequence[str], int]],
    batch_size: int,
  ) -> grain.MapDataset:
    """Global batches of record ids ``[batch_size]`` with fixed rows per group:
    batch t = ``s_0[t·q_0 .. t·q_0+q_0-1] ++ s_1[t·q_1 ..] ++ ...`` where
    ``s_k`` is group k's stream (its records shuffled and repeated per epoch,
    or, with ``mixture``, its sources mixed by their weights, each source's
    own shuffled stream). A pure function of t, so the iterator's position
    resumes it exactly. With ``num_epochs``, as many batches as
    ``num_epochs · records / batch_size`` (records of the grouped sources)."""
    if num_epochs is not None and num_epochs <= 0:
      raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
    if seed < 0:
      raise ValueError(f"seed must be non-negative, got {seed}")
    quotas = [int(q) for _, q in groups]
    if sum(quotas) != batch_size or min(quotas, default=0) < 1:
      raise ValueError(f"group rows {quotas} must be >= 1 each and add up to {batch_size}")
    weights = validate_mixture(mixture, self.source_names) if mixture is not None else None
    streams, total, seen = [], 0, set()
    for k, (sources, _) in enumerate(groups):
      unknown = sorted(set(sources) - set(self.source_names))
      if unknown or not sources or seen & set(sources):
        raise ValueError(
          f"group {k}: sources {sorted(sources)} must be non-empty, disjoint from the "
          f"other groups' and in the data {list(self.source_names)}"
        )
      seen |= set(sources)
      ids = [self.source_names.index(s) for s in sources]
      members = np.flatnonzero(np.isin(self.source_ids, ids))
      total += len(members)

      def stream(m, stream_id):
        ds = grain.MapDataset.range(len(m)).repeat(None)
        return ds.map_with_index(_EpochShuffle(m, seed, stream_id, shuffle))

      if weights is None:
        streams.append(stream(members, 1_000_003 + k))
        continue
      missing = sorted(set(sources) - set(weights))
      if missing:
        raise ValueError(f"group {k}: sources {missing} have no mixture weight")
      parts = [stream(np.flatnonzero(self.source_ids == i), 1 + i) for i in ids]
      streams.append(grain.MapDataset.mix(parts, [weights[s] for s in sources]))
    num = None if num_epochs is None else max(1, num_epochs * total // batch_size)

    def batch_ids(t: int, _: Any) -> np.ndarray:
      return np.concatenate(
        [np.array([s[t * q + j] for j in range(q)], np.int64) for s, q in zip(streams, quotas)]
      )

    ds = grain.MapDataset.range(1).repeat(None) if num is None else grain.MapDataset.range(num)
    return ds.map_with_index(batch_ids)

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
    mixture_schedules: Mapping[str, Any] | None = None,
    groups: Sequence[tuple[Sequence[str], int]] | None = None,
  ) -> grain.IterDataset:
    """The grain pipeline behind :meth:`iterator`.

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
      mixture_schedules: optional ``{source_name: schedules.Schedule}`` over
        global batches: the weight of a named source of ``mixture`` at batch
        t (a curriculum over difficulty levels); each draw then picks its
        source from that batch's weights (:class:`_ScheduledMix`).
      groups: optional ``[(sources, rows), ...]`` (multi-teacher OPD): every
        global batch is group 0's ``rows`` records, then group 1's, ... (the
        rows add up to ``batch_size``), each group drawn from its own stream
        over its sources (weighted by ``mixture`` where given, else its records
        shuffled together); see :meth:`_group_batches`. Not with
        ``mixture_schedules``; ``drop_remainder`` is implied.

    Returns:
      A ``grain.IterDataset`` of this process's share of global batches.
    """
    if len(self) == 0:
      raise ValueError(f"PromptData is empty: {self.empty_reason()}.")
    if shard_index is None or shard_count is None:
      import jax  # pylint: disable=g-import-not-at-top

      shard_index = jax.process_index() if shard_index is None else shard_index
      shard_count = jax.process_count() if shard_count is None else shard_count
    if batch_size <= 0 or batch_size % shard_count:
      raise ValueError(
        f"batch_size={batch_size} must be a positive multiple of shard_count={shard_count}."
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
      batch = self.gather(global_index[start : start + local])
      batch["valid"] = np.arange(start, start + local) < n_valid
      return batch

    if groups is not None:
      if mixture_schedules:
        raise ValueError("mixture schedules cannot be combined with per-group row quotas")
      ds = self._group_batches(seed, num_epochs, shuffle, mixture, groups, batch_size)
      ds = ds.map(to_batch)
    else:
      ds = self._index_dataset(seed, num_epochs, shuffle, mixture, mixture_schedules, batch_size)
      ds = ds.batch(batch_size, drop_remainder=drop_remainder).map(to_batch)
    return ds.to_iter_dataset(
      grain.ReadOptions(
        num_threads=num_threads,
        prefetch_buffer_size=0 if num_threads == 0 else max(1, 2 * num_threads),
      )
    )

  def iterator(self, batch_size: int, **options: Any) -> grain.DatasetIterator:
    """Returns a grain iterator of this process's share of global batches:
    ``iter(self.dataset(batch_size, **options))`` (the options of
    :meth:`dataset`: seed, epochs, sharding, shuffle, mixture and its
    schedules).

    Returns:
      A ``grain.DatasetIterator`` of batch dicts (see module docstring) with
      JSON-serialisable ``get_state()`` / ``set_state()``.
    """
    return iter(self.dataset(batch_size, **options))


def validate_mixture(mixture: Mapping[str, float], source_names: Sequence[str]) -> dict[str, float]:
  """Checks source names and weights; returns ``{name: float weight}``."""
  if not mixture:
    raise ValueError("mixture must name at least one source.")
  unknown = sorted(set(mixture) - set(source_names))
  if unknown:
    raise ValueError(f"Unknown mixture source(s) {unknown}; available: {list(source_names)}.")
  out = {}
  for name, weight in mixture.items():
    w = float(weight)
    if not math.isfinite(w) or w <= 0:
      raise ValueError(f"Mixture weight for {name!r} must be positive and finite, got {weight!r}.")
    out[name] = w
  return out
