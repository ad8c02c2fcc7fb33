"""Token-level teacher/student alignment metrics and the KL-estimator audit.

Implements the token-level diagnostics of "Rethinking On-Policy Distillation of
Large Language Models" (Zuo, He et al., arXiv 2604.13016), Eqs. 6-10, plus an
audit of the sampled KL estimators k1 / k2 / k3 (Schulman) and the top-k OPD
estimate against the exact full-vocabulary reverse KL.

Notation (per position t, temperature 1): student p_t = softmax(student logits),
teacher q_t = softmax(teacher logits), S_t = TopK(p_t, k), T_t = TopK(q_t, k),
renormalised student weights w_t(v) = p_t(v) / sum_{u in S_t} p_t(u) and the
per-candidate top-k OPD advantage (paper Eq. 5)

  A_t(v) = -w_t(v) (log p_t(v) - log q_t(v)),   v in S_t.

Two layers, both pure and jit-able:

* :func:`token_metrics` maps one sequence chunk of logits ``[B, C, V]`` to
  per-token values ``[B, C]`` (no masking, no averaging), so the training step
  can call it inside its chunked logits loop without materialising
  ``[B, T, V]``.
* :func:`accumulate` turns per-token values and a mask into additive
  ``(weighted_sum, weight)`` pairs (a :class:`MetricSums` pytree);
  :func:`merge_sums` adds them across sequence chunks and :func:`finalize`
  divides. Because everything is summed before dividing, accumulating chunk by
  chunk gives exactly the one-shot result. :func:`masked_means` and
  :func:`position_chunk_means` are thin wrappers.

Aggregation conventions (what :func:`finalize` reports):

* Plain metrics: mask-weighted mean over tokens, sum(m * x) / sum(m).
* ``overlap_advantage`` / ``nonoverlap_advantage`` (Eq. 7): pooled mean over all
  (token, candidate) pairs, sum(m * adv_sum) / sum(m * count), built from the
  per-token ``*_advantage_sum`` and ``*_count`` entries. This is *not* the mean
  of the per-token means (which would over-weight tokens with few candidates
  and is undefined for empty sets).
* Estimator audit, for est in (k1, k2, k3, topk_kl) with e = est - reverse_kl:
  ``{est}_bias`` = mean(e), ``{est}_mse`` = mean(e^2) and
  ``{est}_var`` = max(mse - bias^2, 0), all mask-weighted over tokens.
* ``num_tokens`` = sum(m) (a total, not a mean).
* Position chunks: key ``{name}/pos_{a}_{b}`` aggregates over tokens whose
  response position lies in [a, b) with a = i * chunk_len, b = a + chunk_len,
  i < num_chunks. Positions >= num_chunks * chunk_len (and negative ones) are
  excluded from every chunk but still count in the overall metrics.
* A bucket with zero weight reports ``empty_value`` (default 0.0).

Typical use inside the jitted training step (sequence processed in chunks)::

  sums = None
  for c in chunks:  # or a lax.scan with MetricSums in the carry
    pt = token_metrics(student_logits[c], teacher_logits[c], tokens[c], k=16)
    part = accumulate(pt, mask[c], positions[c], chunk_len=1024, num_chunks=8)
    sums = part if sums is None else merge_sums(sums, part)
  return sums  # host side: finalize(sums) -> {name: scalar}
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from opd_jax import losses as losses_lib

Array = jax.Array

# Per-token keys returned by `token_metrics`.
TOKEN_METRIC_KEYS: tuple[str, ...] = (
  "overlap_ratio",
  "overlap_count",
  "nonoverlap_count",
  "overlap_mass_student",
  "overlap_mass_teacher",
  "topk_mass_student",
  "topk_mass_teacher",
  "overlap_advantage",
  "overlap_advantage_sum",
  "nonoverlap_advantage",
  "nonoverlap_advantage_sum",
  "entropy_student",
  "entropy_teacher",
  "entropy_gap",
  "student_logprob",
  "teacher_logprob",
  "reverse_kl",
  "k1",
  "k2",
  "k3",
  "topk_kl",
)

# Pooled ratio metrics: name -> (per-token numerator, per-token denominator).
RATIO_METRICS: Mapping[str, tuple[str, str]] = {
  "overlap_advantage": ("overlap_advantage_sum", "overlap_count"),
  "nonoverlap_advantage": ("nonoverlap_advantage_sum", "nonoverlap_count"),
}

# Estimators audited against the exact KL.
ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3", "topk_kl")
EXACT_KL_KEY = "reverse_kl"
COUNT_KEY = "num_tokens"


def token_metrics(
  student_logits: Array,
  teacher_logits: Array,
  tokens: Array,
  *,
  k: int = 16,
  top_k_fn: Callable[[Array, int], tuple[Array, Array]] = jax.lax.top_k,
) -> dict[str, Array]:
  """Per-token alignment metrics for one sequence chunk.

  Inputs are wrapped in ``stop_gradient`` and cast to float32. Top-k sets are
  taken with ``jax.lax.top_k`` on the logits (same order as on p / q); ties are
  broken by ``top_k``'s documented rule, the lower vocabulary index first.
  ``k`` is clipped to V. Padded vocab columns (finite logits, e.g. -1e30) have
  probability 0 and enter a top-k set only when k exceeds the number of real
  tokens; since both models pad the same columns and ties go to the lower
  index, the padded picks then coincide in S and T (they count in
  ``overlap_ratio`` but add 0 mass and 0 advantage). Token ids are clipped into
  [0, V) so padding ids at masked positions stay finite.

  Args:
    student_logits: [B, C, V] student logits (any leading dims work).
    teacher_logits: [B, C, V] teacher logits, same shape.
    tokens: [B, C] int, the sampled token y_t at each position.
    k: top-k size (paper default 16); clipped to V.
    top_k_fn: ``jax.lax.top_k`` or a drop-in with its contract (values and
      ids of the k largest along the last axis, lowest id first on ties), e.g.
      the step's sharding-aware top-k.

  Returns:
    Dict of [B, C] float32 arrays, keys ``TOKEN_METRIC_KEYS``:
      overlap_ratio: |S∩T| / k (Eq. 6).
      overlap_count, nonoverlap_count: |S∩T|, |S∖T|.
      overlap_mass_student / _teacher: sum_{v in S∩T} p(v) / q(v) (Eqs. 9-10).
      topk_mass_student / _teacher: sum_{v in S} p(v), sum_{v in T} q(v).
      overlap_advantage_sum, nonoverlap_advantage_sum: sum of A(v) over
        S∩T and S∖T; overlap_advantage, nonoverlap_advantage: the per-token
        means (Eq. 7), 0 when the set is empty. Aggregate with the sums and
        counts (see module docstring), not with the per-token means.
      entropy_student, entropy_teacher: H(p), H(q) (full vocabulary).
      entropy_gap: |H(q) - H(p)| (Eq. 8).
      student_logprob, teacher_logprob: log p(y), log q(y).
      reverse_kl: KL(p||q) = sum_v p(v)(log p(v) - log q(v)), full vocabulary.
      k1: log p(y) - log q(y); k2: (log q(y) - log p(y))^2 / 2;
      k3: (r - 1) - log r with r = q(y) / p(y).
      topk_kl: sum_{v in S} w(v)(log p(v) - log q(v)) = -sum_{v in S} A(v).
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if student_logits.shape != teacher_logits.shape:
    raise ValueError(f"logit shapes differ: {student_logits.shape} vs {teacher_logits.shape}")
  if tokens.shape != student_logits.shape[:-1]:
    raise ValueError(
      f"tokens shape {tokens.shape} != logits leading shape {student_logits.shape[:-1]}"
    )
  s_logits = jax.lax.stop_gradient(student_logits).astype(jnp.float32)
  t_logits = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
  vocab = s_logits.shape[-1]
  kk = min(k, vocab)

  # log p = (s - ms) - zs etc. (jax.nn.log_softmax's arithmetic); only the
  # [..., V] passes below touch the whole vocabulary, everything else works on
  # the k candidates' logits, so few [..., V] arrays are ever live.
  ms, zs = losses_lib.log_normalizer(s_logits)
  mt, zt = losses_lib.log_normalizer(t_logits)
  logp = (s_logits - ms) - zs
  logq = (t_logits - mt) - zt
  p = jnp.exp(logp)
  q = jnp.exp(logq)

  # Full-vocabulary quantities; `where` keeps 0 * log 0 = 0 even for -inf.
  ent_p = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
  ent_q = -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)
  kl = jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)

  # Top-k sets; lower index wins ties.
  s_top, s_idx = top_k_fn(s_logits, kk)  # [..., kk]
  t_top, t_idx = top_k_fn(t_logits, kk)
  in_t = jnp.any(s_idx[..., :, None] == t_idx[..., None, :], axis=-1)

  take = lambda x, i: jnp.take_along_axis(x, i, axis=-1)
  logp_s = (s_top - ms) - zs
  logq_s = (take(t_logits, s_idx) - mt) - zt
  p_s = jnp.exp(logp_s)
  q_s = jnp.exp(logq_s)
  q_t = jnp.exp((t_top - mt) - zt)

  mass_s = jnp.sum(p_s, axis=-1)  # > 0: contains argmax p.
  mass_t = jnp.sum(q_t, axis=-1)
  w = p_s / mass_s[..., None]
  adv = -jnp.where(w > 0, w * (logp_s - logq_s), 0.0)  # [..., kk]

  n_ov = jnp.sum(in_t, axis=-1).astype(jnp.float32)
  n_non = kk - n_ov
  adv_ov = jnp.sum(jnp.where(in_t, adv, 0.0), axis=-1)
  adv_non = jnp.sum(jnp.where(in_t, 0.0, adv), axis=-1)

  # Sampled-token estimators, log r = log q(y) - log p(y).
  y = jnp.clip(tokens, 0, vocab - 1).astype(jnp.int32)[..., None]
  logp_y = ((take(s_logits, y) - ms) - zs)[..., 0]
  logq_y = ((take(t_logits, y) - mt) - zt)[..., 0]
  log_r = logq_y - logp_y

  return {
    "overlap_ratio": n_ov / kk,
    "overlap_count": n_ov,
    "nonoverlap_count": n_non,
    "overlap_mass_student": jnp.sum(jnp.where(in_t, p_s, 0.0), axis=-1),
    "overlap_mass_teacher": jnp.sum(jnp.where(in_t, q_s, 0.0), axis=-1),
    "topk_mass_student": mass_s,
    "topk_mass_teacher": mass_t,
    "overlap_advantage": adv_ov / jnp.maximum(n_ov, 1.0),
    "overlap_advantage_sum": adv_ov,
    "nonoverlap_advantage": adv_non / jnp.maximum(n_non, 1.0),
    "nonoverlap_advantage_sum": adv_non,
    "entropy_student": ent_p,
    "entropy_teacher": ent_q,
    "entropy_gap": jnp.abs(ent_q - ent_p),
    "student_logprob": logp_y,
    "teacher_logprob": logq_y,
    "reverse_kl": kl,
    "k1": -log_r,
    "k2": 0.5 * jnp.square(log_r),
    "k3": jnp.expm1(log_r) - log_r,
    "topk_kl": -jnp.sum(adv, axis=-1),
  }


