"""Verifiable tasks: a built-in synthetic arithmetic task and a math verifier.

``get_task("arithmetic", levels=(1, 2, 3))`` builds a registered task; see
:mod:`opd_jax.tasks.base` for the task interface.
"""

from __future__ import annotations

from opd_jax.tasks import (
  arithmetic,  # noqa: F401  (registers "arithmetic")
  math,  # noqa: F401  (registers "math")
)
from opd_jax.tasks.arithmetic import ArithmeticTask
from opd_jax.tasks.base import TASKS, answer_of, get_task, read_jsonl, write_jsonl
from opd_jax.tasks.math import MathTask, extract_boxed

__all__ = [
  "TASKS",
  "get_task",
  "answer_of",
  "read_jsonl",
  "write_jsonl",
  "ArithmeticTask",
  "MathTask",
  "extract_boxed",
  "build_tokenizer",
]


def build_tokenizer(*args, **kwargs):
  """Lazy alias of :func:`opd_jax.tasks.tokenizer.build_tokenizer`."""
  from opd_jax.tasks.tokenizer import build_tokenizer as _build  # pylint: disable=import-outside-toplevel

  return _build(*args, **kwargs)
