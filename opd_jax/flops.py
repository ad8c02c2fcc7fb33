"""Analytic model FLOPs of the OPD step, and peak FLOP/s per device (for MFU).

2 FLOPs per multiply-add. R rows (prompts x samples), P prompt length, N new
tokens, T = P + N, for a model with L layers, hidden D, H query / K kv heads
of size Dh, MLP width F, over the common vocabulary V:

  M    = D·(H + 2K)·Dh + H·Dh·D + 3·D·F   matmul weights per layer and token
  A(S) = 2·H·Dh·S                         attention MACs per query and layer
                                          over S keys (QKᵀ and PV)
  fwd(tokens, S) = 2·L·(M + A(S))·tokens  (no lm head)
  head(tokens)   = 2·D·V·tokens

  sampling  fwd(R·P, T) + fwd(R·(N−1), T) + head(R·N)   (prefill, N−1 decode
            steps, N lm-head rows; the cache has T slots, attended densely)
  teacher   fwd(R·T, T) + head(R·N)                      (scores prompt+completion)
  student   3·(fwd(R·T, T) + head(R·N))                  forward + backward

i.e. 2·params·tokens per forward, x3 for forward+backward, plus attention as
executed (dense masked T×T, no causal skipping); the loss's custom VJP forms
the logit gradient in its forward pass, so no head is recomputed. These are *model* FLOPs:
rematerialisation (``remat``) recomputes the forward in the backward pass but
is not counted, so MFU = model FLOPs / time / peak, the usual definition.
With GKD's on/off-policy mix only the λ·R on-policy rows are sampled by the
student; off-policy rows are sampled by the teacher (``off_policy_source =
"teacher"``) or read from the dataset (no sampling). The sampling count assumes
the decode loop runs all N steps (it stops early once every row has ended, so
with short responses the true count is lower).
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Dense bf16 peak FLOP/s per chip, by a lower-case substring of
# ``jax.Device.device_kind`` (first match wins: the more specific names first).
PEAK_FLOPS_BF16 = (
  ("v6 lite", 918e12),
  ("v6e", 918e12),  # TPU v6e (Trillium)
  ("v5 lite", 197e12),
  ("v5e", 197e12),  # TPU v5e
  ("v5p", 459e12),
  ("tpu v5", 459e12),  # TPU v5p
  ("tpu v4", 275e12),
  ("h200", 989e12),
  ("h100 pcie", 756e12),
  ("h100", 989e12),  # SXM unless PCIe
  ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of ``device_kind`` (None: unknown, e.g. CPU)."""
  kind = device_kind.lower()
  for key, value in PEAK_FLOPS_BF16:
    if key in kind:
      return value
  return None


def forward_flops(c: Any, tokens: int, keys: int) -> int:
  """fwd(tokens, S) = 2·L·(M + A(S))·tokens of a ``ModelConfig`` (no lm head)."""
  d, h, k, dh, f = (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size)
  m = d * (h + 2 * k) * dh + h * dh * d + 3 * d * f
  return 2 * c.num_layers * (m + 2 * h * dh * keys) * tokens


def head_flops(c: Any, tokens: int, vocab: int) -> int:
  """head(tokens) = 2·D·V·tokens."""
  return 2 * c.hidden_size * vocab * tokens


def sampling_flops(c: Any, rows: int, prompt_len: int, new_tokens: int, vocab: int) -> int:
  """Prefill of P tokens, N−1 decode steps over a T-slot cache, N head rows."""
  if rows == 0 or new_tokens == 0:
    return 0
  t = prompt_len + new_tokens
  return (
    forward_flops(c, rows * prompt_len, t)
    + forward_flops(c, rows * (new_tokens - 1), t)
    + head_flops(c, rows * new_tokens, vocab)
  )


def opd_step_flops(
  student: Any,
  teacher: Any | None,
  rows: int,
  prompt_len: int,
  new_tokens: int,
  vocab: int,
  *,
  on_policy_rows: int | None = None,
  teacher_sampled_rows: int = 0,
  sequence_prepass: bool = False,
) -> dict[str, int]:
  """Model FLOPs of one OPD step (module docstring), all devices together.

  ``on_policy_rows`` (default: all ``rows``) are sampled by the student,
  ``teacher_sampled_rows`` by the teacher; ``teacher=None``: no teacher pass.
  ``sequence_prepass``: the loss reads the rows' sequence-mean log-probs
  (DistiLLM-2's adaptive α), one more forward head(R·N) of each model.
  Returns ``sampling``, ``teacher``, ``student_fwd_bwd`` and their ``total``.
  """
  r, p, n = rows, prompt_len, new_tokens
  t = p + n
  on = r if on_policy_rows is None else on_policy_rows
  out = {
    "sampling": sampling_flops(student, on, p, n, vocab),
    "teacher": 0,
    "student_fwd_bwd": 3 * (forward_flops(student, r * t, t) + head_flops(student, r * n, vocab)),
  }
  if teacher is not None:
    out["sampling"] += sampling_flops(teacher, teacher_sampled_rows, p, n, vocab)
    out["teacher"] = forward_flops(teacher, r * t, t) + head_flops(teacher, r * n, vocab)
  if sequence_prepass:
    out["student_fwd_bwd"] += head_flops(student, r * n, vocab)
    out["teacher"] += head_flops(teacher, r * n, vocab)
  out["total"] = out["sampling"] + out["teacher"] + out["student_fwd_bwd"]
  return out


def step_flops(
  cfg: Any, student: Any, teacher: Any | None, *, batch_size: int, prompt_len: int, vocab: int
) -> dict[str, int]:
  """:func:`opd_step_flops` of the step ``cfg`` (an ``OPDConfig``) builds for
  ``batch_size`` prompts of ``prompt_len`` tokens: R = batch·num_samples,
  N = max_new_tokens, λ·R rows on-policy (``opd_step.split_rows``; all R, and
  all R teacher-sampled with that source, when λ is scheduled)."""
  from opd_jax.losses import needs_sequence_logps
  from opd_jax.opd_step import lambda_scheduled, split_rows

  if cfg.teachers and isinstance(teacher, (tuple, list)):  # multi-teacher: per teacher's rows
    one = dataclasses.replace(cfg, teachers=())
    parts = [
      step_flops(one, student, t, batch_size=q, prompt_len=prompt_len, vocab=vocab)
      for (_, q), t in zip(cfg.teachers, teacher)
    ]
    return {k: sum(p[k] for p in parts) for k in parts[0]}
  rows = batch_size * cfg.sampling.num_samples
  on = split_rows(rows, cfg.on_policy_fraction)
  by_teacher = rows - on if cfg.off_policy_source == "teacher" else 0
  if lambda_scheduled(cfg):  # every row sampled by the student and off-policy
    on, by_teacher = rows, rows if cfg.off_policy_source == "teacher" else 0
  return opd_step_flops(
    student,
    teacher,
    rows,
    prompt_len,
    cfg.sampling.max_new_tokens,
    vocab,
    on_policy_rows=on,
    teacher_sampled_rows=by_teacher,
    sequence_prepass=needs_sequence_logps(cfg.loss, dict(cfg.loss_kwargs)),
  )
