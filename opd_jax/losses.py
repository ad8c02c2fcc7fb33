"""Per-token divergences for on-policy distillation, behind a name registry.

Every loss scores one chunk of positions and has the signature

  fn(student_logits [B, C, V] f32, teacher_logits [B, C, V] f32 | None,
     tokens [B, C] int32, *, student_temperature=1.0, teacher_temperature=1.0,
     **loss_kwargs) -> per_token_loss [B, C] f32

with p = softmax(s / τ_s) the student and q = softmax(t / τ_t) the teacher at
each position, and ``tokens`` the token y_t scored at each position (already
aligned by the caller). No τ² rescaling is applied. Masking and reduction are
the caller's, through :func:`aggregate_weights` / :func:`aggregate`.

Conventions:
  * Gradients flow into ``student_logits`` only; teacher logits are
    stop-gradient'ed here again.
  * Padded vocabulary entries arrive as finite logits of -1e30: they get
    probability exactly 0 and every 0·log 0 is taken as 0 (double ``where``
    guards, so neither values nor gradients NaN).
  * Hyperparameters are Python numbers / strings (static under jit): e.g. JSD
    special-cases β ∈ {0, 1} in Python, as TRL does.
  * ``tokens`` outside [0, V) are clipped (so masked positions may hold any
    id); they should not point at padded vocabulary columns where the
    estimator losses (k2, k3) could overflow.

Notation in docstrings: KL(a‖b) = Σ_v a(v)(log a(v) − log b(v)); sg = stop
gradient.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from opd_jax.registry import Registry

# needs_teacher: reads teacher logits; row_role: reads ``on_policy`` [B, C] bool
# (True where the position's row is a student sample); outcome: reads
# ``outcome_reward`` [B, C] f32 (the verifier's reward of the row's completion)
# and ``outcome_group`` [B, C] int32 (the row's prompt: GRPO groups);
# sequence_logps: the name of the loss's bool keyword that, when True, makes it
# read ``seq_logp`` / ``seq_logq`` [B, C] f32 (the row's mean log p(y_t) / log
# q(y_t) over its response tokens, at the loss's temperatures; no gradient),
# or "" (never). All constant along C and passed by the step.
LOSSES = Registry("loss", needs_teacher=True, row_role=False, outcome=False, sequence_logps="")
OUTCOME_INPUTS = ("outcome_reward", "outcome_group")
SEQUENCE_INPUTS = ("seq_logp", "seq_logq")
# Per-position inputs the step passes, never config.
ROW_INPUTS = ("on_policy",) + OUTCOME_INPUTS + SEQUENCE_INPUTS

_TOPK_STRATEGIES = ("student", "teacher", "union", "intersection")
_TOPK_WEIGHTS = ("student", "teacher", "none")
_ESTIMATOR_MODES = ("direct", "reward")
AGGREGATE_MODES = ("token_mean", "sequence_mean", "constant")


# ----------------------------------------------------------------------------
# Validation helpers (run at trace time; hyperparameters are static).
# ----------------------------------------------------------------------------


def _check_choice(arg: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{arg}={value!r} is not valid; valid: {list(choices)}")


def _check_range(
  arg: str, value: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False
) -> None:
  """Checks lo ≤ value ≤ hi (or open ends) for concrete Python numbers."""
  if not isinstance(value, numbers.Real):
    return  # a traced value: cannot check here.
  bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
  if bad:
    interval = ("(" if lo_open else "[") + f"{lo}, {hi}" + (")" if hi_open else "]")
    raise ValueError(f"{arg}={value!r} must lie in {interval}")


def _check_temperatures(student_temperature, teacher_temperature) -> None:
  _check_range(
    "student_temperature", student_temperature, 0.0, math.inf, lo_open=True, hi_open=True
  )
  _check_range(
    "teacher_temperature", teacher_temperature, 0.0, math.inf, lo_open=True, hi_open=True
  )


# ----------------------------------------------------------------------------
# Numerics.
# ----------------------------------------------------------------------------


def _log_softmax(logits: jax.Array, temperature: float) -> jax.Array:
  """log softmax(logits / τ) over the last axis, in f32. [..., V]."""
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32) / temperature, axis=-1)


def _log_probs(
  student_logits, teacher_logits, student_temperature, teacher_temperature
) -> tuple[jax.Array, jax.Array]:
  """(log p, log q), each [B, C, V]; q carries no gradient."""
  _check_temperatures(student_temperature, teacher_temperature)
  if teacher_logits is None:
    raise ValueError("this loss needs teacher_logits (got None)")
  logp = _log_softmax(student_logits, student_temperature)
  logq = _log_softmax(jax.lax.stop_gradient(teacher_logits), teacher_temperature)
  return logp, jax.lax.stop_gradient(logq)


def _kl(log_a: jax.Array, log_b: jax.Array) -> jax.Array:
  """KL(a‖b) = Σ_v a(v)(log a(v) − log b(v)) over the last axis, 0·log0 := 0.

  Args:
    log_a: [..., V] log-probabilities of a.
    log_b: [..., V] log-probabilities of b.

  Returns:
    [...] KL divergence. Terms with a(v) = 0 are exactly 0 in value and
    gradient (the difference itself is guarded, so no 0·inf either).
  """
  a = jnp.exp(log_a)
  live = a > 0
  diff = jnp.where(live, log_a - log_b, 0.0)
  return jnp.sum(jnp.where(live, a * diff, 0.0), axis=-1)


def _log_mixture(log_a: jax.Array, log_b: jax.Array, weight_a: float | jax.Array) -> jax.Array:
  """log(w·a + (1 − w)·b) elementwise for a weight w ∈ [0, 1]: a Python
  number (endpoints special-cased) or a traced scalar (a scheduled value;
  log 0 = −inf drops that side exactly)."""
  if not isinstance(weight_a, numbers.Real):
    w = jnp.asarray(weight_a, jnp.float32)
    return jnp.logaddexp(log_a + jnp.log(w), log_b + jnp.log1p(-w))
  if weight_a == 0:
    return log_b
  if weight_a == 1:
    return log_a
  return jnp.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _gather(logp: jax.Array, tokens: jax.Array) -> jax.Array:
  """logp[b, c, tokens[b, c]] -> [B, C]; out-of-range ids are clipped."""
  idx = jnp.asarray(tokens, jnp.int32)[..., None]
  return jnp.take_along_axis(logp, idx, axis=-1, mode="clip")[..., 0]


def _topk_mask(scores: jax.Array, k: int) -> jax.Array:
  """Boolean [..., V] mask of the k largest entries of ``scores`` per row.

  Fixed shapes: ``lax.top_k`` indices scattered into a [N, V] mask (k is
  clipped to V; k ≥ V selects everything).
  """
  v = scores.shape[-1]
  if k >= v:
    return jnp.ones(scores.shape, bool)
  flat = scores.reshape(-1, v)
  _, idx = jax.lax.top_k(flat, k)  # [N, k]
  rows = jnp.arange(flat.shape[0])[:, None]
  mask = jnp.zeros(flat.shape, bool).at[rows, idx].set(True)
  return mask.reshape(scores.shape)


# ----------------------------------------------------------------------------
# Full-vocabulary divergences.
# ----------------------------------------------------------------------------


@LOSSES.register("forward_kl")
def forward_kl(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Forward KL(q‖p) = Σ_v q(v)(log q(v) − log p(v)) per position. [B, C].

  Mass-covering supervised KD objective (Hinton et al. 2015; GKD, Agarwal et
  al. 2024, β = 0). ``tokens`` is unused.
  """
  del tokens
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return _kl(logq, logp)


