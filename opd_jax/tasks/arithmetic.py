"""Synthetic multi-digit addition with a written scratchpad in two patterns.

Level ``L`` adds two ``L``-digit numbers (level 1: 0..9). The prompt is the
same for both patterns, e.g. ``"47+85="``; the reference completion is a short
deterministic scratchpad ending with the answer line ``ans=<sum>``:

* pattern ``"A"`` (column): right-to-left, one step per column
  ``a_i+b_i+carry=<two-digit sum>``, steps joined by ``;``::

    7+5+0=12;4+8+1=13;ans=132

* pattern ``"B"`` (place-value): right-to-left too, but a different step
  vocabulary and layout: place letter (``u t h k m ...``) and incoming carry
  first, then the bottom operand's digit before the top one, then only the
  written digit; a final carry gets its own step; steps joined by ``|``::

    u0:5+7>2|t1:8+4>3|h1:>1|ans=132

The two patterns differ from the first completion character on (a digit vs.
``u``), so a model trained on one assigns low probability to the other's
tokens, while both are equally verifiable by the shared answer line.

**Phrasings** (``phrasings=k``, default 1 = the formats above): each step is
written in one of the first ``k`` templates of its pattern
(:data:`PHRASINGS`), drawn per step by the example's own generator, e.g. with
``k = 3`` in pattern A::

    7+5+0=12;4 plus 8 carry 1 is 13;ans=132

so the data has genuine choice points: a model that learns it spreads its
next-token mass over the templates at every step's start (entropy up to
log k there), where the one-phrasing data is near-deterministic. Every
template of a pattern starts with that pattern's first character class (a
digit in A, the place letter in B), keeps the step's numbers in the same
order of computation and leaves the answer line alone, so the patterns stay
distinguishable from the first character and verification is unchanged.

Train / eval splits are hash based: a problem belongs to ``"eval"`` iff a
stable hash of its prompt falls in the first ``eval_fraction`` of buckets, so
the two splits can never share a prompt, whatever the seeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from opd_jax.tasks.base import TASKS, answer_of
from opd_jax.tasks.base import write_jsonl as _write_jsonl

PATTERNS = ("A", "B")
SPLITS = ("train", "eval")
ALL_LEVELS = (1, 2, 3, 4, 5, 6)
# Place letters of pattern B (units, tens, hundreds, thousands, ...).
PLACES = "uthkmnpqrvwxyz"
MAX_LEVEL = len(PLACES) - 1
ANSWER_MARKER = "ans="
# Step templates per pattern; index 0 is the one-phrasing format. Fields: x, y
# (the top / bottom operand's digit), c (incoming carry), s (x + y + c), d
# (s mod 10), p (pattern B's place letter).
PHRASINGS = {
  "A": (
    "{x}+{y}+{c}={s:02d}",
    "{x} plus {y} carry {c} is {s:02d}",
    "{x}+{y} with {c} makes {s:02d}",
    "{x} and {y} and {c} give {s:02d}",
  ),
  "B": (
    "{p}{c}:{y}+{x}>{d}",
    "{p} carry {c}: {y} and {x} write {d}",
    "{p}{c}, {y} with {x} puts {d}",
    "{p} in {c} sum {y} {x} out {d}",
  ),
}
# Pattern B's final-carry step, per template (same order as PHRASINGS["B"]).
_FINAL_CARRY_B = ("{p}1:>1", "{p} carry 1: write 1", "{p}1, puts 1", "{p} in 1 out 1")

_ANSWER_RE = re.compile(r"ans\s*=\s*(-?\d+)")
_HASH_BUCKETS = 1 << 20
_ENUMERATE_LIMIT = 20_000  # levels with at most this many problems are enumerated


def prompt_for(a: int, b: int) -> str:
  """The prompt of problem ``a + b`` (shared by all patterns)."""
  return f"{a}+{b}="


def _digits(x: int, width: int) -> list[int]:
  """Least-significant-first digits of ``x``, zero-padded to ``width``."""
  return [(x // 10**i) % 10 for i in range(width)]


def _check_phrasings(phrasings: int) -> int:
  phrasings = int(phrasings)
  k = min(len(t) for t in PHRASINGS.values())
  if not 1 <= phrasings <= k:
    raise ValueError(f"phrasings must be in 1..{k} (templates per pattern), got {phrasings}")
  return phrasings


def solve(
  a: int,
  b: int,
  pattern: str = "A",
  *,
  phrasings: int = 1,
  rng: np.random.Generator | None = None,
) -> str:
  """Reference scratchpad for ``a + b`` (non-negative ints) in ``pattern``.

  With ``phrasings = k > 1`` each step's template is drawn uniformly from the
  pattern's first ``k`` (:data:`PHRASINGS`) with ``rng`` (required then)."""
  if a < 0 or b < 0:
    raise ValueError(f"operands must be non-negative, got {a}, {b}")
  if pattern not in PATTERNS:
    raise ValueError(f"unknown pattern {pattern!r}; valid patterns: {PATTERNS}")
  phrasings = _check_phrasings(phrasings)
  if phrasings > 1 and rng is None:
    raise ValueError("phrasings > 1 draws each step's template: pass rng")
  width = max(len(str(a)), len(str(b)))
  if pattern == "B" and width > MAX_LEVEL:
    raise ValueError(f"pattern B supports at most {MAX_LEVEL} digits, got {width}")
  da, db = _digits(a, width), _digits(b, width)
  pick = (lambda: int(rng.integers(phrasings))) if phrasings > 1 else (lambda: 0)
  templates = PHRASINGS[pattern]
  steps, carry = [], 0
  for i, (x, y) in enumerate(zip(da, db)):
    s = x + y + carry
    p = PLACES[i] if pattern == "B" else ""
    steps.append(templates[pick()].format(x=x, y=y, c=carry, s=s, d=s % 10, p=p))
    carry = s // 10
  if pattern == "B" and carry:
    steps.append(_FINAL_CARRY_B[pick()].format(p=PLACES[width]))
  steps.append(f"{ANSWER_MARKER}{a + b}")
  return (";" if pattern == "A" else "|").join(steps)


