"""Tests for opd_jax.losses against independent float64 numpy references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import losses

B, C, V = 2, 5, 11
PAD = (4, 10)  # padded vocabulary columns (logit -1e30 in both models)
REAL = tuple(v for v in range(V) if v not in PAD)
TEMPS = [(1.0, 1.0), (0.7, 1.6)]


def _inputs(seed: int = 0, pad: bool = True):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, C, V)) * 2.0
  t = rng.normal(size=(B, C, V)) * 2.0
  if pad:
    s[..., PAD] = -1e30
    t[..., PAD] = -1e30
  tokens = rng.choice(np.array(REAL), size=(B, C))
  return s.astype(np.float32), t.astype(np.float32), tokens.astype(np.int32)


# ---------------------------------------------------------------------------
# float64 numpy references. Each takes (s_sg, s, t, tokens, ts, tt, **kw):
# s_sg supplies the stop-gradient parts, s the differentiated ones.
# ---------------------------------------------------------------------------


def np_log_softmax(x, tau):
  z = np.asarray(x, np.float64) / tau
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(la, lb):
  a = np.exp(la)
  with np.errstate(invalid="ignore"):
    return np.where(a > 0, a * (la - lb), 0.0).sum(-1)


def np_log(x):
  with np.errstate(divide="ignore"):
    return np.log(x)


def np_take(lp, tokens):
  return np.take_along_axis(lp, tokens[..., None], -1)[..., 0]


def ref_forward_kl(s_sg, s, t, tok, ts, tt):
  return np_kl(np_log_softmax(t, tt), np_log_softmax(s, ts))


def ref_reverse_kl(s_sg, s, t, tok, ts, tt):
  return np_kl(np_log_softmax(s, ts), np_log_softmax(t, tt))


def ref_jsd(s_sg, s, t, tok, ts, tt, beta=0.5):
  lp, lq = np_log_softmax(s, ts), np_log_softmax(t, tt)
  if beta == 0:
    return np_kl(lq, lp)
  if beta == 1:
    return np_kl(lp, lq)
  lm = np_log(beta * np.exp(lq) + (1 - beta) * np.exp(lp))
  return beta * np_kl(lq, lm) + (1 - beta) * np_kl(lp, lm)


def ref_skew_kl(s_sg, s, t, tok, ts, tt, alpha=0.1):
  p, q = np.exp(np_log_softmax(s, ts)), np.exp(np_log_softmax(t, tt))
  return np_kl(np_log(q), np_log(alpha * q + (1 - alpha) * p))


def ref_skew_rkl(s_sg, s, t, tok, ts, tt, alpha=0.1):
  p, q = np.exp(np_log_softmax(s, ts)), np.exp(np_log_softmax(t, tt))
  return np_kl(np_log(p), np_log(alpha * p + (1 - alpha) * q))


def ref_tvd(s_sg, s, t, tok, ts, tt):
  p, q = np.exp(np_log_softmax(s, ts)), np.exp(np_log_softmax(t, tt))
  return 0.5 * np.abs(p - q).sum(-1)


def _ref_estimator(which, s_sg, s, t, tok, ts, tt, mode):
  lp_y = np_take(np_log_softmax(s, ts), tok)
  lp_y_sg = np_take(np_log_softmax(s_sg, ts), tok)
  lq_y = np_take(np_log_softmax(t, tt), tok)

  def k(lp):
    log_r = lq_y - lp
    return {"k1": -log_r, "k2": 0.5 * log_r**2, "k3": np.exp(log_r) - 1 - log_r}[which]

  return k(lp_y) if mode == "direct" else k(lp_y_sg) * lp_y


def ref_k1(*args, mode="reward"):
  return _ref_estimator("k1", *args, mode=mode)


def ref_k2(*args, mode="direct"):
  return _ref_estimator("k2", *args, mode=mode)


def ref_k3(*args, mode="direct"):
  return _ref_estimator("k3", *args, mode=mode)


def np_topk_sets(s, t, k, strategy, ts, tt):
  """Python sets per position, from sorted probabilities (no ties)."""
  p, q = np.exp(np_log_softmax(s, ts)), np.exp(np_log_softmax(t, tt))
  out = np.empty(p.shape[:-1], object)
  for idx in np.ndindex(*p.shape[:-1]):
    sp = set(np.argsort(-p[idx], kind="stable")[:k].tolist())
    sq = set(np.argsort(-q[idx], kind="stable")[:k].tolist())
    out[idx] = {"student": sp, "teacher": sq, "union": sp | sq, "intersection": sp & sq}[strategy]
  return out


def ref_topk_opd(s_sg, s, t, tok, ts, tt, k=16, strategy="student", weight="student"):
  lp, lq = np_log_softmax(s, ts), np_log_softmax(t, tt)
  lp_sg = np_log_softmax(s_sg, ts)
  if k == 0:
    return (np_take(lp_sg, tok) - np_take(lq, tok)) * np_take(lp, tok)
  sets = np_topk_sets(s_sg, t, k, strategy, ts, tt)
  out = np.zeros(lp.shape[:-1])
  for idx in np.ndindex(*lp.shape[:-1]):
    cand = [v for v in sorted(sets[idx]) if v not in PAD]
    if not cand:
      continue
    p_s, q_s = np.exp(lp_sg[idx][cand]), np.exp(lq[idx][cand])
    w = {
      "student": p_s / p_s.sum(),
      "teacher": q_s / q_s.sum(),
      "none": np.full(len(cand), 1.0 / len(cand)),
    }[weight]
    r = -w * (lp_sg[idx][cand] - lq[idx][cand])
    out[idx] = -(r * lp[idx][cand]).sum()
  return out


def ref_sft(s_sg, s, t, tok, ts, tt):
  return -np_take(np_log_softmax(s, ts), tok)


# Row roles for the row-role losses (distillm2): row 0 student samples, row 1
# teacher samples.
ON_POLICY = np.array([[True] * C, [False] * C])


# Outcome inputs of the outcome losses (opd_grpo): one group of both rows,
# row 0 verified right, row 1 wrong.
OUTCOME_REWARD = np.array([[1.0] * C, [0.0] * C], np.float32)
OUTCOME_GROUP = np.zeros((B, C), np.int32)


def np_grpo(rewards, groups, eps=1e-6, norm_by_std=True):
  """verl's GRPO outcome advantage, per group, float64."""
  r, g = np.asarray(rewards, np.float64), np.asarray(groups)
  adv, zero = np.zeros_like(r), np.zeros(r.shape, bool)
  for gid in np.unique(g):
    rows = g == gid
    if rows.sum() == 1:
      mean, std = 0.0, 1.0
    else:
      mean, std = r[rows].mean(), r[rows].std(ddof=1)
      zero[rows] = std == 0
    adv[rows] = (r[rows] - mean) / (std + eps) if norm_by_std else r[rows] - mean
  return adv, zero


