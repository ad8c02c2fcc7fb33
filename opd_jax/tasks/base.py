"""Task registry and shared helpers for verifiable tasks.

A *task* is an object with (at least)::

  name: str
  extract_answer(text) -> str | None
  score(example_or_answer, completion_text) -> float   # 1.0 / 0.0

and, for generative tasks, ``generate(n, *, seed, ...) -> list[dict]``.
Examples are plain dicts with keys ``prompt``, ``completion``, ``answer``,
``level`` and ``source`` (the format :mod:`opd_jax.data` reads from JSONL).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from opd_jax.data.jsonl import read_jsonl, write_jsonl  # noqa: F401  (the one JSONL I/O)
from opd_jax.registry import Registry

TASKS = Registry("task")


def get_task(name: str, **kwargs) -> Any:
  """Builds the registered task ``name`` (unknown kwargs raise ValueError)."""
  return TASKS.build(name, kwargs)()


def answer_of(example_or_answer: Any) -> str:
  """The reference answer of an example dict, or the answer itself, as a str."""
  if isinstance(example_or_answer, Mapping):
    if "answer" not in example_or_answer:
      raise KeyError("example has no 'answer' field")
    example_or_answer = example_or_answer["answer"]
  if example_or_answer is None:
    raise ValueError("reference answer is None")
  return str(example_or_answer)