@LOSSES.register("reverse_kl")
def reverse_kl(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Reverse KL(p‖q) = Σ_v p(v)(log p(v) − log q(v)) over the full vocabulary.

  Full-vocabulary OPD (arXiv 2604.13016 §2; MiniLLM, Gu et al. 2024;
  GKD β = 1). Differentiated directly (exact gradient, not a surrogate).
  [B, C]. ``tokens`` is unused.
  """
  del tokens
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return _kl(logp, logq)


@LOSSES.register("jsd")
def jsd(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  beta: float = 0.5,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Generalised JSD of GKD (Agarwal et al. 2024, Eq. 1), TRL convention.

  JSD_β = β·KL(q‖m) + (1 − β)·KL(p‖m),  m = β·q + (1 − β)·p,

  exactly as TRL's ``GKDTrainer.generalized_jsd_loss`` (mixture
  ``logsumexp([log p + log(1 − β), log q + log β])``, ``jsd = β·kl_teacher +
  (1 − β)·kl_student``). The endpoints are special-cased like TRL:
  β = 0 → forward KL(q‖p), β = 1 → reverse KL(p‖q). (The formula itself tends
  to 0 at both ends, so the family is discontinuous there by construction.)
  A traced β (a schedule, a vmapped sweep) selects among the three with
  ``jnp.where``. [B, C]. ``tokens`` is unused.
  """
  del tokens
  _check_range("beta", beta, 0.0, 1.0)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  if isinstance(beta, numbers.Real):
    if beta == 0:
      return _kl(logq, logp)
    if beta == 1:
      return _kl(logp, logq)
  logm = _log_mixture(logq, logp, beta)
  mixed = beta * _kl(logq, logm) + (1.0 - beta) * _kl(logp, logm)
  if isinstance(beta, numbers.Real):
    return mixed
  return jnp.where(beta == 0, _kl(logq, logp), jnp.where(beta == 1, _kl(logp, logq), mixed))


@LOSSES.register("skew_kl")
def skew_kl(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  alpha: float = 0.1,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Skew KL(q ‖ α·q + (1 − α)·p) (DistiLLM, Ko et al. 2024). [B, C].

  α = 0 is forward KL(q‖p); α = 1 is identically 0. ``tokens`` is unused.
  """
  del tokens
  _check_range("alpha", alpha, 0.0, 1.0)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return _kl(logq, _log_mixture(logq, logp, alpha))


@LOSSES.register("skew_rkl")
def skew_rkl(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  alpha: float = 0.1,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Skew reverse KL(p ‖ α·p + (1 − α)·q) (DistiLLM, Ko et al. 2024). [B, C].

  α = 0 is reverse KL(p‖q); α = 1 is identically 0. ``tokens`` is unused.
  """
  del tokens
  _check_range("alpha", alpha, 0.0, 1.0)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return _kl(logp, _log_mixture(logp, logq, alpha))


@LOSSES.register("tvd")
def tvd(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Total variation ½·Σ_v |p(v) − q(v)| (e.g. Wen et al. 2023, f-DISTILL).

  [B, C]. ``tokens`` is unused.
  """
  del tokens
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(logp) - jnp.exp(logq)), axis=-1)


# ----------------------------------------------------------------------------
# Sampled-token estimators (Schulman, "Approximating KL divergence", 2020).
# ----------------------------------------------------------------------------


def _estimator(k_value: jax.Array, logp_y: jax.Array, mode: str) -> jax.Array:
  """'direct': k itself; 'reward': sg(k)·log p(y) (policy-gradient form)."""
  _check_choice("mode", mode, _ESTIMATOR_MODES)
  if mode == "direct":
    return k_value
  return jax.lax.stop_gradient(k_value) * logp_y


def _sampled_log_probs(
  student_logits, teacher_logits, tokens, student_temperature, teacher_temperature
):
  """(log p(y), log q(y)), each [B, C]."""
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  return _gather(logp, tokens), _gather(logq, tokens)


@LOSSES.register("k1")
@LOSSES.register("sampled_reverse_kl")
def k1(
  student_logits,
  teacher_logits,
  tokens,
  *,
  mode: str = "reward",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """k1 = −log r = log p(y) − log q(y), r = q(y)/p(y), y ~ p (Schulman). [B, C].

  Sampled-token OPD (arXiv 2604.13016 §2; the "reverse KL as per-token
  reward" recipe). Also registered as ``sampled_reverse_kl``.
    mode="reward" (default): loss = sg(k1)·log p(y), i.e. −sg(reward)·log p(y)
      with reward = −k1. E_{y~p}[∇loss] = Σ_y p(y)(log p(y) − log q(y))∇log p(y)
      = ∇KL(p‖q): an unbiased full-KL gradient. The loss VALUE is a surrogate.
    mode="direct": loss = k1; E_{y~p}[∇k1] = E_p[∇log p] = 0 (no signal in
      expectation; for completeness / ablations).
  """
  logp_y, logq_y = _sampled_log_probs(
    student_logits, teacher_logits, tokens, student_temperature, teacher_temperature
  )
  return _estimator(logp_y - logq_y, logp_y, mode)


@LOSSES.register("k2")
def k2(
  student_logits,
  teacher_logits,
  tokens,
  *,
  mode: str = "direct",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """k2 = ½(log r)², log r = log q(y) − log p(y), y ~ p (Schulman). [B, C].

  mode="direct" (default): ∇k2 = (log p(y) − log q(y))∇log p(y), so
    E_{y~p}[∇k2] = ∇KL(p‖q) (same expected gradient as k1 in reward form).
  mode="reward": loss = sg(k2)·log p(y).
  """
  logp_y, logq_y = _sampled_log_probs(
    student_logits, teacher_logits, tokens, student_temperature, teacher_temperature
  )
  log_r = logq_y - logp_y
  return _estimator(0.5 * jnp.square(log_r), logp_y, mode)


@LOSSES.register("k3")
def k3(
  student_logits,
  teacher_logits,
  tokens,
  *,
  mode: str = "direct",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """k3 = (r − 1) − log r, r = q(y)/p(y), y ~ p (Schulman; GRPO's KL term).

  mode="direct" (default): ∇k3 = (1 − r)∇log p(y), so E_{y~p}[∇k3] =
    −Σ_v q(v)∇log p(v) = ∇KL(q‖p): the FORWARD-KL gradient, although the
    value estimates KL(p‖q).
  mode="reward": loss = sg(k3)·log p(y).
  [B, C].
  """
  logp_y, logq_y = _sampled_log_probs(
    student_logits, teacher_logits, tokens, student_temperature, teacher_temperature
  )
  log_r = logq_y - logp_y
  return _estimator(jnp.expm1(log_r) - log_r, logp_y, mode)


# ----------------------------------------------------------------------------
# Top-k OPD (arXiv 2604.13016, Eq. 5).
# ----------------------------------------------------------------------------


def _support(logp_sg: jax.Array, logq: jax.Array, k: int, strategy: str) -> jax.Array:
  """S_t as a [..., V] bool mask from (sg) student and teacher log-probs."""
  if strategy == "student":
    return _topk_mask(logp_sg, k)
  if strategy == "teacher":
    return _topk_mask(logq, k)
  if strategy == "union":
    return _topk_mask(logp_sg, k) | _topk_mask(logq, k)
  return _topk_mask(logp_sg, k) & _topk_mask(logq, k)


def topk_support_mask(
  student_logits,
  teacher_logits,
  *,
  k: int = 16,
  strategy: str = "student",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Candidate set S_t of top-k OPD as a boolean [B, C, V] mask (no gradient).

  S_stu = TopK(p_t, k) of the pre-update student (sg of the student logits),
  T = TopK(q_t, k); strategy "student" → S_stu, "teacher" → T, "union" →
  S_stu ∪ T, "intersection" → S_stu ∩ T (arXiv 2604.13016 Eq. 5 and the
  official code's only_stu / only_tch / union / intersection). k is clipped to
  V. Ties are broken by ``lax.top_k`` (lowest index first). Also usable for
  the overlap metrics (Eq. 6: |S_t ∩ T_t| / k).
  """
  _check_choice("strategy", strategy, _TOPK_STRATEGIES)
  if not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"k={k!r} must be an integer ≥ 1 for a candidate set")
  logp, logq = _log_probs(
    jax.lax.stop_gradient(student_logits), teacher_logits, student_temperature, teacher_temperature
  )
  return _support(logp, logq, k, strategy)


@LOSSES.register("topk_opd")
def topk_opd(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  k: int = 16,
  strategy: str = "student",
  weight: str = "student",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Top-k OPD as policy gradient (arXiv 2604.13016 Eq. 5 + official code).

  S_t from :func:`topk_support_mask` (pre-update student = sg(student));
  per-candidate reward with FULL-vocabulary log-probs
    r_t(v) = −w_t(v)·(log p_t(v) − log q_t(v)),  v ∈ S_t,
  w_t(v) = p_t(v)/Σ_{u∈S_t} p_t(u) (weight="student"), q_t renormalised on
  S_t ("teacher"), or 1/|S_t| ("none"); and
    loss_t = −Σ_{v∈S_t} sg(r_t(v))·log p_t(v).   [B, C]
  The value is the policy-gradient surrogate, NOT a divergence. With k ≥ V,
  strategy="student", weight="student": ∇loss = Σ_v p(v)(log p − log q)∇log p
  = ∇KL(p‖q) exactly (full-vocabulary OPD), though the value differs from KL.
  k = 0 is the official code's sampled-token mode on ``tokens`` y:
  loss = sg(log p(y) − log q(y))·log p(y) (= ``k1`` in reward form).
  Entries with p(v) = q(v) = 0 (padded vocabulary) never enter S_t. If S_t is
  empty (possible for "intersection") the loss is 0.
  """
  _check_choice("strategy", strategy, _TOPK_STRATEGIES)
  _check_choice("weight", weight, _TOPK_WEIGHTS)
  if not isinstance(k, numbers.Integral) or k < 0:
    raise ValueError(f"k={k!r} must be an integer ≥ 0 (0 = sampled token)")
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  if k == 0:
    if tokens is None:
      raise ValueError("topk_opd with k=0 (sampled-token mode) needs tokens")
    logp_y, logq_y = _gather(logp, tokens), _gather(logq, tokens)
    return jax.lax.stop_gradient(logp_y - logq_y) * logp_y

  logp_sg = jax.lax.stop_gradient(logp)
  p_sg, q = jnp.exp(logp_sg), jnp.exp(logq)
  support = _support(logp_sg, logq, k, strategy) & ((p_sg > 0) | (q > 0))
  if weight == "student":
    raw = jnp.where(support, p_sg, 0.0)
  elif weight == "teacher":
    raw = jnp.where(support, q, 0.0)
  else:
    raw = support.astype(jnp.float32)
  total = jnp.sum(raw, axis=-1, keepdims=True)
  w = raw / jnp.where(total > 0, total, 1.0)
  # coef = −sg(r) = sg(w·(log p − log q)), guarded off the support.
  coef = jax.lax.stop_gradient(jnp.where(support, w * jnp.where(support, logp_sg - logq, 0.0), 0.0))
  return jnp.sum(jnp.where(support, coef * logp, 0.0), axis=-1)


# ----------------------------------------------------------------------------
# Objectives researchers compare against (issue #18).
# ----------------------------------------------------------------------------


_DISTILLM2_EPS = 1e-5  # the official code's denominator guard
_DISTILLM2_ALPHA_MIN = 0.01  # the official clip floor


def distillm2_alpha(gap: jax.Array, base: float | jax.Array, anchor: float | jax.Array):
  """DistiLLM-2's adaptive skew coefficient per row (official ``distillm_v2``
  ``get_batch_logps``), elementwise:

    α_i = clip(1 − (1 − α_0)·Δ_0 / (Δ_i + 1e-5), 0.01, α_0)

  with ``gap`` Δ_i the row's sequence-level probability gap, ``base`` α_0 and
  ``anchor`` Δ_0 (see :func:`distillm2`). α_i = α_0 at Δ_i = Δ_0, falls to
  0.01 as the gap closes (Δ_i ≤ 0.9·Δ_0·(1 − α_0)/0.99 or so), never exceeds
  α_0 (wider gaps, negative gaps); a 0/0 (Δ_0 = 0, Δ_i = −1e-5) reads as α_0.
  No gradient (a coefficient)."""
  gap = jax.lax.stop_gradient(jnp.asarray(gap, jnp.float32))
  num = (1.0 - jnp.asarray(base, jnp.float32)) * jnp.asarray(anchor, jnp.float32)
  den = gap + _DISTILLM2_EPS
  ratio = jnp.where(num == 0, 0.0, num / jnp.where(den == 0, 1.0, den))
  ratio = jnp.where((num != 0) & (den == 0), jnp.sign(num) * jnp.inf, ratio)
  alpha = jnp.minimum(jnp.maximum(1.0 - ratio, _DISTILLM2_ALPHA_MIN), base)
  return jax.lax.stop_gradient(alpha)


def _check_distillm2(alpha_teacher, alpha_student, beta, adaptive_alpha, anchors, on_policy, seq):
  _check_range("alpha_teacher", alpha_teacher, 0.0, 1.0, hi_open=True)
  _check_range("alpha_student", alpha_student, 0.0, 1.0, hi_open=True)
  _check_range("beta", beta, 0.0, 2.0)
  if not isinstance(adaptive_alpha, bool):
    raise ValueError(f"adaptive_alpha={adaptive_alpha!r} must be a bool")
  if on_policy is None:
    raise ValueError(
      "distillm2 needs on_policy (the row role, [B, C] bool; the OPD step passes it)"
    )
  if not adaptive_alpha:
    return
  for arg, value in zip(("anchor_teacher", "anchor_student"), anchors):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      if value is None or isinstance(value, (bool, str)):
        raise ValueError(f"{arg}={value!r} must be a number")
      continue  # traced (a schedule / sweep point)
    if not (math.isfinite(value) and value > 0):
      raise ValueError(
        f"distillm2 with adaptive_alpha=True needs {arg} > 0 (got {value!r}; 0 = unset): "
        "the anchor gap Δ_0 of that row role, a statistic of the initial models "
        "(opd_step.distillm2_anchors)"
      )
  if any(v is None for v in seq):
    raise ValueError(
      "distillm2 with adaptive_alpha=True needs seq_logp and seq_logq "
      "([B, C]; the step passes them)"
    )


def _distillm2_alphas(
  alpha_teacher, alpha_student, adaptive_alpha, anchor_teacher, anchor_student, seq_logp, seq_logq
):
  """(α_t, α_s): the base numbers, or per position [B, C, 1] (adaptive α)."""
  if not adaptive_alpha:
    return alpha_teacher, alpha_student
  pt = jnp.exp(jax.lax.stop_gradient(jnp.asarray(seq_logp, jnp.float32)))
  qt = jnp.exp(jax.lax.stop_gradient(jnp.asarray(seq_logq, jnp.float32)))
  a_t = distillm2_alpha(qt - pt, alpha_teacher, anchor_teacher)  # teacher response: q − p
  a_s = distillm2_alpha(pt - qt, alpha_student, anchor_student)  # student response: p − q
  return a_t[..., None], a_s[..., None]


@LOSSES.register("distillm2", row_role=True, sequence_logps="adaptive_alpha")
def distillm2(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  on_policy=None,
  seq_logp=None,
  seq_logq=None,
  alpha_teacher: float = 0.1,
  alpha_student: float = 0.1,
  beta: float = 1.0,
  adaptive_alpha: bool = False,
  anchor_teacher: float = 0.0,
  anchor_student: float = 0.0,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """DistiLLM-2 contrastive loss (CALD; Ko et al., ICML 2025, arXiv 2503.07067,
  Eq. 4 and the official ``distillm_v2`` trainer loss). [B, C].

  Per position, by the role of its row (``on_policy`` [B, C] bool, from the
  step's per-sample on/off-policy mix):
    off-policy row (teacher response y ~ q, off_policy_source="teacher"):
      (2 − β)·KL(q ‖ α_t·q + (1 − α_t)·p)          skew KL: raises p(y_teacher)
    on-policy row (student response y ~ p):
      β·KL(p ‖ α_s·sg(p) + (1 − α_s)·q)            skew reverse KL: lowers p(y_student)
  The student inside the reverse term's mixture is stop-gradient'ed, as in
  the official code (``student_vocab_logps.detach()``), so this reverse term
  differs in gradient from ``skew_rkl``. β = 1 weighs the two equally.

  Coefficient schedules of the official code (``distillm_v2`` trainer):
    * gradual β: β(t) = 1 + 0.5·min(1, 2t/T) over T training steps (more
      weight on the student-response term as training goes on). A plain
      schedule over steps: ``config.schedules =
      distillm2_beta_schedule(T)`` = ``"loss.beta=linear:1.0:1.5:0:T/2"``
      (exact for even T; tested against the formula).
    * adaptive α (``adaptive_alpha=True``; the paper's curriculum-based α,
      read from the official ``get_batch_logps``): per row i,
        α_t,i = clip(1 − (1 − α_t)·Δ0_t / (Δ_i + 1e-5), 0.01, α_t),
          Δ_i = exp(mean_t log q(y_t)) − exp(mean_t log p(y_t))   (teacher rows),
        α_s,i = clip(1 − (1 − α_s)·Δ0_s / (Δ_i + 1e-5), 0.01, α_s),
          Δ_i = exp(mean_t log p(y_t)) − exp(mean_t log q(y_t))   (student rows)
      (:func:`distillm2_alpha`): the sequence-level gap between the two
      models' geometric-mean token probabilities of the row's response. The
      means come in as ``seq_logp`` / ``seq_logq`` [B, C] (the row's mean over
      its response tokens, at these temperatures; the step computes them in a
      forward-only pre-pass over the sequence, no gradient: α is a
      coefficient). α_i = α_0 at the anchor gap and drops towards 0.01 as the
      student closes the gap: a per-sample curriculum as training goes on.
      The anchors ``anchor_teacher`` Δ0_t / ``anchor_student`` Δ0_s are fixed
      numbers in the step: this function needs both > 0 (ValueError naming
      the one missing); left 0 (unset) in a run's config, the driver measures
      them at start-up on the run's first logging window with the initial
      models (``train.measure_distillm2_anchors``) and saves them in the
      resolved config (a resume reads them back).
      The official trainer sets them once, at its first log() call, to the
      mean over the first logging window of the batch-mean gaps on teacher
      (chosen) and student (rejected) rows, i.e. a statistic of the
      (near-)initial models, and runs base α until then;
      ``opd_step.distillm2_anchors`` (CLI: ``experiments/distillm2_anchors.py``)
      computes that statistic from the initial models on the run's first
      batches (mean over rows, not of per-batch means) before the first
      step, so every step uses the adaptive α. Readings: the official repo
      itself was not readable here; the trainer code was read from a
      third-party copy of ``distillm_trainer.py``
      (``get_batch_logps`` / ``log``). There the anchor lookup reads
      ``self._stored_metrics['logps_logqs/chosen']`` off the split-keyed
      metrics dict, which would fall back to base α through a bare
      ``except``; implemented is the evident intent, the logged window mean.
      The official α is computed for every row and used by the term of the
      row's role only, as here; its log-probs are at τ = 1 (here: the loss's
      temperatures). Official defaults: α_t = α_s = 0.1.
  With off_policy_source="dataset" the dataset responses take the
  teacher-response role. Reduction is the step's aggregation (the official
  code averages per sequence, = aggregation "sequence_mean"). ``tokens`` is
  unused.
  """
  del tokens
  anchors = (anchor_teacher, anchor_student)
  seq = (seq_logp, seq_logq)
  _check_distillm2(alpha_teacher, alpha_student, beta, adaptive_alpha, anchors, on_policy, seq)
  a_t, a_s = _distillm2_alphas(alpha_teacher, alpha_student, adaptive_alpha, *anchors, *seq)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  teacher_term = _kl(logq, _log_mixture(logq, logp, a_t))
  student_term = _kl(logp, _log_mixture(jax.lax.stop_gradient(logp), logq, a_s))
  return jnp.where(jnp.asarray(on_policy, bool), beta * student_term, (2.0 - beta) * teacher_term)


def distillm2_beta_schedule(total_steps: int) -> str:
  """``config.schedules`` entry of DistiLLM-2's gradual β (official
  ``distillm_v2`` trainer): β(t) = 1 + 0.5·min(1, 2t/T), i.e. ``loss.beta``
  linear from 1.0 to 1.5 over the first T/2 of T steps, then 1.5 (exact for
  even T; odd T reaches 1.5 at round(T/2))."""
  if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 2:
    raise ValueError(f"total_steps must be an integer >= 2, got {total_steps!r}")
  return f"loss.beta=linear:1.0:1.5:0:{max(1, round(total_steps / 2))}"


@LOSSES.register("todi")
def todi(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  beta: float = 1.0,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """ToDi, token-wise divergence control (Jung et al., EMNLP 2025, arXiv
  2505.16297, Eq. 9 and the official ``compute_ToDi``). [B, C].

    ToDi = Σ_v w(v)·q(v)(log q(v) − log p(v))
           + (1 − w(v))·p(v)(log p(v) − log q(v)),
    w(v) = sg(σ(β·(log q(v) − log p(v))))

  per vocabulary entry: forward KL where the student under-estimates the
  teacher (q > p, w > ½), reverse KL where it over-estimates. β = 1 is the
  paper's and the official code's weight; other β scale the log-ratio inside
  the sigmoid (our knob; β = 0 gives ½(FKL + RKL)). ``tokens`` is unused.
  """
  del tokens
  _check_range("beta", beta, 0.0, math.inf, hi_open=True)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  p, q = jnp.exp(logp), jnp.exp(logq)
  live = (p > 0) | (q > 0)
  diff = jnp.where(live, logq - logp, 0.0)  # log q − log p
  w = jax.lax.stop_gradient(jax.nn.sigmoid(beta * diff))
  terms = w * jnp.where(q > 0, q * diff, 0.0) - (1.0 - w) * jnp.where(p > 0, p * diff, 0.0)
  return jnp.sum(jnp.where(live, terms, 0.0), axis=-1)


def _akl_head(q: jax.Array, mu: float) -> jax.Array:
  """AKL's head as a [..., V] bool mask of the probabilities ``q`` [..., V]
  (see :func:`akl_head_mask`), without sorting the vocabulary.

  With M(t) = Σ_{v: q(v) ≥ t} q(v) (non-increasing in t), the head is
  {q ≥ b} for b the smallest value with M(b) ≤ μ (the sorted prefix whose
  cumulative mass stays ≤ μ); if even the top value has M > μ, the top
  value's entries. Found by bisection on the float32 bit pattern of the
  threshold (monotone for q ≥ 0): 31 passes of a masked sum over V, each an
  [...] reduction, so no sorted copy, permutation or cumsum of [..., V]
  is formed, and under a vocabulary-sharded layout every pass is a local
  sum plus a scalar all-reduce (a sort would all-gather V). Ties: if the
  largest value a < b has M(b) + a ≤ μ (its first sorted copy still fits;
  possible only when a is tied), a's entries join, as the sort reading
  below does."""
  q = jnp.asarray(q, jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.maximum(q, 0.0), jnp.int32)
  top = jnp.max(bits, axis=-1, keepdims=True)
  mass = lambda t: jnp.sum(jnp.where(bits >= t, q, 0.0), axis=-1, keepdims=True)

  def halve(_, lo_hi):  # invariant: M(lo) > μ (lo = −1: none), M(hi) ≤ μ
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2
    fits = mass(mid) <= mu
    return jnp.where(fits, lo, mid), jnp.where(fits, mid, hi)

  lo0 = jnp.full(top.shape, -1, jnp.int32)
  _, t = jax.lax.fori_loop(0, 31, halve, (lo0, top + 1))  # 2^31 > the bit range
  t = jnp.minimum(t, top)  # at least the top value's entries
  below = jnp.max(jnp.where(bits < t, q, -1.0), axis=-1, keepdims=True)
  tied_in = (below >= 0) & (mass(t) + below <= mu)
  return (bits >= t) | (tied_in & (q == below))


def akl_head_mask(
  teacher_logits, *, mu: float = 0.5, teacher_temperature: float = 1.0
) -> jax.Array:
  """AKL's head set as a [..., V] bool mask (no gradient): the teacher's most
  probable entries whose cumulative teacher probability, in descending order,
  stays ≤ μ, and always the top-1 (official ``get_ratio``: ``mask = cum_sum >
  mu; mask[..., 0] = False``). Reading: q(v) ≥ q_(h) with h = max(1, #{i :
  Σ_{j≤i} q_(j) ≤ μ}), so entries tied with the last head entry all join the
  head (the official argsort splits ties arbitrarily). Computed without a
  sort (:func:`_akl_head`)."""
  _check_range("mu", mu, 0.0, 1.0)
  logq = _log_softmax(jax.lax.stop_gradient(teacher_logits), teacher_temperature)
  return _akl_head(jnp.exp(logq), mu)


@LOSSES.register("akl")
def akl(
  student_logits,
  teacher_logits,
  tokens=None,
  *,
  mu: float = 0.5,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Adaptive KL (Wu et al., COLING 2025, "Rethinking Kullback-Leibler
  Divergence in Knowledge Distillation for LLMs", arXiv 2404.02657, Eqs. 9-11
  and the official ``AKL.py``). [B, C].

    g_head = Σ_{v∈H} |q(v) − p(v)|,  g_tail = Σ_{v∉H} |q(v) − p(v)|,
    AKL = g_head/(g_head + g_tail)·KL(q‖p) + g_tail/(g_head + g_tail)·KL(p‖q)

  with H the teacher's head (:func:`akl_head_mask`, μ = 0.5) and both gaps
  stop-gradient'ed. If p = q (both gaps 0) the weights are ½ each (the loss
  and its gradient are 0 either way). The head needs no sort of the
  vocabulary (bisection on the threshold, :func:`_akl_head`). ``tokens`` is
  unused.
  """
  del tokens
  _check_range("mu", mu, 0.0, 1.0)
  logp, logq = _log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature)
  q = jnp.exp(logq)
  head = _akl_head(q, mu)
  gap = jnp.abs(q - jnp.exp(jax.lax.stop_gradient(logp)))
  g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
  total = g_head + g_tail
  w_head = jax.lax.stop_gradient(
    jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  )
  return w_head * _kl(logq, logp) + (1.0 - w_head) * _kl(logp, logq)