def _terms(per_token: Mapping[str, Array]) -> dict[str, tuple[Array, Array | None]]:
  """Per-token (numerator, denominator) pairs for every reported mean.

  Plain metrics give (x, None), i.e. denominator 1; pooled ratio metrics give
  (advantage sum, candidate count); the estimator audit adds e = est - exact KL
  and e^2 as ``{est}_bias`` and ``{est}_mse``.
  """
  terms = {}
  for name, value in per_token.items():
    if name in RATIO_METRICS:
      continue  # Reported as a pooled ratio below (if its parts are present).
    terms[name] = (value, None)
  for name, (num, den) in RATIO_METRICS.items():
    if num in per_token and den in per_token:
      terms[name] = (per_token[num], per_token[den])
    elif name in per_token:
      terms[name] = (per_token[name], None)
  if EXACT_KL_KEY in per_token:
    exact = per_token[EXACT_KL_KEY]
    for est in ESTIMATORS:
      if est in per_token:
        err = per_token[est] - exact
        terms[f"{est}_bias"] = (err, None)
        terms[f"{est}_mse"] = (jnp.square(err), None)
  return terms


@functools.partial(
  jax.tree_util.register_dataclass, data_fields=["total", "weight"], meta_fields=["names"]
)
@dataclasses.dataclass(frozen=True)
class MetricSums:
  """Additive accumulator; ``finalize`` reports total[i] / weight[i].

  A pytree with two [N] float32 leaves and static ``names`` (so it can be a
  ``lax.scan`` carry or a jit output). Stored as two vectors rather than a
  dict of scalars because every scalar output is a separate XLA buffer/kernel,
  which makes compiling hundreds of metrics slow.
  """

  total: Array
  weight: Array
  names: tuple[str, ...]


