"""Tests for opd_jax.metrics against a float64 numpy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from opd_jax import metrics

# ----------------------------------------------------------------------------
# float64 numpy reference
# ----------------------------------------------------------------------------


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _topk(x, k):
  """Indices of the k largest entries, ties -> lower index first."""
  return np.argsort(-x, kind="stable")[:k]


def ref_token_metrics(s_logits, t_logits, tokens, k):
  s = np.asarray(s_logits, np.float64)
  t = np.asarray(t_logits, np.float64)
  tokens = np.asarray(tokens)
  *lead, vocab = s.shape
  kk = min(k, vocab)
  out = {name: np.zeros(lead) for name in metrics.TOKEN_METRIC_KEYS}
  for idx in np.ndindex(*lead):
    logp, logq = _log_softmax(s[idx]), _log_softmax(t[idx])
    p, q = np.exp(logp), np.exp(logq)
    S, T = _topk(s[idx], kk), _topk(t[idx], kk)
    inter = [v for v in S if v in set(T)]
    non = [v for v in S if v not in set(T)]
    w = {v: p[v] / p[S].sum() for v in S}
    adv = {v: -w[v] * (logp[v] - logq[v]) for v in S}
    y = tokens[idx]
    hp, hq = -(p * logp).sum(), -(q * logq).sum()
    log_r = logq[y] - logp[y]
    vals = {
      "overlap_ratio": len(inter) / kk,
      "overlap_count": len(inter),
      "nonoverlap_count": len(non),
      "overlap_mass_student": p[inter].sum(),
      "overlap_mass_teacher": q[inter].sum(),
      "topk_mass_student": p[S].sum(),
      "topk_mass_teacher": q[T].sum(),
      "overlap_advantage": np.mean([adv[v] for v in inter]) if inter else 0.0,
      "overlap_advantage_sum": sum(adv[v] for v in inter),
      "nonoverlap_advantage": np.mean([adv[v] for v in non]) if non else 0.0,
      "nonoverlap_advantage_sum": sum(adv[v] for v in non),
      "entropy_student": hp,
      "entropy_teacher": hq,
      "entropy_gap": abs(hq - hp),
      "student_logprob": logp[y],
      "teacher_logprob": logq[y],
      "reverse_kl": (p * (logp - logq)).sum(),
      "k1": -log_r,
      "k2": 0.5 * log_r**2,
      "k3": np.expm1(log_r) - log_r,
      "topk_kl": -sum(adv.values()),
    }
    for name, v in vals.items():
      out[name][idx] = v
  return out


def ref_masked_means(per_token, mask):
  pt = {n: np.asarray(v, np.float64) for n, v in per_token.items()}
  m = np.asarray(mask, np.float64)
  keep = m != 0
  out = {}
  for name, v in pt.items():
    if name in metrics.RATIO_METRICS:
      continue
    out[name] = (m * v)[keep].sum() / m.sum()
  for name, (num, den) in metrics.RATIO_METRICS.items():
    out[name] = (m * pt[num])[keep].sum() / (m * pt[den])[keep].sum()
  for est in metrics.ESTIMATORS:
    err = (pt[est] - pt["reverse_kl"])[keep]
    mm = m[keep] / m[keep].sum()
    bias = (mm * err).sum()
    out[f"{est}_bias"] = bias
    out[f"{est}_mse"] = (mm * err**2).sum()
    out[f"{est}_var"] = (mm * (err - bias) ** 2).sum()
  out["num_tokens"] = m.sum()
  return out


def _random_logits(rng, shape, scale=3.0):
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def _assert_dict_close(got, want, rtol=1e-4, atol=2e-5, keys=None):
  keys = want.keys() if keys is None else keys
  for name in keys:
    np.testing.assert_allclose(
      np.asarray(got[name], np.float64), want[name], rtol=rtol, atol=atol, err_msg=name
    )


_jit_token_metrics = jax.jit(metrics.token_metrics, static_argnames="k")
_jit_accumulate = jax.jit(
  metrics.accumulate, static_argnames=("chunk_len", "num_chunks", "position_keys")
)
_jit_finalize_array = jax.jit(metrics.finalize_array, static_argnames="empty_value")


def _means(per_token, mask, positions=None, **kwargs):
  """Jitted accumulate + finalize_array, split into a dict on the host."""
  empty_value = kwargs.pop("empty_value", 0.0)
  sums = _jit_accumulate(per_token, mask, positions, **kwargs)
  values = np.asarray(_jit_finalize_array(sums, empty_value=empty_value))
  return dict(zip(metrics.finalize_names(sums), values))


# ----------------------------------------------------------------------------
# token_metrics
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
  "shape,k", [((2, 3, 37), 5), ((2, 3, 37), 1), ((2, 3, 37), 37), ((2, 3, 37), 40)]
)
def test_token_metrics_match_numpy(shape, k):
  rng = np.random.default_rng(sum(shape) + k)
  s = _random_logits(rng, shape)
  # Teacher correlated with the student so S∩T is partially full.
  t = (s + _random_logits(rng, shape, 1.5)).astype(np.float32)
  tokens = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  got = _jit_token_metrics(s, t, tokens, k=k)
  assert set(got) == set(metrics.TOKEN_METRIC_KEYS)
  for v in got.values():
    assert v.shape == shape[:-1] and v.dtype == jnp.float32
  _assert_dict_close(got, ref_token_metrics(s, t, tokens, k))


def test_k_at_least_vocab():
  rng = np.random.default_rng(0)
  s, t = _random_logits(rng, (2, 3, 37)), _random_logits(rng, (2, 3, 37))
  tokens = rng.integers(0, 37, (2, 3)).astype(np.int32)
  got = _jit_token_metrics(s, t, tokens, k=40)
  np.testing.assert_array_equal(got["overlap_ratio"], 1.0)
  np.testing.assert_array_equal(got["overlap_count"], 37.0)
  np.testing.assert_array_equal(got["nonoverlap_count"], 0.0)
  np.testing.assert_array_equal(got["nonoverlap_advantage"], 0.0)
  for name in (
    "overlap_mass_student",
    "overlap_mass_teacher",
    "topk_mass_student",
    "topk_mass_teacher",
  ):
    np.testing.assert_allclose(got[name], 1.0, rtol=1e-5, err_msg=name)
  # Full-vocabulary top-k OPD estimate is the exact KL.
  np.testing.assert_allclose(got["topk_kl"], got["reverse_kl"], rtol=1e-4, atol=1e-5)


def test_ties_lower_index_first():
  vocab = 8
  s = np.zeros((1, 1, vocab), np.float32)  # all tied: S = {0, 1, 2}
  t = np.array([[[1, 2, 2, 2, 2, 0, 0, 0]]], np.float32)  # T = {1, 2, 3}
  tokens = np.zeros((1, 1), np.int32)
  got = _jit_token_metrics(s, t, tokens, k=3)
  np.testing.assert_array_equal(got["overlap_count"], 2.0)
  np.testing.assert_allclose(got["overlap_ratio"], 2.0 / 3.0, rtol=1e-7)
  np.testing.assert_allclose(got["overlap_mass_student"], 2.0 / vocab, rtol=1e-6)
  q = np.exp(_log_softmax(t[0, 0].astype(np.float64)))
  np.testing.assert_allclose(got["overlap_mass_teacher"], q[1] + q[2], rtol=1e-6)
  np.testing.assert_allclose(got["topk_mass_teacher"], q[1:4].sum(), rtol=1e-6)
  _assert_dict_close(got, ref_token_metrics(s, t, tokens, 3))


def test_ties_random_integer_logits():
  rng = np.random.default_rng(1)
  shape = (2, 3, 37)
  s = rng.integers(-2, 3, shape).astype(np.float32)  # heavy ties
  t = rng.integers(-2, 3, shape).astype(np.float32)
  tokens = rng.integers(0, 37, shape[:-1]).astype(np.int32)
  got = _jit_token_metrics(s, t, tokens, k=5)
  _assert_dict_close(got, ref_token_metrics(s, t, tokens, 5))


def test_student_equals_teacher():
  rng = np.random.default_rng(2)
  s = _random_logits(rng, (2, 3, 37))
  tokens = rng.integers(0, 37, (2, 3)).astype(np.int32)
  got = _jit_token_metrics(s, s, tokens, k=5)
  np.testing.assert_array_equal(got["overlap_ratio"], 1.0)
  np.testing.assert_array_equal(got["overlap_mass_student"], got["topk_mass_student"])
  np.testing.assert_array_equal(got["overlap_mass_teacher"], got["topk_mass_teacher"])
  for name in (
    "entropy_gap",
    "reverse_kl",
    "overlap_advantage",
    "overlap_advantage_sum",
    "nonoverlap_advantage",
    "nonoverlap_advantage_sum",
    "k1",
    "k2",
    "k3",
    "topk_kl",
  ):
    np.testing.assert_array_equal(got[name], 0.0, err_msg=name)


@pytest.mark.parametrize("k", [5, 40])
def test_padded_vocab_columns(k):
  rng = np.random.default_rng(3)
  real, pad = 37, 8
  s, t = _random_logits(rng, (2, 3, real)), _random_logits(rng, (2, 3, real))
  padding = np.full((2, 3, pad), -1e30, np.float32)
  s_pad = np.concatenate([s, padding], -1)
  t_pad = np.concatenate([t, padding], -1)
  tokens = rng.integers(0, real, (2, 3)).astype(np.int32)
  got = _jit_token_metrics(s_pad, t_pad, tokens, k=k)
  for name, v in got.items():
    assert np.all(np.isfinite(v)), name
  unpadded = _jit_token_metrics(s, t, tokens, k=min(k, real))
  same = [
    n
    for n in metrics.TOKEN_METRIC_KEYS
    if k <= real
    or n
    not in (
      "overlap_ratio",
      "overlap_count",
      "nonoverlap_count",
      "nonoverlap_advantage",
      "overlap_advantage",
    )
  ]
  for name in same:
    np.testing.assert_allclose(got[name], unpadded[name], rtol=1e-5, atol=1e-6, err_msg=name)
  if k > real:
    # Padded picks coincide in S and T (same columns, lower index first).
    np.testing.assert_array_equal(got["overlap_ratio"], 1.0)
    np.testing.assert_allclose(got["overlap_mass_student"], 1.0, rtol=1e-5)
  # Masked means stay finite too.
  means = _means(got, np.ones((2, 3), bool))
  for name, v in means.items():
    assert np.isfinite(v), name


def test_k1_k3_unbiased_under_student_sampling():
  """E_{y~p}[k1] = E_{y~p}[k3] = KL(p||q), enumerating y over the vocab."""
  rng = np.random.default_rng(4)
  vocab = 37
  s = _random_logits(rng, (vocab,), 1.0)
  t = _random_logits(rng, (vocab,), 1.0)
  # Same distributions at every position of a [3, 24] batch (the aggregation
  # tests' shape); the first `vocab` positions enumerate y = 0 .. V-1.
  s_rep = np.broadcast_to(s, (3, 24, vocab))
  t_rep = np.broadcast_to(t, (3, 24, vocab))
  tokens = (np.arange(72) % vocab).reshape(3, 24).astype(np.int32)
  got = {
    n: np.asarray(v, np.float64).reshape(-1)[:vocab]
    for n, v in _jit_token_metrics(s_rep, t_rep, tokens, k=5).items()
  }
  p = np.exp(got["student_logprob"])
  np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-5)
  kl = got["reverse_kl"][0]
  assert kl > 0.05
  np.testing.assert_allclose((p * got["k1"]).sum(), kl, rtol=1e-4)
  np.testing.assert_allclose((p * got["k3"]).sum(), kl, rtol=1e-4)
  # k2 is biased in general (it estimates a different f-divergence).
  assert abs((p * got["k2"]).sum() - kl) > 1e-3


def test_input_validation():
  x = jnp.zeros((1, 2, 5))
  with pytest.raises(ValueError):
    metrics.token_metrics(x, x, jnp.zeros((1, 2), jnp.int32), k=0)
  with pytest.raises(ValueError):
    metrics.token_metrics(x, jnp.zeros((1, 2, 6)), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError):
    metrics.token_metrics(x, x, jnp.zeros((1, 3), jnp.int32))


# ----------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------


def _random_batch(seed, B=3, T=24, V=37):
  rng = np.random.default_rng(seed)
  s = _random_logits(rng, (B, T, V))
  t = (s + _random_logits(rng, (B, T, V), 2.0)).astype(np.float32)
  tokens = rng.integers(0, V, (B, T)).astype(np.int32)
  lengths = np.array([T, T // 2, 3])[:B]
  mask = np.arange(T)[None] < lengths[:, None]
  return s, t, tokens, mask


def test_masked_means_match_numpy():
  s, t, tokens, mask = _random_batch(5)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  # Garbage at masked positions must not leak into the means.
  per_token = {n: jnp.where(mask, v, jnp.nan) for n, v in per_token.items()}
  got = _means(per_token, mask)
  want = ref_masked_means(per_token, mask)
  assert set(got) == set(want) | {f"{e}_mse" for e in metrics.ESTIMATORS}
  _assert_dict_close(got, want, rtol=1e-4, atol=1e-5)
  # Float token weights are honoured.
  w = np.where(mask, np.linspace(0.5, 2.0, mask.size).reshape(mask.shape), 0.0)
  _assert_dict_close(_means(per_token, w), ref_masked_means(per_token, w), rtol=1e-4, atol=1e-5)


def test_public_wrappers():
  """masked_means / position_chunk_means (un-jitted) == accumulate+finalize."""
  s, t, tokens, mask = _random_batch(11)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  # A few keys keep the number of jit outputs (and compile time) small.
  per_token = {
    n: per_token[n]
    for n in (
      "overlap_ratio",
      "reverse_kl",
      "k1",
      "overlap_advantage_sum",
      "overlap_count",
      "overlap_advantage",
    )
  }
  positions = np.broadcast_to(np.arange(24), mask.shape)
  got = jax.jit(metrics.masked_means)(per_token, mask)
  want = _means(per_token, mask)
  assert (
    set(got)
    == set(want)
    == {
      "num_tokens",
      "overlap_ratio",
      "reverse_kl",
      "k1",
      "overlap_count",
      "overlap_advantage_sum",
      "overlap_advantage",
      "k1_bias",
      "k1_mse",
      "k1_var",
    }
  )
  _assert_dict_close(got, want, rtol=1e-6, atol=1e-7)
  got = jax.jit(metrics.position_chunk_means, static_argnums=(3, 4))(
    per_token, mask, positions, 8, 3
  )
  want = _means(per_token, mask, positions, chunk_len=8, num_chunks=3)
  assert set(got) == {n for n in want if "/pos_" in n}
  _assert_dict_close(got, want, rtol=1e-6, atol=1e-7, keys=got.keys())


def test_pooled_advantage_is_candidate_weighted():
  per_token = {
    "overlap_advantage_sum": jnp.array([[3.0, 1.0, 0.0]]),
    "overlap_count": jnp.array([[3.0, 1.0, 0.0]]),
    "overlap_advantage": jnp.array([[1.0, 1.0, 0.0]]),
    "nonoverlap_advantage_sum": jnp.array([[0.0, 0.0, 4.0]]),
    "nonoverlap_count": jnp.array([[0.0, 2.0, 3.0]]),
    "nonoverlap_advantage": jnp.array([[0.0, 0.0, 4.0 / 3.0]]),
  }
  got = _means(per_token, jnp.ones((1, 3)))
  np.testing.assert_allclose(got["overlap_advantage"], 4.0 / 4.0)
  np.testing.assert_allclose(got["nonoverlap_advantage"], 4.0 / 5.0)
  np.testing.assert_allclose(got["overlap_count"], 4.0 / 3.0)


def test_empty_mask_reports_empty_value():
  s, t, tokens, _ = _random_batch(6)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  zeros = np.zeros(tokens.shape, bool)
  got = _means(per_token, zeros)
  for name, v in got.items():
    assert float(v) == 0.0, name
  got = _means(per_token, zeros, empty_value=float("nan"))
  assert float(got["num_tokens"]) == 0.0
  assert np.isnan(got["overlap_ratio"]) and np.isnan(got["k1_var"])


def test_position_chunks_weighted_average_equals_overall():
  s, t, tokens, mask = _random_batch(7)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  positions = np.broadcast_to(np.arange(24), mask.shape)
  L, N = 7, 4  # chunks [0,7) [7,14) [14,21) [21,28) cover all 24 positions
  got = _means(per_token, mask, positions, chunk_len=L, num_chunks=N)
  overall = ref_masked_means(per_token, mask)
  bounds = [(i * L, (i + 1) * L) for i in range(N)]
  counts = np.array([got[f"num_tokens/pos_{a}_{b}"] for a, b in bounds])
  assert counts.sum() == mask.sum()
  for name in per_token:
    if name in metrics.RATIO_METRICS:
      continue
    means = np.array([got[f"{name}/pos_{a}_{b}"] for a, b in bounds])
    np.testing.assert_allclose(
      (counts * means).sum() / counts.sum(), overall[name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  # Each chunk mean is an exact masked mean over its positions.
  for a, b in bounds:
    sub = mask & (positions >= a) & (positions < b)
    suffix = f"/pos_{a}_{b}"
    chunk = {n[: -len(suffix)]: v for n, v in got.items() if n.endswith(suffix)}
    _assert_dict_close(chunk, ref_masked_means(per_token, sub))


def test_position_chunks_exclude_beyond_last_chunk_and_select_keys():
  s, t, tokens, mask = _random_batch(8)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  positions = np.broadcast_to(np.arange(24), mask.shape)
  got = _means(
    per_token, mask, positions, chunk_len=4, num_chunks=2, position_keys=("overlap_ratio", "k1_var")
  )
  chunk_keys = {n for n in got if "/pos_" in n}
  assert chunk_keys == {
    f"{n}/pos_{a}_{b}"
    for n in ("overlap_ratio", "k1_bias", "k1_mse", "k1_var", "num_tokens")
    for a, b in ((0, 4), (4, 8))
  }
  total = got["num_tokens/pos_0_4"] + got["num_tokens/pos_4_8"]
  assert total == (mask & (positions < 8)).sum() < mask.sum()
  sub = mask & (positions >= 4) & (positions < 8)
  want = ref_masked_means(per_token, sub)
  for name in ("overlap_ratio", "k1_var"):
    np.testing.assert_allclose(got[f"{name}/pos_4_8"], want[name], rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError):
    metrics.accumulate(per_token, mask, None, chunk_len=4, num_chunks=2)


def test_chunked_accumulation_equals_one_shot():
  """Sequence chunks -> token_metrics -> accumulate -> merge == one shot."""
  s, t, tokens, mask = _random_batch(9)
  positions = np.broadcast_to(np.arange(24), mask.shape)
  kw = dict(chunk_len=8, num_chunks=3)
  full = _jit_token_metrics(s, t, tokens, k=5)
  want = _means(full, mask, positions, **kw)

  merge = jax.jit(metrics.merge_sums)
  sums = None
  for lo in range(0, 24, 6):  # pieces not aligned to the position chunks
    sl = slice(lo, lo + 6)
    pt = _jit_token_metrics(s[:, sl], t[:, sl], tokens[:, sl], k=5)
    part = _jit_accumulate(pt, mask[:, sl], positions[:, sl], **kw)
    sums = part if sums is None else merge(sums, part)
  got = metrics.finalize(sums)
  assert set(got) == set(want)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  with pytest.raises(ValueError):
    metrics.merge_sums(sums, metrics.MetricSums(sums.total, sums.weight, sums.names[::-1]))
  # The accumulator is a pytree with two leaves: usable as a scan carry.
  leaves, treedef = jax.tree_util.tree_flatten(sums)
  assert len(leaves) == 2
  assert jax.tree_util.tree_unflatten(treedef, leaves).names == sums.names


def test_estimator_bias_var_match_numpy():
  s, t, tokens, mask = _random_batch(10)
  per_token = _jit_token_metrics(s, t, tokens, k=5)
  got = _means(per_token, mask)
  kl = np.asarray(per_token["reverse_kl"], np.float64)[mask]
  for est in metrics.ESTIMATORS:
    err = np.asarray(per_token[est], np.float64)[mask] - kl
    np.testing.assert_allclose(got[f"{est}_bias"], err.mean(), rtol=1e-4, atol=1e-5, err_msg=est)
    np.testing.assert_allclose(
      got[f"{est}_mse"], (err**2).mean(), rtol=1e-4, atol=1e-5, err_msg=est
    )
    np.testing.assert_allclose(got[f"{est}_var"], err.var(), rtol=1e-3, atol=1e-5, err_msg=est)