# ----------------------------------------------------------------------------
# OPD + outcome reward (issue #16 §3).
# ----------------------------------------------------------------------------

_DISTILL_REWARDS = ("k1", "topk")


def grpo_advantages(
  rewards: jax.Array, groups: jax.Array, *, eps: float = 1e-6, norm_by_std: bool = True
) -> tuple[jax.Array, jax.Array]:
  """GRPO's group-normalised outcome advantage (verl
  ``compute_grpo_outcome_advantage``). [R] each.

    Â_i = (r_i − mean_g r) / (std_g r + eps)   (norm_by_std; else r_i − mean_g r)

  over the rows i of the same group g (``groups`` [R] int: the prompt of each
  row, i.e. its ``num_samples`` completions), std unbiased (torch.std); a
  group of one row has mean 0 and std 1, as in verl. Returns (Â [R] f32, the
  row's group has zero reward variance [R] bool)."""
  r = jnp.asarray(rewards, jnp.float32)
  g = jnp.asarray(groups)
  same = (g[:, None] == g[None, :]).astype(jnp.float32)  # [R, R]
  count = jnp.sum(same, axis=1)
  single = count <= 1
  mean = jnp.where(single, 0.0, same @ r / count)
  dev = r - mean
  var = (same @ jnp.square(dev)) / jnp.maximum(count - 1.0, 1.0)
  std = jnp.where(single, 1.0, jnp.sqrt(var))
  adv = dev / (std + eps) if norm_by_std else dev
  return adv, (std == 0) & ~single