def _expand_position_keys(position_keys: Sequence[str] | None) -> set[str] | None:
  if position_keys is None:
    return None
  wanted = set()
  for n in position_keys:
    if n.endswith("_var"):  # Derived in `finalize` from bias and mse.
      wanted |= {n[:-4] + "_bias", n[:-4] + "_mse"}
    else:
      wanted.add(n)
  return wanted


def accumulate(
  per_token: Mapping[str, Array],
  mask: Array,
  positions: Array | None = None,
  *,
  chunk_len: int | None = None,
  num_chunks: int = 0,
  position_keys: Sequence[str] | None = None,
) -> MetricSums:
  """Additive (weighted_sum, weight) pairs for the masked metric means.

  For a term with per-token numerator x and denominator c (c = 1 for plain
  metrics; for pooled advantages x = ``*_advantage_sum`` and c = ``*_count``)
  and token mask m: weighted_sum = sum(m * x), weight = sum(m * c). Pairs from
  disjoint sequence chunks add (:func:`merge_sums`), so chunked accumulation
  followed by :func:`finalize` equals the one-shot means exactly (up to float
  summation order). Values at positions with m == 0 are ignored even if they
  are inf / NaN.

  Args:
    per_token: name -> [B, T] values, e.g. from :func:`token_metrics`.
    mask: [B, T] bool or float token weights (0 excludes the token).
    positions: [B, T] int response position (0-based) of each token; needed
      when ``num_chunks > 0``.
    chunk_len: static position-chunk length L.
    num_chunks: static number N of position chunks [iL, (i+1)L), i < N;
      positions outside [0, N*L) are excluded from the chunk keys.
    position_keys: reported names (e.g. ``"overlap_ratio"``, ``"k1_var"``)
      to split by position; None splits every name.

  Returns:
    :class:`MetricSums` with names ``num_tokens``, every reported metric name
    (see module docstring, ``{est}_var`` excepted: derived in ``finalize``)
    and, per chunk, ``{name}/pos_{a}_{b}`` and ``num_tokens/pos_{a}_{b}``.
  """
  if num_chunks > 0 and (positions is None or chunk_len is None or chunk_len < 1):
    raise ValueError("num_chunks > 0 needs positions and chunk_len >= 1")
  m = jnp.asarray(mask, jnp.float32)
  terms = _terms(per_token)
  names = list(terms)
  keep = m != 0
  ones = jnp.ones_like(m)
  # [M, B, T] numerators / denominators, zeroed where masked out (they may
  # hold inf / NaN there). Every bucket mask below is a sub-mask of m.
  num = jnp.stack([ones] + [jnp.where(keep, terms[n][0], 0.0) for n in names])
  den = jnp.stack(
    [ones] + [ones if terms[n][1] is None else jnp.where(keep, terms[n][1], 0.0) for n in names]
  )
  names = [COUNT_KEY] + names
  # [K, B, T] bucket masks: everything, then the position chunks.
  buckets, suffixes = [m], [""]
  for i in range(num_chunks):
    lo, hi = i * chunk_len, (i + 1) * chunk_len
    buckets.append(jnp.where((positions >= lo) & (positions < hi), m, 0.0))
    suffixes.append(f"/pos_{lo}_{hi}")
  mb = jnp.stack(buckets)
  # Two contractions instead of K * M separate masked reductions.
  dims = tuple(range(1, num.ndim))
  contract = functools.partial(
    jnp.tensordot, axes=(dims, dims), precision=jax.lax.Precision.HIGHEST
  )
  num_sums = contract(mb, num).reshape(-1)  # [K * M], bucket-major
  den_sums = contract(mb, den).reshape(-1)

  wanted = _expand_position_keys(position_keys)
  out_names, index = [], []
  for b, suffix in enumerate(suffixes):
    for j, name in enumerate(names):
      if b == 0 or j == 0 or wanted is None or name in wanted:
        out_names.append(name + suffix)
        index.append(b * len(names) + j)
  index = np.asarray(index)
  return MetricSums(num_sums[index], den_sums[index], tuple(out_names))


