"""Attention over many queries (prefill, training): ``ModelConfig.attention``.

All take grouped queries qg ``[B, T, K, G, Dh]``, keys ``[B, K, Dh, S]``
(transposed, as cached), values ``[B, K, S, Dh]``, key_valid ``[B, S]`` (left
padding) and q_slot ``[T]`` (each query's cache slot; query t sees the valid
keys at slots <= q_slot[t]) and return ``[B, T, K, G, Dh]`` =
softmax(q kᵀ / sqrt(Dh) + mask) v, scores and softmax in float32.

* ``dense``: the reference; scores ``[B, K, G, T, S]`` (in query blocks of
  ``attention_block`` under remat when T is larger).
* ``blockwise`` (default): flash attention in pure JAX (Dao 2023,
  FlashAttention-2): query blocks x key blocks with an online softmax; a
  ``custom_vjp`` keeps only the output and the row logsumexp and recomputes
  each tile in the backward pass, so memory is linear in T and S both ways.
  Key blocks entirely after a query block's last slot are skipped.
* ``xla`` / ``cudnn``: ``jax.nn.dot_product_attention`` with that
  implementation (``xla`` materialises the scores; ``cudnn`` needs a GPU).
* ``pallas_tpu``: the Pallas TPU flash-attention kernel for the cache-free
  (training) case, S == T from slot 0; prefill into a cache uses ``blockwise``.
  Needs a TPU, or TPU interpret mode (``pltpu.force_tpu_interpret_mode``).

Fully masked rows (left-pad queries) come out finite: zeros from the
blockwise tiles, a mean of values from ``dense``/``xla``; no real token reads
them. ``blockwise`` takes the dense path when one tile holds everything
(T <= attention_block and S <= attention_key_block: the small models).

One query per row over the KV cache (a decode step; ``decode_attention``):
:func:`decode_blocked` (flash-decoding over only the cache blocks up to the
query's slot, one ``dynamic_slice`` per block, so a scanned model reads
straight from the stacked cache), :func:`decode_dense` (every allocated slot),
``phased``: :func:`decode_dense` over a cache that grows in phases of
``decode_phase_slots`` slots (the sampler runs one decode loop per phase,
``Transformer.cache_lengths`` / ``grow_cache``), so the work tracks the filled
length without a per-block loop, or ``pallas_gpu``: the Pallas GPU (Triton)
split-K decode kernel (:func:`decode_pallas_gpu`; interpret mode off GPU).
TPU decode uses ``blocked`` (Pallas TPU's paged kernels take a paged cache
and no left padding). Backend choices ``decode_contraction`` /
``key_cache_layout`` resolve "auto" with :func:`resolve_contraction` /
:func:`resolve_key_layout`.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np

NEG_INF = -1e30  # finite "minus infinity": masked rows stay NaN-free
IMPLEMENTATIONS = ("blockwise", "dense", "xla", "cudnn", "pallas_tpu")


def validate(attention: str, query_block: int, key_block: int) -> None:
  """ValueError naming the setting for an unknown implementation or block size."""
  if attention not in IMPLEMENTATIONS:
    raise ValueError(f"attention={attention!r}; expected one of {IMPLEMENTATIONS}")
  if attention == "blockwise" and (query_block < 1 or key_block < 1):
    raise ValueError(
      f"attention='blockwise' needs attention_block >= 1 and "
      f"attention_key_block >= 1, got {query_block}, {key_block}"
    )
  if query_block < 0 or key_block < 0:
    raise ValueError(f"attention_block={query_block}, attention_key_block={key_block} must be >= 0")


def allowed(q_slot, key_valid, k_slot):
  """Mask ``[B, Tq, Sk]``: key valid and at a slot <= the query's."""
  return (k_slot[None, :] <= q_slot[:, None])[None] & key_valid[:, None, :]