def _outcome_coef(outcome_reward, outcome_group, alpha, eps, norm_by_std) -> jax.Array:
  """sg(α·Â) per row as [B, 1] from the step's [B, C] row inputs (rows on
  axis 0, constant along C)."""
  if outcome_reward is None or outcome_group is None:
    raise ValueError(
      "opd_grpo needs outcome_reward and outcome_group ([B, C]; the step passes them)"
    )
  adv, _ = grpo_advantages(
    outcome_reward[:, 0], outcome_group[:, 0], eps=eps, norm_by_std=norm_by_std
  )
  return jax.lax.stop_gradient(alpha * adv)[:, None]


def _check_opd_grpo(reward, k, eps):
  _check_choice("reward", reward, _DISTILL_REWARDS)
  if not isinstance(k, numbers.Integral) or k < 1:
    raise ValueError(f"k={k!r} must be an integer ≥ 1 (reward='topk')")
  _check_range("eps", eps, 0.0, math.inf, hi_open=True)


@LOSSES.register("opd_grpo", outcome=True)
def opd_grpo(
  student_logits,
  teacher_logits,
  tokens,
  *,
  outcome_reward=None,
  outcome_group=None,
  alpha: float = 1.0,
  reward: str = "k1",
  k: int = 16,
  strategy: str = "student",
  weight: str = "student",
  eps: float = 1e-6,
  norm_by_std: bool = True,
  task: str = "arithmetic",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """OPD + outcome reward, policy-gradient form (the arXiv 2604.13016 code's
  ``token_reward_direct_plus_grpo``; verl OPD recipes). [B, C].

  Per token the advantage is the distillation reward plus α times the
  row's GRPO advantage (:func:`grpo_advantages` of the verifier's reward
  over the ``num_samples`` completions of the row's prompt):
    reward="k1":   A_t = sg(log q(y_t) − log p(y_t)) + α·Â,
                   loss_t = −A_t·log p(y_t)   (= ``k1`` reward form − α·Â·log p(y_t))
    reward="topk": loss_t = ``topk_opd`` (Eq. 5, its k / strategy / weight)
                   − α·Â·log p(y_t)
  so E[∇loss] = ∇KL(p‖q) − α·E[Â·∇log p(y)]: distillation plus REINFORCE
  with a group baseline on the outcome. The value is a surrogate. α = 0 is
  exactly the plain distillation loss (``k1`` reward form / ``topk_opd``).
  ``outcome_reward`` / ``outcome_group`` [B, C] are the step's row inputs
  (constant along C; rows on axis 0; every row of a group must be in the
  same call, as the step's rows are); eps / norm_by_std are GRPO's. ``task``
  names the verifier's task (``opd_jax.tasks``; train.py builds
  ``OPDConfig.verifier`` from it: JAX-native for "arithmetic" on a
  character-level tokenizer, else the task's host verifier); unused here.
  """
  del task
  _check_opd_grpo(reward, k, eps)
  coef = _outcome_coef(outcome_reward, outcome_group, alpha, eps, norm_by_std)
  kk = 0 if reward == "k1" else k
  distill = topk_opd(
    student_logits,
    teacher_logits,
    tokens,
    k=kk,
    strategy=strategy,
    weight=weight,
    student_temperature=student_temperature,
    teacher_temperature=teacher_temperature,
  )
  logp_y = _gather(_log_softmax(student_logits, student_temperature), tokens)
  return distill - coef * logp_y


# ----------------------------------------------------------------------------
# Supervised cross-entropy.
# ----------------------------------------------------------------------------


@LOSSES.register("sft", needs_teacher=False)
def sft(
  student_logits,
  teacher_logits=None,
  tokens=None,
  *,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
) -> jax.Array:
  """Cross-entropy −log p(y) on given tokens (e.g. the off-policy cold start).

  p = softmax(s/τ_s); teacher_logits and teacher_temperature are ignored
  (teacher_logits may be None). [B, C].
  """
  del teacher_logits
  _check_temperatures(student_temperature, teacher_temperature)
  if tokens is None:
    raise ValueError("sft needs tokens")
  return -_gather(_log_softmax(student_logits, student_temperature), tokens)


def needs_teacher(name: str) -> bool:
  """Whether loss ``name`` reads teacher logits, as declared at its
  registration (ValueError if unknown)."""
  return bool(LOSSES.info(name)["needs_teacher"])


def needs_row_role(name: str) -> bool:
  """Whether loss ``name`` reads ``on_policy`` (each position's row role,
  [B, C] bool), as declared at its registration (ValueError if unknown)."""
  return bool(LOSSES.info(name)["row_role"])


def needs_outcome(name: str) -> bool:
  """Whether loss ``name`` reads an outcome reward (``outcome_reward`` /
  ``outcome_group``, [B, C]), as declared at its registration."""
  return bool(LOSSES.info(name)["outcome"])


def needs_sequence_logps(name: str, kwargs: Mapping[str, Any] | None = None) -> bool:
  """Whether loss ``name`` with keyword settings ``kwargs`` reads the rows'
  sequence-mean log-probs ``seq_logp`` / ``seq_logq`` ([B, C]): its
  registered switch keyword (``sequence_logps`` fact) is True in ``kwargs``
  (or by default)."""
  switch = LOSSES.info(name)["sequence_logps"]
  if not switch:
    return False
  return {**LOSSES.keyword_defaults(name), **dict(kwargs or {})}[switch] is True


def row_inputs(
  name: str,
  on_policy: jax.Array,
  outcome_reward=None,
  outcome_group=None,
  *,
  loss_kwargs: Mapping[str, Any] | None = None,
  seq_logp=None,
  seq_logq=None,
) -> dict[str, jax.Array]:
  """The per-position keyword inputs loss ``name`` (with ``loss_kwargs``)
  reads: {"on_policy": on_policy} for a row-role loss, {"outcome_reward",
  "outcome_group"} for an outcome loss, {"seq_logp", "seq_logq"} when
  :func:`needs_sequence_logps`, else {} (all [B, C]). For an abstract
  ``on_policy`` (``jax.ShapeDtypeStruct``) missing inputs are made abstract
  too."""
  out = {"on_policy": on_policy} if needs_row_role(name) else {}
  abstract = isinstance(on_policy, jax.ShapeDtypeStruct)
  f32 = lambda dt=jnp.float32: jax.ShapeDtypeStruct(on_policy.shape, dt)
  if needs_outcome(name):
    if outcome_reward is None or outcome_group is None:
      if not abstract:
        raise ValueError(f"loss {name!r} needs outcome_reward and outcome_group ([B, C])")
      outcome_reward, outcome_group = f32(), f32(jnp.int32)
    out.update(outcome_reward=outcome_reward, outcome_group=outcome_group)
  if needs_sequence_logps(name, loss_kwargs):
    if seq_logp is None or seq_logq is None:
      if not abstract:
        raise ValueError(f"loss {name!r} with {dict(loss_kwargs or {})} needs seq_logp, seq_logq")
      seq_logp, seq_logq = f32(), f32()
    out.update(seq_logp=seq_logp, seq_logq=seq_logq)
  return out


def token_log_probs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits/τ)[y] -> [...] for logits [..., V] and ids [...], as a
  masked sum over V (no gather along a possibly sharded vocabulary)."""
  a = _scaled(logits, temperature)
  m, z = log_normalizer(a)
  hit = jnp.arange(a.shape[-1]) == jnp.asarray(tokens, jnp.int32)[..., None]
  return jnp.sum(jnp.where(hit, a - m, 0.0), axis=-1) - z[..., 0]


def loss_temperatures(name: str, kwargs: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
  """(student, teacher) temperature of loss ``name`` under ``kwargs`` (its
  defaults where unset)."""
  kw = {**LOSSES.keyword_defaults(name), **dict(kwargs or {})}
  return tuple(kw.get(k, 1.0) for k in ("student_temperature", "teacher_temperature"))


def get_loss(name: str, kwargs: Mapping[str, Any] | None = None) -> Callable[..., Any]:
  """The per-token loss ``name`` with its keyword hyperparameters bound.

  Raises ValueError for an unknown name (listing valid names), an unknown
  keyword (listing valid keys), or a bad value (the function is traced once
  abstractly on a [1, 1, 2] input, so value checks fire here, not at step 1).
  """
  fn = LOSSES.build(name, kwargs, exclude=ROW_INPUTS)
  logits = jax.ShapeDtypeStruct((1, 1, 2), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  rows = row_inputs(name, jax.ShapeDtypeStruct((1, 1), jnp.bool_), loss_kwargs=kwargs)
  jax.eval_shape(
    lambda s, t, y, r: fn(s, t, y, **r),
    logits,
    logits if needs_teacher(name) else None,
    tokens,
    rows,
  )
  return fn


# ----------------------------------------------------------------------------
# Fused value and logit gradient (one chunk, few vocabulary-sized arrays).
# ----------------------------------------------------------------------------

TopK = Callable[[jax.Array, int], tuple[jax.Array, jax.Array]]
_FUSED: dict[Callable[..., Any], Callable[..., Any]] = {}


def _fused_rule(*losses):
  """Registers a closed-form ``(per_token, d/d student_logits)`` rule."""

  def deco(rule):
    for loss in losses:
      _FUSED[loss] = rule
    return rule

  return deco


def log_normalizer(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(m, z) with log softmax(x) = (x − m) − z over the last axis, [..., 1] each:
  m = sg(max x), z = log Σ exp(x − m) (jax.nn.log_softmax's arithmetic, so the
  two agree bit for bit). Shared by the fused rules and the token metrics so
  that XLA computes each model's normaliser once per chunk (CSE)."""
  m = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  return m, jnp.log(jnp.sum(jnp.exp(x - m), axis=-1, keepdims=True))


