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

Modules: :mod:`~opd_jax.data.jsonl` (the one JSON-lines reader / writer),
:mod:`~opd_jax.data.files` (paths, globs, Parquet), :mod:`~opd_jax.data.records`
(:class:`DataOptions`, record validation), :mod:`~opd_jax.data.tokens`,
:mod:`~opd_jax.data.pipeline` (:class:`PromptData`, the grain pipeline),
:mod:`~opd_jax.data.state` (iterator state).
"""

from opd_jax.data.files import expand_paths
from opd_jax.data.jsonl import read_jsonl, write_jsonl
from opd_jax.data.pipeline import Batch, PromptData, validate_mixture
from opd_jax.data.records import DataOptions, data_options
from opd_jax.data.state import restore_iterator_state, save_iterator_state

__all__ = [
  "Batch",
  "DataOptions",
  "PromptData",
  "data_options",
  "expand_paths",
  "read_jsonl",
  "restore_iterator_state",
  "save_iterator_state",
  "validate_mixture",
  "write_jsonl",
]