def ref_opd_grpo(
  s_sg, s, t, tok, ts, tt, alpha=1.0, reward="k1", eps=1e-6, norm_by_std=True, **topk
):
  if reward == "k1":
    distill = ref_k1(s_sg, s, t, tok, ts, tt)
  else:
    distill = ref_topk_opd(s_sg, s, t, tok, ts, tt, **topk)
  adv, _ = np_grpo(OUTCOME_REWARD[:, 0], OUTCOME_GROUP[:, 0], eps, norm_by_std)
  return distill - alpha * adv[:, None] * np_take(np_log_softmax(s, ts), tok)


# Sequence-mean log-probs of each row's response (the step's pre-pass; given
# here): row 0 (student sample) gap p − q = 0.09, row 1 (teacher) q − p = 0.17.
SEQ_LOGP = np.log(np.array([[0.5] * C, [0.6] * C]))
SEQ_LOGQ = np.log(np.array([[0.41] * C, [0.77] * C]))


def np_distillm2_alpha(gap, base, anchor):
  """The official adaptive α, float64: clip(1 − (1 − α0)·Δ0/(Δ + 1e-5), 0.01, α0)."""
  return np.minimum(np.maximum(1 - (1 - base) * anchor / (gap + 1e-5), 0.01), base)


def ref_distillm2(
  s_sg,
  s,
  t,
  tok,
  ts,
  tt,
  alpha_teacher=0.1,
  alpha_student=0.1,
  beta=1.0,
  adaptive_alpha=False,
  anchor_teacher=0.0,
  anchor_student=0.0,
):
  p, q = np.exp(np_log_softmax(s, ts)), np.exp(np_log_softmax(t, tt))
  p_sg = np.exp(np_log_softmax(s_sg, ts))
  a_t, a_s = alpha_teacher, alpha_student
  if adaptive_alpha:
    ep, eq = np.exp(SEQ_LOGP), np.exp(SEQ_LOGQ)
    a_t = np_distillm2_alpha(eq - ep, alpha_teacher, anchor_teacher)[..., None]
    a_s = np_distillm2_alpha(ep - eq, alpha_student, anchor_student)[..., None]
  teacher = np_kl(np_log(q), np_log(a_t * q + (1 - a_t) * p))
  student = np_kl(np_log(p), np_log(a_s * p_sg + (1 - a_s) * q))
  return np.where(ON_POLICY, beta * student, (2 - beta) * teacher)


def ref_todi(s_sg, s, t, tok, ts, tt, beta=1.0):
  lp, lq = np_log_softmax(s, ts), np_log_softmax(t, tt)
  lp_sg = np_log_softmax(s_sg, ts)
  p, q = np.exp(lp), np.exp(lq)
  w = 1.0 / (1.0 + np.exp(-beta * (lq - lp_sg)))
  terms = w * q * (lq - lp) + (1 - w) * p * (lp - lq)
  return np.where((p > 0) | (q > 0), terms, 0.0).sum(-1)


def ref_akl(s_sg, s, t, tok, ts, tt, mu=0.5):
  """The official AKL.py (argsort, cumulative sum, head gap ratio)."""
  lp, lq = np_log_softmax(s, ts), np_log_softmax(t, tt)
  q, p_sg = np.exp(lq), np.exp(np_log_softmax(s_sg, ts))
  order = np.argsort(-q, axis=-1, kind="stable")
  q_sorted = np.take_along_axis(q, order, -1)
  err = np.abs(q_sorted - np.take_along_axis(p_sg, order, -1))
  tail = np.cumsum(q_sorted, -1) > mu
  tail[..., 0] = False
  g_head, g_tail = np.where(tail, 0, err).sum(-1), np.where(tail, err, 0).sum(-1)
  h = g_head / (g_head + g_tail)
  return h * np_kl(lq, lp) + (1 - h) * np_kl(lp, lq)