def merge_sums(a: MetricSums, b: MetricSums) -> MetricSums:
  """Adds two :func:`accumulate` results with the same names."""
  if a.names != b.names:
    raise ValueError(f"name mismatch: {sorted(set(a.names) ^ set(b.names))}")
  return MetricSums(a.total + b.total, a.weight + b.weight, a.names)


def _var_plan(names: Sequence[str]) -> tuple[list[str], list[int], list[int]]:
  """Names and (mse, bias) indices of the derived ``{est}_var`` entries."""
  index = {n: i for i, n in enumerate(names)}
  var_names, mse_idx, bias_idx = [], [], []
  for name in names:
    base, sep, suffix = name.partition("/")
    for est in ESTIMATORS:
      bias_name = f"{est}_bias{sep}{suffix}"
      if base == f"{est}_mse" and bias_name in index:
        var_names.append(f"{est}_var{sep}{suffix}")
        mse_idx.append(index[name])
        bias_idx.append(index[bias_name])
  return var_names, mse_idx, bias_idx


def finalize_names(sums: MetricSums) -> tuple[str, ...]:
  """Names of the :func:`finalize_array` entries (static)."""
  return tuple(sums.names) + tuple(_var_plan(sums.names)[0])


def finalize_array(sums: MetricSums, *, empty_value: float = 0.0) -> Array:
  """Vectorised :func:`finalize`: [N'] values, named by ``finalize_names``."""
  nonempty = sums.weight > 0
  means = jnp.where(nonempty, sums.total / jnp.where(nonempty, sums.weight, 1.0), empty_value)
  is_count = np.array([n.partition("/")[0] == COUNT_KEY for n in sums.names])
  means = jnp.where(is_count, sums.total, means)
  var_names, mse_idx, bias_idx = _var_plan(sums.names)
  if var_names:
    mse_idx, bias_idx = np.asarray(mse_idx), np.asarray(bias_idx)
    var = jnp.maximum(means[mse_idx] - jnp.square(means[bias_idx]), 0.0)
    var = jnp.where(nonempty[mse_idx], var, empty_value)
    means = jnp.concatenate([means, var])
  return means