def _scaled(logits, temperature):
  return jnp.asarray(logits, jnp.float32) / temperature


def _probs_parts(student_logits, teacher_logits, student_temperature, teacher_temperature):
  """a = s/τ_s, b = sg(t)/τ_t and their normalisers (see log_normalizer)."""
  _check_temperatures(student_temperature, teacher_temperature)
  if teacher_logits is None:
    raise ValueError("this loss needs teacher_logits (got None)")
  a = _scaled(student_logits, student_temperature)
  b = _scaled(jax.lax.stop_gradient(teacher_logits), teacher_temperature)
  return a, log_normalizer(a), b, log_normalizer(b)


@_fused_rule(reverse_kl)
def _reverse_kl_rule(
  student_logits,
  teacher_logits,
  tokens,
  cotangent,
  *,
  top_k_fn: TopK,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
):
  """KL(p‖q) and c·∂KL/∂s = (c/τ_s)·p·(log p − log q − KL) (0 where p = 0).

  One pass for each normaliser, one for KL, one elementwise for the gradient.
  """
  del tokens, top_k_fn
  a, (ma, za), b, (mb, zb) = _probs_parts(
    student_logits, teacher_logits, student_temperature, teacher_temperature
  )
  logp, logq = (a - ma) - za, (b - mb) - zb
  p = jnp.exp(logp)
  # Written as metrics.token_metrics writes KL, so XLA computes it once.
  kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
  scale = (cotangent / student_temperature)[..., None]
  grad = jnp.where(p > 0, p * ((logp - logq) - kl[..., None]), 0.0) * scale
  return kl, grad