REFS = {
  "forward_kl": ref_forward_kl,
  "reverse_kl": ref_reverse_kl,
  "jsd": ref_jsd,
  "skew_kl": ref_skew_kl,
  "skew_rkl": ref_skew_rkl,
  "tvd": ref_tvd,
  "k1": ref_k1,
  "sampled_reverse_kl": ref_k1,
  "k2": ref_k2,
  "k3": ref_k3,
  "topk_opd": ref_topk_opd,
  "sft": ref_sft,
  "distillm2": ref_distillm2,
  "todi": ref_todi,
  "akl": ref_akl,
  "opd_grpo": ref_opd_grpo,
}

CASES = [
  ("forward_kl", {}),
  ("reverse_kl", {}),
  ("jsd", {}),
  ("jsd", {"beta": 0.0}),
  ("jsd", {"beta": 0.2}),
  ("jsd", {"beta": 1.0}),
  ("skew_kl", {}),
  ("skew_kl", {"alpha": 0.4}),
  ("skew_kl", {"alpha": 0.0}),
  ("skew_rkl", {}),
  ("skew_rkl", {"alpha": 0.4}),
  ("tvd", {}),
  ("k1", {}),
  ("k1", {"mode": "direct"}),
  ("sampled_reverse_kl", {}),
  ("k2", {}),
  ("k2", {"mode": "reward"}),
  ("k3", {}),
  ("k3", {"mode": "reward"}),
  ("topk_opd", {"k": 0}),
  ("topk_opd", {"k": 3}),
  ("topk_opd", {"k": V}),
  ("topk_opd", {"k": 3, "strategy": "teacher", "weight": "teacher"}),
  ("topk_opd", {"k": 3, "strategy": "union", "weight": "none"}),
  ("topk_opd", {"k": 4, "strategy": "intersection", "weight": "student"}),
  ("topk_opd", {"k": 2, "strategy": "intersection", "weight": "none"}),
  ("topk_opd", {"k": 3, "strategy": "union", "weight": "teacher"}),
  ("sft", {}),
  ("distillm2", {}),
  ("distillm2", {"alpha_teacher": 0.3, "alpha_student": 0.0}),
  ("distillm2", {"beta": 1.5, "alpha_student": 0.4}),
  # Adaptive α: both rows inside the clip (α_t = 0.177, α_s = 0.333) ...
  (
    "distillm2",
    {
      "adaptive_alpha": True,
      "alpha_teacher": 0.3,
      "alpha_student": 0.4,
      "anchor_teacher": 0.2,
      "anchor_student": 0.1,
    },
  ),
  # ... and both clipped (α_t = 0.01 floor, α_s = α_0 = 0.1).
  (
    "distillm2",
    {"adaptive_alpha": True, "anchor_teacher": 0.5, "anchor_student": 0.05, "beta": 1.3},
  ),
  ("todi", {}),
  ("todi", {"beta": 2.5}),
  ("todi", {"beta": 0.0}),
  ("akl", {}),
  ("akl", {"mu": 0.2}),
  ("akl", {"mu": 0.9}),
  ("opd_grpo", {}),
  ("opd_grpo", {"alpha": 0.5, "norm_by_std": False}),
  ("opd_grpo", {"alpha": 2.0, "reward": "topk", "k": 3, "strategy": "union"}),
]
CASE_IDS = [f"{n}-{kw}" for n, kw in CASES]


def _rows(name, kwargs=None):
  """The row inputs the step passes to loss ``name`` (ON_POLICY here)."""
  return losses.row_inputs(
    name,
    jnp.asarray(ON_POLICY),
    jnp.asarray(OUTCOME_REWARD),
    jnp.asarray(OUTCOME_GROUP),
    loss_kwargs=kwargs,
    seq_logp=jnp.asarray(SEQ_LOGP, jnp.float32),
    seq_logq=jnp.asarray(SEQ_LOGQ, jnp.float32),
  )


def _call(name, kwargs, s, t, tok, ts, tt):
  fn = losses.get_loss(name, dict(kwargs, student_temperature=ts, teacher_temperature=tt))
  return fn(
    jnp.asarray(s),
    None if name == "sft" else jnp.asarray(t),
    jnp.asarray(tok),
    **_rows(name, kwargs),
  )


def _ref(name, kwargs, s_sg, s, t, tok, ts, tt):
  return REFS[name](s_sg, s, t, tok, ts, tt, **kwargs)