def finalize(sums: MetricSums, *, empty_value: float = 0.0) -> dict[str, Array]:
  """Divides accumulated pairs into means; adds ``{est}_var`` entries.

  ``num_tokens[/pos_a_b]`` is reported as the total weight. For estimator
  audits, var = max(mse - bias^2, 0). A zero-weight bucket reports
  ``empty_value``. Works inside jit, but each dict entry is then a separate
  output buffer (slow to compile for hundreds of metrics): prefer returning
  the :class:`MetricSums` (or :func:`finalize_array`) from the jitted step and
  calling this on the host.
  """
  values = finalize_array(sums, empty_value=empty_value)
  return {n: values[i] for i, n in enumerate(finalize_names(sums))}


def masked_means(per_token: Mapping[str, Array], mask: Array) -> dict[str, Array]:
  """Mask-weighted means of every metric plus estimator bias / mse / var.

  See the module docstring for the conventions (pooled advantages, audit).
  """
  return finalize(accumulate(per_token, mask))


def position_chunk_means(
  per_token: Mapping[str, Array],
  mask: Array,
  positions: Array,
  chunk_len: int,
  num_chunks: int,
  *,
  position_keys: Sequence[str] | None = None,
) -> dict[str, Array]:
  """Means per response-position chunk, keys ``{name}/pos_{a}_{b}``.

  Chunk i covers positions [i*chunk_len, (i+1)*chunk_len), i < num_chunks;
  positions beyond num_chunks*chunk_len are excluded. Each chunk mean is an
  exact mask-weighted mean, so when the chunks cover every masked token the
  ``num_tokens/pos_a_b``-weighted average of chunk means is the overall mean.
  """
  out = finalize(
    accumulate(
      per_token,
      mask,
      positions,
      chunk_len=chunk_len,
      num_chunks=num_chunks,
      position_keys=position_keys,
    )
  )
  return {name: v for name, v in out.items() if "/pos_" in name}