def _dense_core(qg, keys, values, key_valid, q_slot, dt):
  s = keys.shape[3]
  mask = allowed(q_slot, key_valid, jnp.arange(s))
  if jax.default_backend() == "cpu":
    # XLA:CPU (jax >= 0.12) has no bf16 x bf16 -> f32 dot (the backward pass
    # needs one): float32 operands give the same exact products and sums.
    qg, keys = qg.astype(jnp.float32), keys.astype(jnp.float32)
  # Keys back to [B, K, S, Dh]; on fresh keys this undoes the caller's
  # transpose and XLA drops the pair.
  scores = jnp.einsum(
    "btkgd,bksd->bkgts", qg, jnp.swapaxes(keys, 2, 3), preferred_element_type=jnp.float32
  ) / np.sqrt(qg.shape[-1])
  scores = jnp.where(mask[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  return jnp.einsum("bkgts,bksd->btkgd", probs, values)


def dense(qg, keys, values, key_valid, q_slot, dt, block: int = 0):
  """Reference attention; with ``0 < block < T`` in query blocks under remat
  (scores ``[B, K, G, block, S]`` at a time)."""
  b, t, kh, g, dh = qg.shape
  if not block or t <= block:
    return _dense_core(qg, keys, values, key_valid, q_slot, dt)
  nb = -(-t // block)
  pad = nb * block - t
  qb = jnp.pad(qg, [(0, 0), (0, pad), (0, 0), (0, 0), (0, 0)])
  qb = jnp.moveaxis(qb.reshape(b, nb, block, kh, g, dh), 1, 0)
  sb = jnp.pad(q_slot, (0, pad), mode="edge").reshape(nb, block)
  attend = jax.checkpoint(lambda x: _dense_core(x[0], keys, values, key_valid, x[1], dt))
  out = jnp.moveaxis(jax.lax.map(attend, (qb, sb)), 0, 1)
  return out.reshape(b, nb * block, kh, g, dh)[:, :t]


# -- blockwise (flash) attention ----------------------------------------------


def _tile(qi, kj, si, valid_j, j, bk):
  """Masked float32 scores of one tile ``[B, K, G, bq, bk]`` and its mask
  (qi ``[B, bq, K, G, Dh]``, kj ``[B, K, bk, Dh]``)."""
  s = jnp.einsum("bqkgd,bksd->bkgqs", qi, kj, preferred_element_type=jnp.float32) / np.sqrt(
    qi.shape[-1]
  )
  mask = allowed(si, valid_j, j * bk + jnp.arange(bk))[:, None, None]
  return jnp.where(mask, s, NEG_INF), mask


def _flash_fwd_impl(q, k, v, valid, q_slot, bq, bk, dt):
  """q ``[B, nq*bq, K, G, Dh]``, k and v ``[B, K, nk*bk, Dh]``,
  valid ``[B, nk*bk]``, q_slot ``[nq*bq]`` nondecreasing. Returns out (same
  shape as q) and the row logsumexp ``[nq, B, K, G, bq]`` (float32)."""
  b, tp, kh, g, dh = q.shape
  nq, nk = tp // bq, k.shape[2] // bk

  def q_block(i):
    qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
    si = jax.lax.dynamic_slice_in_dim(q_slot, i * bq, bq)

    def body(j, carry):
      m, l, acc = carry  # [B,K,G,bq] x2, [B,K,G,bq,Dh]
      kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      vaj = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)
      s, mask = _tile(qi, kj, si, vaj, j, bk)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(dt), vj, preferred_element_type=jnp.float32)
      return m_new, l, acc * corr[..., None] + pv

    init = (
      jnp.full((b, kh, g, bq), NEG_INF, jnp.float32),
      jnp.zeros((b, kh, g, bq), jnp.float32),
      jnp.zeros((b, kh, g, bq, dh), jnp.float32),
    )
    # Causal: key blocks past the block's last query slot hold no allowed key.
    hi = jnp.minimum(nk, si[-1] // bk + 1)
    m, l, acc = jax.lax.fori_loop(0, hi, body, init)
    l = jnp.where(l == 0, 1.0, l)  # fully masked row: out 0
    out = (acc / l[..., None]).astype(dt)
    return jnp.moveaxis(out, 3, 1), m + jnp.log(l)  # [B,bq,K,G,Dh], [B,K,G,bq]

  out, lse = jax.lax.map(q_block, jnp.arange(nq))
  return jnp.moveaxis(out, 0, 1).reshape(b, tp, kh, g, dh), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, valid, q_slot, bq, bk, dt):
  return _flash_fwd_impl(q, k, v, valid, q_slot, bq, bk, dt)[0]


def _flash_fwd(q, k, v, valid, q_slot, bq, bk, dt):
  out, lse = _flash_fwd_impl(q, k, v, valid, q_slot, bq, bk, dt)
  return out, (q, k, v, valid, q_slot, out, lse)


def _flash_bwd(bq, bk, dt, res, d_out):
  """FlashAttention-2 backward: for each key block j, a loop over the query
  blocks that can see it recomputes P = exp(S - lse) and accumulates
  dV_j += Pᵀ dO, dK_j += dSᵀ Q, dQ_i += dS K_j with dS = P (dO Vᵀ - D),
  D = rowsum(dO * O)."""
  q, k, v, valid, q_slot, out, lse = res
  b, tp, kh, g, dh = q.shape
  nq, nk = tp // bq, k.shape[2] // bk
  scale = 1.0 / np.sqrt(dh)
  d_out = d_out.astype(dt)
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  delta = delta.reshape(b, nq, bq, kh, g).transpose(1, 0, 3, 4, 2)  # [nq,B,K,G,bq]
  last_slot = q_slot.reshape(nq, bq)[:, -1]

  def k_block(dq, j):
    kj = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
    vj = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
    vaj = jax.lax.dynamic_slice_in_dim(valid, j * bk, bk, axis=1)

    def body(i, carry):
      dq, dk, dv = carry
      qi = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
      doi = jax.lax.dynamic_slice_in_dim(d_out, i * bq, bq, axis=1)
      si = jax.lax.dynamic_slice_in_dim(q_slot, i * bq, bq)
      s, mask = _tile(qi, kj, si, vaj, j, bk)
      p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
      dv = dv + jnp.einsum(
        "bkgqs,bqkgd->bksd", p.astype(dt), doi, preferred_element_type=jnp.float32
      )
      dp = jnp.einsum("bqkgd,bksd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
      ds = (p * (dp - delta[i][..., None]) * scale).astype(dt)
      dk = dk + jnp.einsum("bkgqs,bqkgd->bksd", ds, qi, preferred_element_type=jnp.float32)
      dqi = jnp.einsum("bkgqs,bksd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(
        dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dqi, i * bq, axis=1
      )
      return dq, dk, dv

    init = (dq, jnp.zeros((b, kh, bk, dh), jnp.float32), jnp.zeros((b, kh, bk, dh), jnp.float32))
    # Query blocks whose last slot is before this key block see none of it.
    lo = jnp.sum(last_slot < j * bk).astype(jnp.int32)
    dq, dk, dv = jax.lax.fori_loop(lo, nq, body, init)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)  # [B, K, nk, bk, Dh] -> S
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  return dq.astype(q.dtype), dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise(qg, keys, values, key_valid, q_slot, dt, block_q: int = 256, block_k: int = 512):
  """Flash attention (see module doc); memory O(T + S) plus one
  ``[B, K, G, block_q, block_k]`` tile. One tile's worth of queries and keys
  (T <= block_q, S <= block_k) takes the dense path: same memory, fewer ops."""
  b, t, kh, g, dh = qg.shape
  s = keys.shape[3]
  if t <= block_q and s <= block_k:
    return _dense_core(qg, keys, values, key_valid, q_slot, dt)
  bq, bk = min(block_q, t), min(block_k, s)
  tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
  q_slot = jnp.asarray(q_slot, jnp.int32)
  # Keys back to [B, K, S, Dh] (on fresh keys this undoes the caller's
  # transpose); XLA:CPU has no bf16 x bf16 -> f32 dot contracting [.., Dh, S].
  keys = jnp.swapaxes(keys, 2, 3)
  if tp > t:
    qg = jnp.pad(qg, [(0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)])
    q_slot = jnp.concatenate([q_slot, q_slot[-1] + 1 + jnp.arange(tp - t, dtype=jnp.int32)])
  if sp > s:
    keys = jnp.pad(keys, [(0, 0), (0, 0), (0, sp - s), (0, 0)])
    values = jnp.pad(values, [(0, 0), (0, 0), (0, sp - s), (0, 0)])
    key_valid = jnp.pad(key_valid, [(0, 0), (0, sp - s)])
  # XLA:CPU (jax >= 0.12) has no bf16 x bf16 -> f32 dot at all: there the
  # tiles multiply in float32 (exact products of the bf16 values, the same
  # accumulation); accelerators keep bf16 operands with float32 accumulation.
  op_dt = jnp.float32 if jax.default_backend() == "cpu" else jnp.dtype(dt)
  out = _flash(
    qg.astype(dt).astype(op_dt),
    keys.astype(dt).astype(op_dt),
    values.astype(dt).astype(op_dt),
    key_valid,
    q_slot,
    bq,
    bk,
    op_dt,
  )
  return out[:, :t].astype(dt)


# -- library kernels ------------------------------------------------------------


def _bnth(qg, keys, values):
  """Grouped layouts -> ``[B, T, H, Dh]`` queries, ``[B, S, K, Dh]`` keys/values."""
  b, t, kh, g, dh = qg.shape
  return (
    qg.reshape(b, t, kh * g, dh),
    jnp.transpose(keys, (0, 3, 1, 2)),
    jnp.swapaxes(values, 1, 2),
  )


def library(qg, keys, values, key_valid, q_slot, dt, implementation: str, aligned: bool):
  """``jax.nn.dot_product_attention(implementation=...)``. ``aligned``: no
  cache (S == T, query t at slot t), so causality is ``is_causal`` and the
  mask is only key validity ``[B, 1, 1, S]``; else an explicit ``[B, 1, T, S]``
  mask of cache slots."""
  if implementation == "cudnn" and jax.default_backend() != "gpu":
    raise ValueError(
      f"attention='cudnn' needs a GPU backend; this one is "
      f"{jax.default_backend()!r} (use 'blockwise')"
    )
  b, t, kh, g, dh = qg.shape
  q, k, v = _bnth(qg.astype(dt), keys.astype(dt), values.astype(dt))
  if aligned:
    mask, causal = key_valid[:, None, None, :], True
  else:
    mask, causal = allowed(q_slot, key_valid, jnp.arange(keys.shape[3]))[:, None], False
  out = jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=causal, implementation=implementation
  )
  return out.reshape(b, t, kh, g, dh).astype(dt)