@pytest.mark.parametrize("temps", TEMPS, ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_value_and_grad_match_numpy(name, kwargs, temps):
  """Values vs the f64 reference; jax gradients vs its central differences.

  The reference freezes its stop-gradient parts at the base point, so the
  surrogate (reward / top-k) gradients are checked too. Padded columns must
  get an exactly-zero, finite gradient; teacher logits must get none.
  """
  s, t, tok = _inputs(2)
  c = np.random.default_rng(3).normal(size=(B, C))
  ts, tt = temps

  got, vjp = jax.vjp(
    lambda s_, t_: _call(name, kwargs, s_, t_, tok, ts, tt), jnp.asarray(s), jnp.asarray(t)
  )
  got = np.asarray(got)
  assert got.shape == (B, C) and got.dtype == np.float32
  np.testing.assert_allclose(got, _ref(name, kwargs, s, s, t, tok, ts, tt), rtol=2e-5, atol=2e-5)

  g_s, g_t = (np.asarray(g) for g in vjp(jnp.asarray(c, jnp.float32)))
  assert np.all(np.isfinite(g_s))
  assert np.all(g_t == 0)
  assert np.all(g_s[..., PAD] == 0)
  # Positions are independent, so one vocab column is perturbed at every
  # position at once and differenced per position.
  s64 = s.astype(np.float64)
  h = 1e-5
  fd = np.zeros_like(s64)
  f = lambda x: c * _ref(name, kwargs, s64, x, t, tok, ts, tt)
  for v in REAL:
    e = np.zeros_like(s64)
    e[..., v] = h
    fd[..., v] = (f(s64 + e) - f(s64 - e)) / (2 * h)
  np.testing.assert_allclose(g_s, fd, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temps", TEMPS, ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_logits_value_and_grad_matches_autodiff(name, kwargs, temps):
  """The step's per-chunk (loss, c·∂loss/∂s): closed-form rules (reverse KL,
  top-k OPD on candidate ids) and the autodiff fallback equal jax.vjp of the
  registry function, padded columns included (exactly-zero gradient)."""
  s, t, tok = _inputs(5)
  c = jnp.asarray(np.random.default_rng(6).normal(size=(B, C)), jnp.float32)
  ts, tt = temps
  fn = losses.get_loss(name, dict(kwargs, student_temperature=ts, teacher_temperature=tt))
  t_in = None if name == "sft" else jnp.asarray(t)
  rows = _rows(name, kwargs)
  want, vjp = jax.vjp(lambda s_: fn(s_, t_in, jnp.asarray(tok), **rows), jnp.asarray(s))
  got, g = jax.jit(losses.logits_value_and_grad(fn))(
    jnp.asarray(s), t_in, jnp.asarray(tok), c, **rows
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g, vjp(c)[0], rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(g)[..., PAD] == 0)


def test_logits_value_and_grad_uses_rules():
  """reverse KL and top-k OPD have closed-form rules; top-k OPD calls the
  given top-k (the step passes a sharding-aware one)."""
  calls = []

  def top_k(x, k):
    calls.append(k)
    return jax.lax.top_k(x, k)

  s, t, tok = (jnp.asarray(a) for a in _inputs(7))
  c = jnp.ones((B, C), jnp.float32)
  for name in ("reverse_kl", "topk_opd"):
    fn = losses.get_loss(name, {"k": 3} if name == "topk_opd" else {})
    assert fn.func in losses._FUSED
    losses.logits_value_and_grad(fn, top_k)(s, t, tok, c)
  assert calls == [3]
  assert all(losses.LOSSES.get(n) in losses._FUSED for n in ("akl", "distillm2", "opd_grpo"))


def test_no_nan_extreme_temperatures():
  s, t, _ = _inputs(4)
  s, t = jnp.asarray(s), jnp.asarray(t)
  tok = jnp.argmax(s, -1).astype(jnp.int32)  # a likely student sample
  for name, kwargs in CASES:
    for ts, tt in [(0.05, 3.0), (3.0, 0.05)]:
      fn = losses.get_loss(name, dict(kwargs, student_temperature=ts, teacher_temperature=tt))
      val, g = jax.value_and_grad(lambda x: jnp.sum(fn(x, t, tok, **_rows(name, kwargs))))(s)
      assert np.isfinite(val), (name, kwargs, ts, tt)
      assert np.all(np.isfinite(g)), (name, kwargs, ts, tt)


def test_under_jit_and_chunked():
  """Inside jit, per-chunk losses weighted by aggregate_weights slices."""
  s, t, tok = _inputs(13)
  mask = np.ones((B, C), bool)
  mask[0, 3:] = False
  fn = losses.get_loss("reverse_kl", {"student_temperature": 0.9})

  def step(s_):
    w = losses.aggregate_weights(mask, "sequence_mean")
    return sum(
      jnp.sum(w[:, i : i + 2] * fn(s_[:, i : i + 2], t[:, i : i + 2], tok[:, i : i + 2]))
      for i in range(0, C, 2)
    )

  whole = lambda s_: losses.aggregate(fn(s_, t, tok), mask, "sequence_mean")
  val, g = jax.jit(jax.value_and_grad(step))(jnp.asarray(s))
  val_ref, g_ref = jax.value_and_grad(whole)(jnp.asarray(s))
  np.testing.assert_allclose(val, val_ref, rtol=1e-6)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Gradients in expectation over y ~ p.
# ---------------------------------------------------------------------------


def _per_token_grads(fn, s, t):
  """[V_real, B, C, V]: ∇_s Σ_{b,c} loss(y at every position)."""

  def grad_for(y):
    tok = jnp.full((B, C), y, jnp.int32)
    return jax.grad(lambda x: jnp.sum(fn(x, t, tok)))(s)

  return jax.jit(jax.vmap(grad_for))(jnp.asarray(REAL))


def _full_grad(name, s, t, ts, tt):
  fn = losses.get_loss(name, {"student_temperature": ts, "teacher_temperature": tt})
  return np.asarray(jax.grad(lambda x: jnp.sum(fn(x, t)))(s))


@pytest.mark.parametrize("temps", [(0.7, 1.6)], ids=str)
@pytest.mark.parametrize(
  "name,kwargs,target",
  [
    ("k1", {"mode": "reward"}, "reverse_kl"),
    ("k2", {"mode": "direct"}, "reverse_kl"),
    ("k3", {"mode": "direct"}, "forward_kl"),
    ("topk_opd", {"k": 0}, "reverse_kl"),
    ("k1", {"mode": "direct"}, None),  # E_p[∇ log p] = 0
  ],
)
def test_estimator_exact_expectation(name, kwargs, target, temps):
  s, t, _ = _inputs(5)
  s, t = jnp.asarray(s), jnp.asarray(t)
  ts, tt = temps
  fn = losses.get_loss(name, dict(kwargs, student_temperature=ts, teacher_temperature=tt))
  grads = _per_token_grads(fn, s, t)
  p = np.exp(np_log_softmax(s, ts))[..., list(REAL)]  # [B, C, V_real]
  expect = np.einsum("ybcv,bcy->bcv", np.asarray(grads, np.float64), p)
  want = np.zeros_like(expect) if target is None else _full_grad(target, s, t, ts, tt)
  np.testing.assert_allclose(expect, want, atol=1e-5, rtol=1e-5)


def test_k1_reward_monte_carlo():
  """Monte Carlo mean of the k1 policy gradient vs ∇KL(p‖q), within 5 SE.

  200k draws y ~ p per position; the per-draw gradient depends on y only, so
  the sample mean / variance are formed exactly from the draw counts.
  """
  n = 200_000
  ts, tt = 0.8, 1.2
  s, t, _ = _inputs(6)
  s, t = jnp.asarray(s), jnp.asarray(t)
  fn = losses.get_loss("k1", {"student_temperature": ts, "teacher_temperature": tt})
  p = np.exp(np_log_softmax(s, ts))
  rng = np.random.default_rng(0)
  # Counts of n iid draws y ~ p at each position (= sampling, then counting).
  counts = np.stack(
    [rng.multinomial(n, p[idx] / p[idx].sum()) for idx in np.ndindex(B, C)]
  ).reshape(B, C, V)
  assert counts[..., PAD].sum() == 0
  freq = counts[..., list(REAL)] / n
  g = np.asarray(_per_token_grads(fn, s, t), np.float64)  # [Vr, B, C, V]
  mean = np.einsum("ybcv,bcy->bcv", g, freq)
  var = (np.einsum("ybcv,bcy->bcv", g**2, freq) - mean**2) * n / (n - 1)
  se = np.sqrt(np.maximum(var, 0) / n)
  want = _full_grad("reverse_kl", s, t, ts, tt)
  err = np.abs(mean - want)
  assert np.all(err <= 5 * se + 1e-6), float(np.max(err / (se + 1e-12)))
  assert np.max(err) > 0  # it really is a Monte Carlo estimate


# ---------------------------------------------------------------------------
# Top-k OPD and JSD specifics.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temps", TEMPS, ids=str)
@pytest.mark.parametrize("k", [V - len(PAD), V, V + 5])
def test_topk_full_vocab_grad_equals_reverse_kl(k, temps):
  s, t, tok = _inputs(7)
  s, t = jnp.asarray(s), jnp.asarray(t)
  ts, tt = temps
  fn = losses.get_loss("topk_opd", {"k": k, "student_temperature": ts, "teacher_temperature": tt})
  g = jax.grad(lambda x: jnp.sum(fn(x, t, tok)))(s)
  np.testing.assert_allclose(g, _full_grad("reverse_kl", s, t, ts, tt), atol=1e-6, rtol=1e-5)
  # The surrogate value is not the KL value.
  kl = losses.reverse_kl(s, t, student_temperature=ts, teacher_temperature=tt)
  assert not np.allclose(fn(s, t, tok), kl)


@pytest.mark.parametrize("strategy", ["student", "teacher", "union", "intersection"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_topk_support_mask_matches_numpy_sets(strategy, k):
  s, t, _ = _inputs(8)
  ts, tt = 0.9, 1.3
  mask = np.asarray(
    losses.topk_support_mask(
      s, t, k=k, strategy=strategy, student_temperature=ts, teacher_temperature=tt
    )
  )
  sets = np_topk_sets(s, t, k, strategy, ts, tt)
  for idx in np.ndindex(B, C):
    assert set(np.flatnonzero(mask[idx]).tolist()) == sets[idx], idx


def test_topk_intersection_can_be_empty():
  s, t, tok = _inputs(9)
  t = -s  # teacher's top-1 is the student's bottom-1
  t[..., PAD] = -1e30
  out = losses.topk_opd(jnp.asarray(s), jnp.asarray(t), tok, k=1, strategy="intersection")
  assert np.all(np.asarray(out) == 0)


def test_jsd_endpoints_equal_kls():
  s, t, tok = _inputs(10)
  s, t = jnp.asarray(s), jnp.asarray(t)
  kw = {"student_temperature": 0.8, "teacher_temperature": 1.1}
  for beta, other in [(0.0, losses.forward_kl), (1.0, losses.reverse_kl)]:
    f = functools.partial(losses.jsd, beta=beta, **kw)
    g = functools.partial(other, **kw)
    np.testing.assert_array_equal(f(s, t, tok), g(s, t, tok))
    np.testing.assert_array_equal(
      jax.grad(lambda x: jnp.sum(f(x, t, tok)))(s), jax.grad(lambda x: jnp.sum(g(x, t, tok)))(s)
    )


def test_jsd_half_is_symmetric_js():
  """β = 0.5 is the ordinary Jensen-Shannon divergence (symmetric, ≤ log 2)."""
  s, t, tok = _inputs(11)
  a = np.asarray(losses.jsd(s, t, tok))
  b = np.asarray(losses.jsd(t, s, tok))
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.all(a <= np.log(2) + 1e-6) and np.all(a >= 0)
  np.testing.assert_allclose(a, ref_jsd(s, s, t, tok, 1.0, 1.0, beta=0.5), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Aggregation.
# ---------------------------------------------------------------------------


def _np_aggregate(l, m, mode, normalizer=None):
  l, m = np.asarray(l, np.float64), np.asarray(m, np.float64)
  if mode == "token_mean":
    return (l * m).sum() / max(m.sum(), 1.0)
  if mode == "constant":
    return (l * m).sum() / normalizer
  means = [(l[b] * m[b]).sum() / m[b].sum() for b in range(l.shape[0]) if m[b].sum() > 0]
  return float(np.mean(means)) if means else 0.0


@pytest.mark.parametrize(
  "mode,normalizer", [("token_mean", None), ("sequence_mean", None), ("constant", 7.0)]
)
def test_aggregate_matches_numpy(mode, normalizer):
  rng = np.random.default_rng(12)
  l = rng.normal(size=(4, 9)).astype(np.float32)
  m = rng.random((4, 9)) < 0.6
  m[1] = False  # a sequence with no tokens
  m[2, 0] = True
  l[~m] = np.nan  # masked positions may hold garbage
  got = float(losses.aggregate(l, m, mode, normalizer))
  want = _np_aggregate(np.where(m, l, 0.0), m, mode, normalizer)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Σ weights·loss, also chunk by chunk along T.
  w = np.asarray(losses.aggregate_weights(m, mode, normalizer))
  lz = np.where(m, l, 0.0)
  np.testing.assert_allclose((w * lz).sum(), want, rtol=1e-6)
  chunked = sum((w[:, i : i + 4] * lz[:, i : i + 4]).sum() for i in (0, 4, 8))
  np.testing.assert_allclose(chunked, want, rtol=1e-6)
  # All-masked input: 0, not NaN.
  assert float(losses.aggregate(l, np.zeros_like(m), mode, normalizer)) == 0.0


def test_aggregate_gradient_ignores_masked_positions():
  l = jnp.arange(6.0).reshape(2, 3)
  m = jnp.array([[1, 1, 0], [0, 0, 0]])
  g = jax.grad(lambda x: losses.aggregate(x, m, "sequence_mean"))(l)
  np.testing.assert_allclose(g, [[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])


def test_aggregate_errors():
  m = np.ones((2, 3))
  with pytest.raises(ValueError, match="normalizer"):
    losses.aggregate_weights(m, "constant")
  with pytest.raises(ValueError, match="token_mean"):
    losses.aggregate_weights(m, "mean")


# ---------------------------------------------------------------------------
# Registry / configuration.
# ---------------------------------------------------------------------------


def test_unknown_loss_lists_names():
  with pytest.raises(ValueError) as e:
    losses.get_loss("nope")
  for name in losses.LOSSES.names():
    assert name in str(e.value)


def test_bad_kwarg_lists_keys():
  with pytest.raises(ValueError) as e:
    losses.get_loss("jsd", {"betta": 0.3})
  for key in ("beta", "student_temperature", "teacher_temperature"):
    assert key in str(e.value)
  with pytest.raises(ValueError) as e:
    losses.get_loss("topk_opd", {"topk": 4})
  for key in ("k", "strategy", "weight"):
    assert repr(key) in str(e.value)


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("k1", {"mode": "bogus"}),
    ("topk_opd", {"strategy": "only_stu"}),
    ("topk_opd", {"weight": "student_p"}),
    ("topk_opd", {"k": -1}),
    ("jsd", {"beta": 1.5}),
    ("skew_kl", {"alpha": -0.1}),
    ("reverse_kl", {"student_temperature": 0.0}),
  ],
)
def test_bad_values_fail_at_get_loss(name, kwargs):
  with pytest.raises(ValueError):
    losses.get_loss(name, kwargs)


def test_needs_teacher():
  assert all("needs_teacher" in losses.LOSSES.info(n) for n in losses.LOSSES.names())
  assert [n for n in losses.LOSSES.names() if not losses.needs_teacher(n)] == ["sft"]
  assert not losses.needs_teacher("sft")
  assert losses.needs_teacher("topk_opd")
  with pytest.raises(ValueError):
    losses.needs_teacher("nope")
  with pytest.raises(ValueError, match="unknown fact"):  # a typo is not a silent default
    losses.LOSSES.register("not_a_loss", needs_techer=False)


# ---------------------------------------------------------------------------
# DistiLLM-2, ToDi, AKL specifics.
# ---------------------------------------------------------------------------


def test_distillm2_picks_its_term_per_row():
  """Student rows: β·skew reverse KL (mixture student stop-gradient'ed: same
  value as skew_rkl); teacher rows: (2 − β)·skew KL, exactly skew_kl."""
  s, t, tok = (jnp.asarray(a) for a in _inputs(14))
  kw = {"student_temperature": 0.8, "teacher_temperature": 1.2}
  out = losses.distillm2(
    s,
    t,
    tok,
    on_policy=jnp.asarray(ON_POLICY),
    alpha_teacher=0.2,
    alpha_student=0.3,
    beta=1.25,
    **kw,
  )
  skl = losses.skew_kl(s, t, alpha=0.2, **kw)
  srkl = losses.skew_rkl(s, t, alpha=0.3, **kw)
  np.testing.assert_allclose(out[0], 1.25 * srkl[0], rtol=1e-6)
  np.testing.assert_allclose(out[1], 0.75 * skl[1], rtol=1e-6)
  # The detached mixture changes the reverse term's gradient vs skew_rkl.
  g = jax.grad(
    lambda x: jnp.sum(
      losses.distillm2(x, t, on_policy=jnp.asarray(ON_POLICY), alpha_student=0.3, **kw)[0]
    )
  )(s)
  g_rkl = jax.grad(lambda x: jnp.sum(losses.skew_rkl(x, t, alpha=0.3, **kw)[0]))(s)
  assert not np.allclose(g, g_rkl)
  with pytest.raises(ValueError, match="on_policy"):
    losses.distillm2(s, t, tok)


def test_distillm2_gradual_beta_schedule_is_the_official_formula():
  """β(t) = 1 + 0.5·min(1, 2t/T) (official ``distillm_v2`` gradual β), from
  the built-in schedule string, at every step of a T-step run."""
  from opd_jax import schedules

  for total in (10, 400):
    ((target, sched),) = schedules.parse_all(losses.distillm2_beta_schedule(total))
    assert target == "loss.beta"
    for t in range(total + 3):
      want = 1.0 + 0.5 * min(1.0, 2.0 * t / total)
      np.testing.assert_allclose(float(schedules.value(sched, t)), want, rtol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    losses.distillm2_beta_schedule(1)


def test_row_role_is_not_a_setting():
  assert losses.needs_row_role("distillm2") and not losses.needs_row_role("reverse_kl")
  with pytest.raises(ValueError, match="unknown argument"):
    losses.get_loss("distillm2", {"on_policy": True})
  from opd_jax import configs_lib

  assert "on_policy" not in configs_lib.loss_config("distillm2")
  assert configs_lib.loss_config("distillm2").alpha_student == 0.1


def test_distillm2_adaptive_alpha_formula():
  """α_i = clip(1 − (1 − α0)·Δ0/(Δ_i + 1e-5), 0.01, α0) against float64, over
  gaps inside, below and above the clip range and negative; α0 at Δ = Δ0;
  a 0/0 reads as α0; no gradient flows into the gap."""
  gaps = np.array([-0.3, -1e-5, 0.0, 0.05, 0.16, 0.18, 0.2, 0.5, 1.0])
  for base, anchor in ((0.1, 0.2), (0.3, 0.2), (0.5, 0.0), (0.2, -0.1)):
    got = np.asarray(losses.distillm2_alpha(jnp.asarray(gaps, jnp.float32), base, anchor))
    with np.errstate(divide="ignore", invalid="ignore"):
      want = np.nan_to_num(np_distillm2_alpha(gaps, base, anchor), nan=base)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(losses.distillm2_alpha(0.2, 0.1, 0.2), 0.1, rtol=1e-4)
  g = jax.grad(lambda x: jnp.sum(losses.distillm2_alpha(x, 0.3, 0.2)))(jnp.asarray([0.17]))
  assert np.all(np.asarray(g) == 0)


def test_distillm2_adaptive_alpha_settings():
  """adaptive_alpha=False ignores the sequence inputs and anchors (the step
  computes no pre-pass); True needs both anchors > 0 and the inputs; bad
  settings are a ValueError naming them when the loss is made."""
  kw = {"adaptive_alpha": True, "anchor_teacher": 0.2, "anchor_student": 0.1}
  assert losses.needs_sequence_logps("distillm2", kw)
  assert not losses.needs_sequence_logps("distillm2")
  assert not losses.needs_sequence_logps("distillm2", {"anchor_teacher": 0.2})
  assert not losses.needs_sequence_logps("reverse_kl")
  assert set(losses.row_inputs("distillm2", jnp.asarray(ON_POLICY))) == {"on_policy"}
  losses.get_loss("distillm2", kw)
  for bad, name in (
    ({"adaptive_alpha": True}, "anchor_teacher"),
    ({"adaptive_alpha": True, "anchor_teacher": 0.2}, "anchor_student"),
    (dict(kw, anchor_student=-0.1), "anchor_student"),
    (dict(kw, anchor_teacher=float("inf")), "anchor_teacher"),
    (dict(kw, adaptive_alpha=1), "adaptive_alpha"),
  ):
    with pytest.raises(ValueError, match=name):
      losses.get_loss("distillm2", bad)
  with pytest.raises(ValueError, match="seq_logp"):
    losses.row_inputs("distillm2", jnp.asarray(ON_POLICY), loss_kwargs=kw)
  from opd_jax import configs_lib

  cfg = configs_lib.loss_config("distillm2")
  assert "seq_logp" not in cfg and cfg.adaptive_alpha is False and cfg.anchor_teacher == 0.0
  # Off, the anchors and sequence inputs change nothing.
  s, t, tok = (jnp.asarray(a) for a in _inputs(16))
  on = jnp.asarray(ON_POLICY)
  base = losses.distillm2(s, t, on_policy=on, alpha_teacher=0.2)
  other = losses.distillm2(
    s, t, on_policy=on, alpha_teacher=0.2, anchor_teacher=0.3, seq_logp=on * 1.0, seq_logq=on * 0.0
  )
  np.testing.assert_array_equal(base, other)


def test_todi_endpoints():
  """β = 0: ½(FKL + RKL); large β: per-entry choice of the larger one-sided
  term, both bracketed by the KLs' sum."""
  s, t, tok = (jnp.asarray(a) for a in _inputs(15))
  fkl, rkl = losses.forward_kl(s, t), losses.reverse_kl(s, t)
  np.testing.assert_allclose(losses.todi(s, t, beta=0.0), 0.5 * (fkl + rkl), rtol=1e-5)
  assert np.all(np.asarray(losses.todi(s, t)) <= np.asarray(fkl + rkl) + 1e-6)


def test_akl_head_mask_matches_official_sort():
  s, t, _ = _inputs(16)
  for mu in (0.0, 0.3, 0.5, 0.95):  # (μ = 1: f32 vs f64 rounding of Σq)
    got = np.asarray(losses.akl_head_mask(jnp.asarray(t), mu=mu, teacher_temperature=1.3))
    q = np.exp(np_log_softmax(t, 1.3))
    order = np.argsort(-q, axis=-1, kind="stable")
    tail = np.cumsum(np.take_along_axis(q, order, -1), -1) > mu
    tail[..., 0] = False
    want = np.zeros_like(got)
    np.put_along_axis(want, order, ~tail, -1)
    # Padded columns (q = 0) are tied: compare the real ones.
    np.testing.assert_array_equal(got[..., list(REAL)], want[..., list(REAL)])
    assert np.all(got.sum(-1) >= 1)


def test_akl_head_without_sort_matches_the_sort_reading_with_ties():
  """The bisection head equals the sort reading q ≥ q_(h), h = max(1,
  #{i : Σ_{j≤i} q_(j) ≤ μ}), also with many tied probabilities (integer
  logits) and for μ past the top value's mass."""
  rng = np.random.default_rng(18)
  logits = rng.integers(0, 4, size=(64, 12)).astype(np.float32)
  logits[:4] = 0.0  # all tied
  logits[4, :3] = 9.0  # a tied top group heavier than μ
  for mu in (0.0, 0.1, 0.3, 0.5, 0.77, 0.99):
    got = np.asarray(losses.akl_head_mask(jnp.asarray(logits), mu=mu))
    q = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1)).astype(np.float64)
    srt = -np.sort(-q, axis=-1)
    h = np.maximum((np.cumsum(srt, -1) <= mu).sum(-1), 1)
    want = q >= np.take_along_axis(srt, h[:, None] - 1, -1)
    np.testing.assert_array_equal(got, want, err_msg=f"mu={mu}")


def test_grpo_advantages_match_numpy():
  """Group mean / unbiased std per prompt, eps, std normalisation off, a
  one-row group (mean 0, std 1) and zero-variance groups flagged."""
  rng = np.random.default_rng(19)
  groups = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 5, 5, 5], np.int32)
  rewards = rng.integers(0, 2, size=groups.shape).astype(np.float32)
  rewards[4:8] = 1.0  # a zero-variance group
  rewards[11:] = rng.normal(size=3)
  for kw in ({}, {"eps": 0.1}, {"norm_by_std": False}):
    adv, zero = losses.grpo_advantages(jnp.asarray(rewards), jnp.asarray(groups), **kw)
    want, want_zero = np_grpo(rewards, groups, **kw)
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(zero, want_zero)
  assert np.asarray(zero)[4:8].all() and not np.asarray(zero)[8]


def test_opd_grpo_alpha_zero_is_plain_distillation():
  """α = 0: value and gradient of the sampled-k1 reward form (reward="k1")
  and of top-k OPD (reward="topk"), through the step's fused rule too."""
  s, t, tok = (jnp.asarray(a) for a in _inputs(20))
  rows = _rows("opd_grpo")
  c = jnp.asarray(np.random.default_rng(21).normal(size=(B, C)), jnp.float32)
  for kw, plain in (
    ({}, losses.get_loss("k1", {})),
    ({"reward": "topk", "k": 4}, losses.get_loss("topk_opd", {"k": 4})),
  ):
    fn = losses.get_loss("opd_grpo", dict(kw, alpha=0.0))
    want, want_g = losses.logits_value_and_grad(plain)(s, t, tok, c)
    got, got_g = losses.logits_value_and_grad(fn)(s, t, tok, c, **rows)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-6, atol=1e-7)
    v1, g1 = jax.value_and_grad(lambda x: jnp.sum(c * fn(x, t, tok, **rows)))(s)
    v0, g0 = jax.value_and_grad(lambda x: jnp.sum(c * plain(x, t, tok)))(s)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="outcome_reward"):
    losses.opd_grpo(s, t, tok)
  with pytest.raises(ValueError, match="reward"):
    losses.get_loss("opd_grpo", {"reward": "k3"})