def extract_answer(text: str | None) -> str | None:
  """The number after the first ``ans=`` marker (junk after it ignored)."""
  if not text:
    return None
  m = _ANSWER_RE.search(text)
  return m.group(1) if m else None


def _bucket(prompt: str) -> int:
  digest = hashlib.blake2b(prompt.encode("utf-8"), digest_size=8).digest()
  return int.from_bytes(digest, "little") % _HASH_BUCKETS


def split_of(prompt: str, eval_fraction: float) -> str:
  """``"eval"`` or ``"train"``: a pure function of the prompt text."""
  return "eval" if _bucket(prompt) < eval_fraction * _HASH_BUCKETS else "train"


def _operand_range(level: int) -> tuple[int, int]:
  """Inclusive range of ``level``-digit operands (level 1 includes 0)."""
  return (0 if level == 1 else 10 ** (level - 1)), 10**level - 1


def _level_counts(n: int, num_levels: int) -> list[int]:
  return [n // num_levels + (i < n % num_levels) for i in range(num_levels)]


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
  """Multi-digit addition; see the module docstring for the formats.

  Attributes:
    levels: default levels of :meth:`generate` (digit counts).
    eval_fraction: share of all problems (by prompt hash) held out for eval.
    phrasings: step templates per pattern the completions draw from (1: the
      fixed formats; see the module docstring).
  """

  levels: tuple[int, ...] = ALL_LEVELS
  eval_fraction: float = 0.1
  name: str = "arithmetic"
  phrasings: int = 1

  def __post_init__(self):
    object.__setattr__(self, "levels", self._check_levels(self.levels))
    object.__setattr__(self, "phrasings", _check_phrasings(self.phrasings))
    if not 0.0 < self.eval_fraction < 1.0:
      raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")

  @staticmethod
  def _check_levels(levels: Iterable[int]) -> tuple[int, ...]:
    levels = tuple(int(level) for level in levels)
    if not levels:
      raise ValueError("levels must not be empty")
    bad = [level for level in levels if not 1 <= level <= MAX_LEVEL]
    if bad:
      raise ValueError(f"levels must be in 1..{MAX_LEVEL}, got {bad}")
    return levels

  # --------------------------------------------------------------------------
  # Generation.

  def split_of(self, prompt: str) -> str:
    """The split (``"train"`` / ``"eval"``) a prompt belongs to."""
    return split_of(prompt, self.eval_fraction)

  def _problems(
    self, level: int, count: int, rng: np.random.Generator, split: str
  ) -> list[tuple[int, int]]:
    """``count`` problems of one level and split, unique while possible."""
    lo, hi = _operand_range(level)
    size = hi - lo + 1
    in_split = lambda a, b: self.split_of(prompt_for(a, b)) == split
    if size * size <= _ENUMERATE_LIMIT:
      pool = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if in_split(a, b)]
      if not pool:
        raise ValueError(f"level {level} has no {split!r} problems")
      out = []
      while len(out) < count:  # repeats only once the pool is exhausted
        out.extend(pool[i] for i in rng.permutation(len(pool))[: count - len(out)])
      return out
    out, seen = [], set()
    while len(out) < count:
      a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
      if (a, b) not in seen and in_split(a, b):
        seen.add((a, b))
        out.append((a, b))
    return out

  def make_example(
    self,
    a: int,
    b: int,
    pattern: str = "A",
    level: int | None = None,
    rng: np.random.Generator | None = None,
  ) -> dict[str, Any]:
    """The example dict of problem ``a + b`` (``rng`` draws the phrasings)."""
    level = level or max(len(str(a)), len(str(b)))
    return {
      "prompt": prompt_for(a, b),
      "completion": solve(a, b, pattern, phrasings=self.phrasings, rng=rng),
      "answer": str(a + b),
      "level": int(level),
      "source": f"{self.name}/L{level}",
      "pattern": pattern,
    }

  def generate(
    self,
    n: int,
    *,
    seed: int,
    levels: Sequence[int] | None = None,
    pattern: str = "A",
    split: str = "train",
  ) -> list[dict[str, Any]]:
    """``n`` examples, spread evenly over ``levels``, in shuffled order.

    Deterministic in ``(seed, levels, split, n)``; the pattern and the
    phrasings only change the completions, so they give the same problems for
    one seed (the phrasings draw from their own generator per level). Prompts
    are unique unless ``n`` exceeds a level's problem count (level 1 has 100
    problems over both splits, level 2 8,100).
    """
    if pattern not in PATTERNS:
      raise ValueError(f"unknown pattern {pattern!r}; valid patterns: {PATTERNS}")
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; valid splits: {SPLITS}")
    if n < 0:
      raise ValueError(f"n must be >= 0, got {n}")
    levels = self._check_levels(self.levels if levels is None else levels)
    if len(set(levels)) != len(levels):
      raise ValueError(f"duplicate levels {levels}")
    split_id = SPLITS.index(split)
    examples = []
    for level, count in zip(levels, _level_counts(n, len(levels))):
      rng = np.random.default_rng([seed, level, split_id])
      words = np.random.default_rng([seed, level, split_id, 7_919]) if self.phrasings > 1 else None
      for a, b in self._problems(level, count, rng, split):
        examples.append(self.make_example(a, b, pattern, level, words))
    order = np.random.default_rng([seed, 1_000_003, split_id]).permutation(len(examples))
    return [examples[i] for i in order]

  # --------------------------------------------------------------------------
  # Verification.

  def extract_answer(self, text: str | None) -> str | None:
    """The number after the first ``ans=`` marker, or None."""
    return extract_answer(text)

  def score(
    self, example_or_answer: Mapping[str, Any] | str | int, completion_text: str | None
  ) -> float:
    """1.0 iff the extracted answer equals the reference exactly, else 0.0."""
    pred = extract_answer(completion_text)
    return float(pred is not None and pred == answer_of(example_or_answer).strip())

  def write_jsonl(self, path: str | os.PathLike, examples: Iterable[Mapping[str, Any]]):
    """Writes examples as JSON lines."""
    _write_jsonl(path, examples)


@TASKS.register("arithmetic")
def arithmetic(
  *, levels: Sequence[int] = ALL_LEVELS, eval_fraction: float = 0.1, phrasings: int = 1
) -> ArithmeticTask:
  """Registered factory of :class:`ArithmeticTask`."""
  return ArithmeticTask(levels=tuple(levels), eval_fraction=eval_fraction, phrasings=phrasings)
