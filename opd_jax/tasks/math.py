"""Verifier for free-form math answers (``\\boxed{...}``), via math-verify.

Verification only (no generation). Scoring needs the optional extra
``pip install opd_jax[math]`` (the ``math-verify`` package); there is no
string-equality fallback, since it would silently under-score correct answers.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any

from opd_jax.tasks.base import TASKS, answer_of
from opd_jax.tasks.base import write_jsonl as _write_jsonl

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def _braced(text: str, start: int) -> str | None:
  """Content of the brace group opening at ``text[start] == "{"``."""
  depth = 0
  for i in range(start, len(text)):
    c = text[i]
    if c == "{":
      depth += 1
    elif c == "}":
      depth -= 1
      if depth == 0:
        return text[start + 1 : i]
  return None  # unbalanced


def extract_boxed(text: str | None) -> str | None:
  """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces ok).

  Also accepts the brace-less form ``\\boxed 5`` (up to the next whitespace or
  ``$``). Returns None when there is no complete box.
  """
  if not text:
    return None
  best, best_pos = None, -1
  for cmd in _BOX_COMMANDS:
    pos = text.rfind(cmd)
    while pos != -1:
      rest = pos + len(cmd)
      # Skip longer command names such as \boxedsomething.
      if rest < len(text) and text[rest].isalpha():
        pos = text.rfind(cmd, 0, pos)
        continue
      j = rest
      while j < len(text) and text[j] == " ":
        j += 1
      content = None
      if j < len(text) and text[j] == "{":
        content = _braced(text, j)
      elif j > rest and j < len(text):
        k = j
        while k < len(text) and not text[k].isspace() and text[k] != "$":
          k += 1
        content = text[j:k] or None
      if content is not None:
        if pos > best_pos:
          best, best_pos = content, pos
        break
      pos = text.rfind(cmd, 0, pos)
  return best


def _math_verify():
  try:
    import math_verify  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
      "the 'math' task scores answers with the math-verify package; install it "
      "with `pip install opd_jax[math]` (or `pip install math-verify`)"
    ) from e
  return math_verify


def verify_answer(answer: str, completion_text: str | None) -> bool:
  """math-verify equivalence of ``completion_text``'s answer with ``answer``.

  The reference is parsed as ``\\boxed{answer}``; the completion with
  math-verify's default LaTeX / expression extraction (boxed answers first).
  """
  mv = _math_verify()
  if not completion_text:
    return False
  # math-verify's timeouts use SIGALRM, which only works in the main thread.
  timeout = 5 if threading.current_thread() is threading.main_thread() else None
  gold = mv.parse("\\boxed{" + answer + "}", parsing_timeout=timeout)
  pred = mv.parse(completion_text, parsing_timeout=timeout)
  if not gold or not pred:
    return False
  return bool(mv.verify(gold, pred, timeout_seconds=timeout))


@dataclasses.dataclass(frozen=True)
class MathTask:
  """Verification-only task for boxed math answers."""

  name: str = "math"

  def generate(self, n: int, *, seed: int, **kwargs) -> list[dict[str, Any]]:
    raise NotImplementedError(
      "the 'math' task only verifies; load prompts from a dataset file instead"
    )

  def extract_answer(self, text: str | None) -> str | None:
    """The last boxed answer, or None."""
    return extract_boxed(text)

  def score(
    self, example_or_answer: Mapping[str, Any] | str | int, completion_text: str | None
  ) -> float:
    """1.0 iff math-verify finds the completion's answer equivalent."""
    return float(verify_answer(answer_of(example_or_answer), completion_text))

  def write_jsonl(self, path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]):
    """Writes examples as JSON lines."""
    _write_jsonl(path, examples)


def score(answer: Mapping[str, Any] | str | int, completion_text: str | None) -> float:
  """Module-level shorthand for :meth:`MathTask.score`."""
  return MathTask().score(answer, completion_text)


@TASKS.register("math")
def math_task() -> MathTask:
  """Registered factory of :class:`MathTask`."""
  return MathTask()