def test_akl_equal_distributions_is_zero():
  s, _, _ = _inputs(17)
  s = jnp.asarray(s)
  val, g = jax.value_and_grad(lambda x: jnp.sum(losses.akl(x, s)))(s)
  assert abs(float(val)) < 1e-6 and np.all(np.isfinite(g)) and np.abs(g).max() < 1e-5


def test_jsd_traced_beta_equals_static_beta():
  """JSD with β traced (a schedule / vmapped sweep) equals the static β,
  endpoints (forward / reverse KL) included, in value and gradient."""
  import jax
  import jax.numpy as jnp

  from opd_jax import losses

  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  s = jax.random.normal(k1, (2, 3, 7))
  t = jax.random.normal(k2, (2, 3, 7))
  for beta in (0.0, 0.3, 1.0):
    f_static = lambda x, b=beta: losses.jsd(x, t, beta=b).sum()
    f_traced = jax.jit(lambda x, b: losses.jsd(x, t, beta=b).sum())
    np.testing.assert_allclose(f_traced(s, jnp.float32(beta)), f_static(s), rtol=1e-5)
    np.testing.assert_allclose(
      jax.grad(f_traced)(s, jnp.float32(beta)), jax.grad(f_static)(s), rtol=1e-4, atol=1e-6
    )
