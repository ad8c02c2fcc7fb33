"""Verifiers that run inside the compiled step (the outcome reward of ``opd_grpo``).

A verifier is a hashable callable

  verifier(tokens [R, N] int32, mask [R, N] bool, answer_ids [R, A] int32) -> reward [R] f32

with ``tokens`` / ``mask`` each row's completion and ``answer_ids`` the
token ids of its reference answer (``answer.strip()`` encoded, right-padded
with -1; :func:`encode_answers`). Two kinds:

* :class:`ArithmeticVerifier`: JAX-native, for the built-in arithmetic task on
  a character-level tokenizer (one token per character): it parses the first
  ``ans\\s*=\\s*(-?\\d+)`` match of the completion in jnp, exactly as
  ``ArithmeticTask.score`` (1.0 iff the number equals the answer string).
* :class:`HostVerifier`: any task's host ``score(answer, text)`` through
  ``jax.pure_callback`` (decodes on the host), still inside the one program.

:func:`make_verifier` picks one for a task and tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Characters the arithmetic answer line reads; \s of the regex restricted to
# the whitespace a tokenizer may hold as single-character tokens.
_WHITESPACE = " \t\n\r\f\v"
_NEEDED = "ans=-0123456789"


def encode_answers(answers: Sequence[Any], tokenizer, width: int) -> np.ndarray:
  """``[len(answers), width]`` int32 token ids of ``str(answer).strip()``
  (no special tokens), right-padded with -1; None -> all -1 (never right).
  Raises ValueError if an answer needs more than ``width`` tokens."""
  out = np.full((len(answers), width), -1, np.int32)
  for i, ans in enumerate(answers):
    if ans is None:
      continue
    ids = tokenizer.encode(str(ans).strip(), add_special_tokens=False)
    if len(ids) > width:
      raise ValueError(f"answer {ans!r} has {len(ids)} tokens > answer width {width}")
    out[i, : len(ids)] = ids
  return out


def _char_ids(tokenizer) -> dict[str, int]:
  """{character: its single token id} for the characters the arithmetic
  check reads; ValueError unless the tokenizer is character level there."""
  out = {}
  for ch in _NEEDED + _WHITESPACE:
    ids = tokenizer.encode(ch, add_special_tokens=False)
    if len(ids) == 1 and tokenizer.decode(ids) == ch:
      out[ch] = int(ids[0])
    elif ch in _NEEDED:
      raise ValueError(
        f"the JAX arithmetic verifier needs a character-level tokenizer: {ch!r} "
        f"encodes to {ids}; use HostVerifier"
      )
  return out


@dataclasses.dataclass(frozen=True)
class ArithmeticVerifier:
  """JAX-native ``ans=`` checker (see the module docstring) on token ids.

  Attributes:
    ids: ((character, token id), ...) of ``ans=-``, the digits and the
      whitespace characters that are single tokens.
    special: the tokenizer's special token ids (skipped, as the host decode
      with ``skip_special_tokens`` does).
  """

  ids: tuple[tuple[str, int], ...]
  special: tuple[int, ...] = ()

  @classmethod
  def from_tokenizer(cls, tokenizer) -> ArithmeticVerifier:
    """Checks that every token decodes to at most one character (so token
    and character positions agree); ValueError otherwise."""
    size = len(tokenizer)
    if size > 4096:
      raise ValueError(
        f"the JAX arithmetic verifier needs a character-level tokenizer (got {size} tokens)"
      )
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    for i in range(size):
      if i not in special and len(tokenizer.decode([i])) > 1:
        raise ValueError(
          f"token {i} decodes to {tokenizer.decode([i])!r}: the JAX arithmetic "
          "verifier needs a character-level tokenizer; use HostVerifier"
        )
    return cls(tuple(sorted(_char_ids(tokenizer).items())), tuple(sorted(int(i) for i in special)))

  def __call__(self, tokens, mask, answer_ids) -> jax.Array:
    """1.0 where the first ``ans\\s*=\\s*(-?\\d+)`` of the completion equals
    the answer exactly, else 0.0. [R] float32."""
    ids = dict(self.ids)
    t = jnp.asarray(tokens, jnp.int32)
    # Drop special tokens and padding (the host decode skips them): a stable
    # sort moves the kept tokens, in order, to the front.
    drop = ~jnp.asarray(mask, bool)
    for sid in self.special:
      drop = drop | (t == sid)
    t = jnp.take_along_axis(jnp.where(drop, -1, t), jnp.argsort(drop, axis=1, stable=True), axis=1)
    r, n = t.shape
    t = jnp.concatenate([t, jnp.full((r, 1), -1, jnp.int32)], axis=1)  # sentinel at n
    pos = jnp.arange(n + 1)
    is_ = lambda ch: t == ids[ch]
    ws = jnp.zeros(t.shape, bool)
    for ch in _WHITESPACE:
      if ch in ids:
        ws = ws | is_(ch)
    digit = jnp.zeros(t.shape, bool)
    for ch in "0123456789":
      digit = digit | is_(ch)
    # nxt[j]: first non-whitespace position >= j; run[j]: digits from j on.
    nxt = jax.lax.cummin(jnp.where(ws, n, pos), axis=1, reverse=True)
    run = _digit_runs(digit)
    at = lambda x, j: jnp.take_along_axis(x, jnp.clip(j, 0, n), axis=1)
    shift = lambda x, k: jnp.concatenate([x[:, k:], jnp.zeros((r, k), x.dtype)], axis=1)
    starts = is_("a") & shift(is_("n"), 1) & shift(is_("s"), 2)
    j1 = at(nxt, pos[None] + 3)  # after "ans" and \s*
    eq = at(is_("="), j1)
    j2 = at(nxt, j1 + 1)  # after "=" and \s*
    neg = at(is_("-"), j2)
    j3 = j2 + neg.astype(jnp.int32)
    digits = at(run, j3)
    match = starts & eq & (digits > 0) & (pos[None] + 3 <= n)
    first = jnp.argmax(match, axis=1)  # the regex's leftmost match
    found = jnp.any(match, axis=1)
    row = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]
    start, length = row(j2), row(j3) - row(j2) + row(digits)
    ans = jnp.asarray(answer_ids, jnp.int32)
    a = ans.shape[1]
    ans_len = jnp.sum(ans >= 0, axis=1)
    k = jnp.arange(a)
    pred = jnp.take_along_axis(t, jnp.clip(start[:, None] + k[None], 0, n), axis=1)
    same = jnp.all((k[None] >= ans_len[:, None]) | (pred == ans), axis=1)
    return (found & (length == ans_len) & (ans_len > 0) & same).astype(jnp.float32)


def _digit_runs(digit: jax.Array) -> jax.Array:
  """[R, L] int32: the number of consecutive digits starting at each
  position (0 where there is none), by a reverse scan."""

  def step(carry, col):
    out = jnp.where(col, carry + 1, 0)
    return out, out

  _, runs = jax.lax.scan(step, jnp.zeros(digit.shape[:1], jnp.int32), digit.T, reverse=True)
  return runs.T


@dataclasses.dataclass(frozen=True, eq=False)
class HostVerifier:
  """A task's host ``score(answer, completion_text)`` inside the compiled
  step via ``jax.pure_callback`` (the completion decoded with the tokenizer,
  special tokens skipped; the answer decoded from ``answer_ids``). Hashes by
  identity (one verifier object per run)."""

  task: Any
  tokenizer: Any

  def _score(self, tokens, mask, answer_ids) -> np.ndarray:
    out = np.zeros(tokens.shape[0], np.float32)
    for i in range(tokens.shape[0]):
      ans = [int(x) for x in answer_ids[i] if x >= 0]
      if not ans:
        continue
      text = self.tokenizer.decode(
        [int(x) for x, m in zip(tokens[i], mask[i]) if m], skip_special_tokens=True
      )
      out[i] = float(self.task.score(self.tokenizer.decode(ans), text))
    return out

  def __call__(self, tokens, mask, answer_ids) -> jax.Array:
    shape = jax.ShapeDtypeStruct((tokens.shape[0],), jnp.float32)
    return jax.pure_callback(
      lambda t, m, a: self._score(np.asarray(t), np.asarray(m), np.asarray(a)),
      shape,
      tokens,
      mask,
      answer_ids,
    )


def make_verifier(task, tokenizer):
  """The JAX-native verifier for the arithmetic task on a character-level
  tokenizer, else the task's host verifier (:class:`HostVerifier`)."""
  if getattr(task, "name", None) == "arithmetic":
    try:
      return ArithmeticVerifier.from_tokenizer(tokenizer)
    except ValueError:
      pass
  return HostVerifier(task, tokenizer)