def _tpu_interpret_mode() -> bool:
  try:
    from jax._src import config as jax_config

    return jax_config.pallas_tpu_interpret_mode_context_manager.value is not None
  except AttributeError:
    return False


def pallas_tpu(qg, keys, values, key_valid, dt, block: int = 128, sharder=None):
  """Pallas TPU flash attention, cache-free case (query t at slot t, S == T).
  Left padding as segment ids (pads 0, tokens 1) with ``causal=True``: a pad
  query sees the pads before it, never a fully masked row. GQA by repeating
  the kv heads. T is padded to a multiple of ``block`` (a multiple of 128).
  With a mesh (``sharder``) the kernel runs per shard under ``shard_map``
  (batch and heads split as the activations; a Pallas call is not partitioned
  by XLA itself)."""
  if jax.default_backend() != "tpu" and not _tpu_interpret_mode():
    raise ValueError(
      f"attention='pallas_tpu' needs a TPU backend (or Pallas TPU "
      f"interpret mode); this one is {jax.default_backend()!r} "
      f"(use 'blockwise')"
    )
  from jax.experimental.pallas.ops.tpu import flash_attention as fa

  b, t, kh, g, dh = qg.shape
  tp = -(-t // block) * block
  q = jnp.transpose(qg.astype(dt).reshape(b, t, kh * g, dh), (0, 2, 1, 3))  # [B,H,T,Dh]
  k = jnp.repeat(jnp.transpose(keys.astype(dt), (0, 1, 3, 2)), g, axis=1)  # [B,H,S,Dh]
  v = jnp.repeat(values.astype(dt), g, axis=1)
  seg = key_valid.astype(jnp.int32)
  if tp > t:
    pad4 = [(0, 0), (0, 0), (0, tp - t), (0, 0)]
    q, k, v = jnp.pad(q, pad4), jnp.pad(k, pad4), jnp.pad(v, pad4)
    seg = jnp.pad(seg, [(0, 0), (0, tp - t)])
  sizes = fa.BlockSizes(
    block_q=block,
    block_k_major=block,
    block_k=block,
    block_b=1,
    block_q_major_dkv=block,
    block_k_major_dkv=block,
    block_k_dkv=block,
    block_q_dkv=block,
    block_k_major_dq=block,
    block_k_dq=block,
    block_q_dq=block,
  )
  kernel = lambda q, k, v, seg: fa.flash_attention(
    q,
    k,
    v,
    segment_ids=fa.SegmentIds(seg, seg),
    causal=True,
    sm_scale=1.0 / np.sqrt(dh),
    block_sizes=sizes,
  )
  if sharder is not None and sharder.mesh is not None:
    qspec = sharder.spec(("activation_batch", "activation_heads", None, None), q.shape)
    sspec = jax.sharding.PartitionSpec(qspec[0], None)
    kernel = jax.shard_map(
      kernel,
      mesh=sharder.mesh,
      in_specs=(qspec, qspec, qspec, sspec),
      out_specs=qspec,
      check_vma=False,
    )
  out = kernel(q, k, v, seg)
  out = jnp.transpose(out[:, :, :t], (0, 2, 1, 3))  # [B,T,H,Dh]
  return out.reshape(b, t, kh, g, dh).astype(dt)


def attend_many(cfg, qg, keys, values, key_valid, q_slot, dt, aligned: bool, sharder=None):
  """Dispatch on ``cfg.attention`` (T > 1 queries). ``aligned``: no cache
  (S == T, query t at slot t); ``sharder``: the mesh for ``pallas_tpu``."""
  impl = cfg.attention
  if impl == "dense":
    return dense(qg, keys, values, key_valid, q_slot, dt, cfg.attention_block)
  if impl in ("xla", "cudnn"):
    return library(qg, keys, values, key_valid, q_slot, dt, impl, aligned)
  if impl == "pallas_tpu" and aligned:
    return pallas_tpu(qg, keys, values, key_valid, dt, sharder=sharder)
  if impl in ("blockwise", "pallas_tpu"):
    return blockwise(
      qg,
      keys,
      values,
      key_valid,
      q_slot,
      dt,
      cfg.attention_block or 256,
      cfg.attention_key_block or 512,
    )
  raise ValueError(f"attention={impl!r}; expected one of {IMPLEMENTATIONS}")


# -- one query per row: decode attention over the KV cache ---------------------

DECODE_IMPLEMENTATIONS = ("auto", "blocked", "dense", "phased", "pallas_gpu")
CONTRACTIONS = ("auto", "reduce", "dot")
KEY_LAYOUTS = ("auto", "transposed", "standard")


def validate_decode(
  decode_attention: str, block: int, contraction: str, key_layout: str, phase_slots: int = 512
) -> None:
  """ValueError naming the setting for an unknown decode choice or block size."""
  if decode_attention not in DECODE_IMPLEMENTATIONS:
    raise ValueError(
      f"decode_attention={decode_attention!r}; expected one of {DECODE_IMPLEMENTATIONS}"
    )
  if decode_attention == "blocked" and block < 1:
    raise ValueError(f"decode_attention='blocked' needs decode_block >= 1, got {block}")
  if isinstance(phase_slots, bool) or int(phase_slots) != phase_slots or phase_slots < 1:
    raise ValueError(f"decode_phase_slots must be an int >= 1, got {phase_slots!r}")
  if contraction not in CONTRACTIONS:
    raise ValueError(f"decode_contraction={contraction!r}; expected one of {CONTRACTIONS}")
  if key_layout not in KEY_LAYOUTS:
    raise ValueError(f"key_cache_layout={key_layout!r}; expected one of {KEY_LAYOUTS}")


def resolve_decode(decode_attention: str, scan_layers: bool) -> str:
  """``"auto"`` -> ``"blocked"`` (reads only the filled cache blocks) on
  accelerators and for scanned layers (dense decode there indexes the layer's
  cache out of the stacked carry, a copy of it every step), ``"phased"`` for
  unrolled layers on XLA:CPU, which copies each ``dynamic_slice``d block
  before its dot, so one dense read of a cache that grows in phases is faster
  there than the block loop (``experiments/bench_sampler.py``; the README's
  table)."""
  if decode_attention == "auto":
    return "blocked" if scan_layers or jax.default_backend() != "cpu" else "phased"
  return decode_attention


def phase_lengths(prompt_len: int, max_new: int, decode: str, phase_slots: int) -> tuple[int, ...]:
  """Cache sizes of the sampler's decode phases for P = ``prompt_len`` prompt
  slots and N = ``max_new`` new ones: ``(P + N,)`` (one fixed cache) unless
  ``decode`` (resolved) is ``"phased"``: K = ceil(N / phase_slots) phases,
  phase k (1-based) ending at P + ceil(k·N / K) slots. Decode attention work
  is then Σ_k (N/K)·(P + kN/K) ≈ N·P + N²(K + 1)/(2K) instead of N·(P + N)."""
  if decode == "pallas_gpu":  # the kernel's key splits need S = k_splits·16·m
    return (_round_up(prompt_len + max_new, 16 * _gpu_key_splits(prompt_len + max_new)),)
  if decode != "phased":
    return (prompt_len + max_new,)
  k = -(-max_new // phase_slots)
  return tuple(prompt_len + -(-i * max_new // k) for i in range(1, k + 1))


def resolve_contraction(contraction: str) -> str:
  """``"auto"`` -> ``"dot"`` (dot_general) on every backend. On XLA:CPU (jax
  0.10) the batched q·kᵀ / p·v dots over transposed keys measured 2.4x the
  multiply-and-reduce loop kernels' rate (7.5 vs 3.2 GMAC/s, 8 rows x 2 kv
  heads x 2048 slots); ``"reduce"`` is the former XLA:CPU choice (a dot_general
  there ran B·K small matmuls one at a time in older XLA)."""
  if contraction == "auto":
    return "dot"
  return contraction


def resolve_key_layout(key_layout: str) -> str:
  """``"auto"`` -> ``"transposed"`` keys ``[B, K, Dh, S]`` on XLA:CPU (a decode
  step's q·k then reduces over a non-minor axis, one fused loop kernel; the
  ``[.., S, Dh]`` minor-axis reduce went to a ~4x slower library call),
  ``"standard"`` ``[B, K, S, Dh]`` elsewhere (the layout kernels expect)."""
  if key_layout == "auto":
    return "transposed" if jax.default_backend() == "cpu" else "standard"
  return key_layout


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _gpu_key_splits(slots: int) -> int:
  """Key splits of the Pallas GPU decode kernel for ``slots`` cache slots:
  one per 256 slots, 1 to 16 (each split >= 16 slots, as the kernel needs)."""
  return max(1, min(16, -(-slots // 256)))


def decode_pallas_gpu(
  q, cache_k, cache_v, key_valid, index, dt, key_layout="standard", sharder=None
):
  """The Pallas GPU (Triton) decode-attention kernel,
  ``jax.experimental.pallas.ops.gpu.decode_attention.gqa``: split-K flash
  decoding over the slots ``[start_b, index]`` of each row b, with start_b its
  first valid slot (the sampler's valid slots are contiguous: left pads, then
  the prompt and every generated token). q ``[B, K, G, Dh]``, one layer's
  cache (S a multiple of 16·splits: ``phase_lengths`` sizes it); returns
  ``[B, K, G, Dh]`` in dt. Off GPU it runs in Pallas interpret mode (exact,
  slow: for tests). With a mesh (``sharder``) the kernel runs per shard under
  ``shard_map``, rows and kv heads split as the cache (XLA does not partition
  a Pallas call)."""
  with warnings.catch_warnings():  # jax >= 0.12 marks its bundled kernels deprecated
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas.ops.gpu import decode_attention as pallas_decode

  b, kh, g, dh = q.shape
  s = key_valid.shape[1]
  splits = _gpu_key_splits(s)
  if s % (16 * splits):
    raise ValueError(f"decode_attention='pallas_gpu' needs a cache of 16·{splits}·m slots, got {s}")
  if key_layout == "transposed":
    cache_k = jnp.swapaxes(cache_k, 2, 3)
  start = jnp.argmax(key_valid, axis=1).astype(jnp.int32)  # first valid slot per row
  end = jnp.broadcast_to(jnp.asarray(index, jnp.int32) + 1, (b,))

  def kernel(q, k, v, start, end):
    rows, heads = q.shape[:2]
    out = pallas_decode.gqa(
      q.reshape(rows, heads * g, dh),
      jnp.swapaxes(k, 1, 2),  # [B, S, K, Dh], as the kernel takes them
      jnp.swapaxes(v, 1, 2),
      start_idx=start,
      kv_seq_len=end,
      block_k=math.gcd(s // splits, 128),
      k_splits=splits,
      interpret=jax.default_backend() != "gpu",
    )
    return out.reshape(rows, heads, g, dh)

  if sharder is not None and sharder.mesh is not None:
    spec = sharder.spec(("cache_batch", "cache_kv_heads", None, None), cache_v.shape)
    rows = jax.sharding.PartitionSpec(spec[0])
    kernel = jax.shard_map(
      kernel,
      mesh=sharder.mesh,
      in_specs=(spec, spec, spec, rows, rows),
      out_specs=spec,
      check_vma=False,
    )
  return kernel(q, cache_k, cache_v, start, end).astype(dt)


def _precision():
  """Float32 dots at full precision: XLA:CPU's default already is (and takes
  its fast library path only without an explicit precision); TPU / GPU
  defaults would round the operands to bf16 / tf32."""
  return None if jax.default_backend() == "cpu" else jax.lax.Precision.HIGHEST


def _scores(q, kj, contraction, key_layout):
  """q ``[B, K, G, Dh]`` float32 · keys ``[B, K, Dh, s]`` (transposed) or
  ``[B, K, s, Dh]`` (standard) -> float32 scores ``[B, K, G, s]`` / sqrt(Dh)."""
  kj = kj.astype(jnp.float32)
  if contraction == "reduce":
    if key_layout == "transposed":
      s = jnp.sum(q[..., None] * kj[:, :, None], axis=-2)
    else:
      s = jnp.sum(q[..., None, :] * kj[:, :, None], axis=-1)
  else:
    eq = "bkgd,bkds->bkgs" if key_layout == "transposed" else "bkgd,bksd->bkgs"
    s = jnp.einsum(eq, q, kj, precision=_precision())
  return s / np.sqrt(q.shape[-1])


def _weighted_values(p, vj, contraction):
  """Float32 p ``[B, K, G, s]`` · values ``[B, K, s, Dh]`` -> ``[B, K, G, Dh]``."""
  vj = vj.astype(jnp.float32)
  if contraction == "reduce":
    return jnp.sum(p[..., None] * vj[:, :, None], axis=-2)
  return jnp.einsum("bkgs,bksd->bkgd", p, vj, precision=_precision())


def _read(cache, layer, axis, start, size):
  """``size`` slots from ``start`` along ``axis`` of a per-layer cache, or of
  layer ``layer`` of a stacked ``[L, ...]`` one (read straight from the stack:
  one block, never the layer's whole slice)."""
  if layer is None:
    return jax.lax.dynamic_slice_in_dim(cache, start, size, axis=axis)
  starts = [layer] + [0] * (cache.ndim - 1)
  starts[axis + 1] = start
  sizes = (1,) + cache.shape[1 : axis + 1] + (size,) + cache.shape[axis + 2 :]
  return jax.lax.dynamic_slice(cache, starts, sizes)[0]


def decode_dense(
  q, keys, values, key_valid, slot, dt, contraction="reduce", key_layout="transposed"
):
  """softmax(q kᵀ / sqrt(Dh) + mask) v over every cache slot: q ``[B, K, G, Dh]``,
  keys / values one layer's cache (layout ``key_layout``), key_valid ``[B, S]``,
  slot: the query's slot (keys at slots <= it). Returns ``[B, K, G, Dh]`` in dt."""
  s = key_valid.shape[1]
  ok = (jnp.arange(s)[None, :] <= slot) & key_valid  # [B, S]
  scores = _scores(q.astype(jnp.float32), keys, contraction, key_layout)
  scores = jnp.where(ok[:, None, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1)
  return _weighted_values(probs, values, contraction).astype(dt)


def decode_blocked(
  q,
  cache_k,
  cache_v,
  key_valid,
  index,
  dt,
  block: int = 128,
  contraction="reduce",
  key_layout="transposed",
  layer=None,
):
  """Flash-decoding: the same softmax as :func:`decode_dense`, but only over
  the cache blocks that hold a slot <= ``index`` (the query's slot): a loop of
  ceil((index + 1) / block) trips, each reading one ``block`` of keys and
  values with ``dynamic_slice`` and folding it into an online softmax
  (running max m, normaliser l, accumulator acc: m' = max(m, max s),
  l' = l e^{m-m'} + Σ e^{s-m'}, acc' = acc e^{m-m'} + Σ e^{s-m'} v; out = acc / l).
  Work per step is proportional to the filled cache, not the allocated one.

  cache_k / cache_v: one layer's cache (keys ``[B, K, Dh, S]`` transposed or
  ``[B, K, S, Dh]``, values ``[B, K, S, Dh]``), or with ``layer`` the stacked
  ``[L, ...]`` caches, read in place. A last block that would run past S is
  read from S - block and its slots already seen are masked, so any block
  size works. Returns ``[B, K, G, Dh]`` in dt.
  """
  b, kh, g, dh = q.shape
  s = key_valid.shape[1]
  bk = min(block, s)
  k_axis = 3 if key_layout == "transposed" else 2
  q = q.astype(jnp.float32)
  index = jnp.asarray(index, jnp.int32)
  trips = jnp.minimum(index // bk + 1, -(-s // bk))

  def body(j, carry):
    m, l, acc = carry  # [B,K,G], [B,K,G], [B,K,G,Dh]
    start = jnp.minimum(j * bk, s - bk)
    kj = _read(cache_k, layer, k_axis, start, bk)
    vj = _read(cache_v, layer, 2, start, bk)
    slots = start + jnp.arange(bk)
    ok = (
      jax.lax.dynamic_slice_in_dim(key_valid, start, bk, axis=1)
      & ((slots >= j * bk) & (slots <= index))[None]
    )[:, None, None]  # [B,1,1,bk]
    sc = jnp.where(ok, _scores(q, kj, contraction, key_layout), NEG_INF)
    m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
    p = jnp.where(ok, jnp.exp(sc - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    return (
      m_new,
      l * corr + jnp.sum(p, axis=-1),
      acc * corr[..., None] + _weighted_values(p, vj, contraction),
    )

  init = (
    jnp.full((b, kh, g), NEG_INF, jnp.float32),
    jnp.zeros((b, kh, g), jnp.float32),
    jnp.zeros((b, kh, g, dh), jnp.float32),
  )
  _, l, acc = jax.lax.fori_loop(0, trips, body, init)
  return (acc / jnp.where(l == 0, 1.0, l)[..., None]).astype(dt)