def _take(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[..., idx[..., j]] -> [..., J]; ids clipped into [0, V)."""
  return jnp.take_along_axis(x, jnp.asarray(idx, jnp.int32), axis=-1, mode="clip")


def _sparse_grad(p, cotangent, temperature, idx, coef):
  """c/τ·(Σ_j coef_j·onehot(idx_j) − (Σ_j coef_j)·p): the logit gradient of
  Σ_j coef_j·log p(idx_j) (coef constant), as one elementwise pass plus a
  scatter-add of the [..., J] coefficients."""
  scale = (cotangent / temperature)[..., None]
  dense = -(jnp.sum(coef, axis=-1, keepdims=True) * scale) * p
  lead = jnp.indices(idx.shape[:-1], sparse=True)
  at = tuple(i[..., None] for i in lead) + (jnp.clip(idx, 0, p.shape[-1] - 1),)
  return dense.at[at].add(coef * scale, mode="drop")


@_fused_rule(topk_opd)
def _topk_opd_rule(
  student_logits,
  teacher_logits,
  tokens,
  cotangent,
  *,
  top_k_fn: TopK,
  k: int = 16,
  strategy: str = "student",
  weight: str = "student",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
):
  """:func:`topk_opd` on candidate ids instead of [..., V] masks.

  The loss is Σ_{v∈S} coef(v)·log p(v) with coef = sg(w·(log p − log q)), so
  its logit gradient is c/τ_s·(coef scattered onto S − Σ coef·p). S comes from
  ``top_k_fn`` on the scaled logits (the order of log p; ties, lowest id
  first): S_stu, T, S_stu ∪ T (T's ids not in S_stu appended) or S_stu ∩ T.
  """
  _check_choice("strategy", strategy, _TOPK_STRATEGIES)
  _check_choice("weight", weight, _TOPK_WEIGHTS)
  if not isinstance(k, numbers.Integral) or k < 0:
    raise ValueError(f"k={k!r} must be an integer ≥ 0 (0 = sampled token)")
  a, (ma, za), b, (mb, zb) = _probs_parts(
    student_logits, teacher_logits, student_temperature, teacher_temperature
  )
  p = jnp.exp((a - ma) - za)
  if k == 0:
    if tokens is None:
      raise ValueError("topk_opd with k=0 (sampled-token mode) needs tokens")
    idx = jnp.asarray(tokens, jnp.int32)[..., None]
    logp_y, logq_y = (_take(a, idx) - ma) - za, (_take(b, idx) - mb) - zb
    coef = jax.lax.stop_gradient(logp_y - logq_y)
    return (coef * logp_y)[..., 0], _sparse_grad(p, cotangent, student_temperature, idx, coef)
  kk = min(int(k), a.shape[-1])
  if strategy == "teacher":
    idx, valid = top_k_fn(b, kk)[1], None
  else:
    idx = top_k_fn(a, kk)[1]
    valid = None
    if strategy != "student":
      t_idx = top_k_fn(b, kk)[1]
      if strategy == "intersection":
        valid = jnp.any(idx[..., :, None] == t_idx[..., None, :], axis=-1)
      else:
        new = ~jnp.any(t_idx[..., :, None] == idx[..., None, :], axis=-1)
        valid = jnp.concatenate([jnp.ones(idx.shape, bool), new], axis=-1)
        idx = jnp.concatenate([idx, t_idx], axis=-1)
  logp_c, logq_c = (_take(a, idx) - ma) - za, (_take(b, idx) - mb) - zb
  p_c, q_c = jnp.exp(logp_c), jnp.exp(logq_c)
  support = (p_c > 0) | (q_c > 0)
  if valid is not None:
    support = support & valid
  if weight == "student":
    raw = jnp.where(support, p_c, 0.0)
  elif weight == "teacher":
    raw = jnp.where(support, q_c, 0.0)
  else:
    raw = support.astype(jnp.float32)
  total = jnp.sum(raw, axis=-1, keepdims=True)
  w = raw / jnp.where(total > 0, total, 1.0)
  coef = jax.lax.stop_gradient(
    jnp.where(support, w * jnp.where(support, logp_c - logq_c, 0.0), 0.0)
  )
  value = jnp.sum(jnp.where(support, coef * logp_c, 0.0), axis=-1)
  return value, _sparse_grad(p, cotangent, student_temperature, idx, coef)


def _parts_log_probs(student_logits, teacher_logits, student_temperature, teacher_temperature):
  """(log p, log q, p, q) [..., V] via the shared normalisers."""
  a, (ma, za), b, (mb, zb) = _probs_parts(
    student_logits, teacher_logits, student_temperature, teacher_temperature
  )
  logp, logq = (a - ma) - za, (b - mb) - zb
  return logp, logq, jnp.exp(logp), jnp.exp(logq)


def _softmax_pullback(u, p):
  """u − p·Σ_v u(v): the logit gradient (×τ) of Σ_v u(v)·log p(v) for a
  constant u, over the last axis."""
  return u - p * jnp.sum(u, axis=-1, keepdims=True)


@_fused_rule(akl)
def _akl_rule(
  student_logits,
  teacher_logits,
  tokens,
  cotangent,
  *,
  top_k_fn: TopK,
  mu: float = 0.5,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
):
  """:func:`akl` and c·∂/∂s = (c/τ_s)·[w·(p − q) + (1 − w)·p·(log p − log q −
  KL(p‖q))], w = sg(g_head/(g_head + g_tail)) (∂KL(q‖p)/∂s = (p − q)/τ_s)."""
  del tokens, top_k_fn
  _check_range("mu", mu, 0.0, 1.0)
  logp, logq, p, q = _parts_log_probs(
    student_logits, teacher_logits, student_temperature, teacher_temperature
  )
  head = _akl_head(q, mu)
  gap = jnp.abs(q - p)
  g_head = jnp.sum(jnp.where(head, gap, 0.0), axis=-1)
  g_tail = jnp.sum(jnp.where(head, 0.0, gap), axis=-1)
  total = g_head + g_tail
  w = jnp.where(total > 0, g_head / jnp.where(total > 0, total, 1.0), 0.5)
  d = jnp.where((p > 0) | (q > 0), logp - logq, 0.0)  # log p − log q
  fkl = jnp.sum(jnp.where(q > 0, -q * d, 0.0), axis=-1)
  rkl = jnp.sum(jnp.where(p > 0, p * d, 0.0), axis=-1)
  wv = w[..., None]
  grad = wv * (p - q) + (1.0 - wv) * jnp.where(p > 0, p * (d - rkl[..., None]), 0.0)
  return w * fkl + (1.0 - w) * rkl, grad * (cotangent / student_temperature)[..., None]


@_fused_rule(distillm2)
def _distillm2_rule(
  student_logits,
  teacher_logits,
  tokens,
  cotangent,
  *,
  top_k_fn: TopK,
  on_policy=None,
  seq_logp=None,
  seq_logq=None,
  alpha_teacher: float = 0.1,
  alpha_student: float = 0.1,
  beta: float = 1.0,
  adaptive_alpha: bool = False,
  anchor_teacher: float = 0.0,
  anchor_student: float = 0.0,
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
):
  """:func:`distillm2` and its logit gradient, per row role:
    teacher rows, m = α_t·q + (1 − α_t)·p: τ_s·∂KL(q‖m)/∂s =
      −(1 − α_t)·pullback(q·p/m);
    student rows, m' = α_s·sg(p) + (1 − α_s)·q (constant):
      τ_s·∂KL(p‖m')/∂s = pullback(p·(log p − log m'))
  (:func:`_softmax_pullback`), scaled by (2 − β) / β and c. α_t / α_s are the
  base numbers or, with adaptive α, per-row constants [B, C, 1]."""
  del tokens, top_k_fn
  anchors = (anchor_teacher, anchor_student)
  seq = (seq_logp, seq_logq)
  _check_distillm2(alpha_teacher, alpha_student, beta, adaptive_alpha, anchors, on_policy, seq)
  a_t, a_s = _distillm2_alphas(alpha_teacher, alpha_student, adaptive_alpha, *anchors, *seq)
  logp, logq, p, q = _parts_log_probs(
    student_logits, teacher_logits, student_temperature, teacher_temperature
  )
  on = jnp.asarray(on_policy, bool)
  # Teacher term KL(q ‖ m).
  logm = _log_mixture(logq, logp, a_t)
  dq = jnp.where(q > 0, logq - logm, 0.0)
  teacher_value = jnp.sum(jnp.where(q > 0, q * dq, 0.0), axis=-1)
  rho = jnp.where(q > 0, q * jnp.exp(jnp.where(q > 0, logp - logm, 0.0)), 0.0)
  teacher_grad = -(1.0 - jnp.asarray(a_t, jnp.float32)) * _softmax_pullback(rho, p)
  # Student term KL(p ‖ m').
  logm2 = _log_mixture(logp, logq, a_s)
  dp = jnp.where(p > 0, logp - logm2, 0.0)
  student_value = jnp.sum(jnp.where(p > 0, p * dp, 0.0), axis=-1)
  student_grad = _softmax_pullback(jnp.where(p > 0, p * dp, 0.0), p)
  scale = jnp.where(on, beta, 2.0 - beta)
  value = scale * jnp.where(on, student_value, teacher_value)
  grad = jnp.where(on[..., None], student_grad, teacher_grad)
  return value, grad * (scale * cotangent / student_temperature)[..., None]


@_fused_rule(opd_grpo)
def _opd_grpo_rule(
  student_logits,
  teacher_logits,
  tokens,
  cotangent,
  *,
  top_k_fn: TopK,
  outcome_reward=None,
  outcome_group=None,
  alpha: float = 1.0,
  reward: str = "k1",
  k: int = 16,
  strategy: str = "student",
  weight: str = "student",
  eps: float = 1e-6,
  norm_by_std: bool = True,
  task: str = "arithmetic",
  student_temperature: float = 1.0,
  teacher_temperature: float = 1.0,
):
  """:func:`opd_grpo`: the top-k OPD rule (k = 0 for the sampled k1 reward)
  plus the outcome term −α·Â·log p(y): c/τ_s·(−α·Â)·(onehot(y) − p)."""
  del task
  _check_opd_grpo(reward, k, eps)
  coef = _outcome_coef(outcome_reward, outcome_group, alpha, eps, norm_by_std)
  value, grad = _topk_opd_rule(
    student_logits,
    teacher_logits,
    tokens,
    cotangent,
    top_k_fn=top_k_fn,
    k=0 if reward == "k1" else k,
    strategy=strategy,
    weight=weight,
    student_temperature=student_temperature,
    teacher_temperature=teacher_temperature,
  )
  a = _scaled(student_logits, student_temperature)
  ma, za = log_normalizer(a)
  p = jnp.exp((a - ma) - za)
  idx = jnp.asarray(tokens, jnp.int32)[..., None]
  logp_y = ((_take(a, idx) - ma) - za)[..., 0]
  c_out = -jnp.broadcast_to(coef, logp_y.shape)
  grad = grad + _sparse_grad(p, cotangent, student_temperature, idx, c_out[..., None])
  return value + c_out * logp_y, grad


def logits_value_and_grad(loss_fn: Callable[..., Any], top_k_fn: TopK = jax.lax.top_k):
  """``f(s, t, tokens, c, **extra) -> (loss [B, C], c·∂loss/∂s [B, C, V])`` for
  a loss from :func:`get_loss` (a registry function with its kwargs bound);
  ``extra`` (row inputs such as ``on_policy``, traced hyperparameters) is
  passed on to the loss as keywords.

  Losses with a closed-form rule (reverse KL, top-k OPD, AKL, DistiLLM-2,
  OPD + GRPO) get it: a few passes
  over the chunk's logits, no autodiff tape of [B, C, V] intermediates, and
  ``top_k_fn`` (e.g. a sharding-aware top-k) for their candidate sets. Other
  losses fall back to ``jax.vjp`` of ``loss_fn``. Same values and gradients.
  """
  func, kwargs = loss_fn, {}
  if isinstance(loss_fn, functools.partial):
    func, kwargs = loss_fn.func, dict(loss_fn.keywords)
  rule = _FUSED.get(func)
  if rule is not None:
    return functools.partial(rule, top_k_fn=top_k_fn, **kwargs)

  def autodiff(s, t, tokens, cotangent, **extra):
    per_token, pull = jax.vjp(lambda s: loss_fn(s, t, tokens, **extra), s)
    return per_token, pull(jnp.asarray(cotangent, per_token.dtype))[0]

  return autodiff


# ----------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------


def aggregate_weights(
  mask: jax.Array, mode: str = "token_mean", normalizer: float | None = None
) -> jax.Array:
  """Weights w [B, T] with aggregate(l) = Σ_{b,t} w[b,t]·l[b,t].

  mode:
    "token_mean": w = m / max(Σ m, 1)  (TRL GKD / the paper's mean over
      tokens).
    "sequence_mean": mean over sequences with Σ_t m > 0 of per-sequence token
      means: w[b] = m[b] / Σ_t m[b] / #{b : Σ_t m[b] > 0}.
    "constant": w = m / normalizer (Dr. GRPO, Liu et al. 2025; e.g. batch
      size × max length), normalizer required.
  Being linear in the per-token loss, the weights can be sliced to weight
  sequence chunks computed separately. Fully masked inputs give w = 0.
  """
  _check_choice("mode", mode, AGGREGATE_MODES)
  m = jnp.asarray(mask, jnp.float32)
  if m.ndim != 2:
    raise ValueError(f"mask must be [B, T], got shape {m.shape}")
  if mode == "token_mean":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  if mode == "sequence_mean":
    per_seq = jnp.sum(m, axis=1, keepdims=True)  # [B, 1]
    has_tokens = per_seq > 0
    num_seqs = jnp.maximum(jnp.sum(has_tokens.astype(jnp.float32)), 1.0)
    return jnp.where(has_tokens, m / jnp.where(has_tokens, per_seq, 1.0), 0.0) / num_seqs
  if normalizer is None:
    raise ValueError("aggregate mode 'constant' needs a normalizer")
  _check_range("normalizer", normalizer, 0.0, math.inf, lo_open=True, hi_open=True)
  return m / normalizer


def aggregate(
  per_token: jax.Array, mask: jax.Array, mode: str = "token_mean", normalizer: float | None = None
) -> jax.Array:
  """Scalar Σ_{b,t} w[b,t]·l[b,t] with w = aggregate_weights(mask, ...).

  Positions with zero weight contribute exactly 0 even if their loss is
  non-finite.
  """
  w = aggregate_weights(mask, mode, normalizer)
  per_token = jnp.asarray(per_token, jnp.float32)
  return jnp.sum(jnp.where(w != 0, w * per_token, 0.0))
