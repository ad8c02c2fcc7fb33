"""Decoder-only transformer (Llama / Qwen2 / Qwen3) in Flax NNX.

Shapes: B batch, T query length, S key/cache length, D hidden, H query heads,
K kv heads (GQA, G = H / K), Dh head dim, F mlp width, V padded vocab.

Every parameter carries ``logical_axes`` metadata; activations are constrained
through :meth:`opd_jax.sharding.Sharder.constrain`. Logits and softmax math are
float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from opd_jax.models import attention as attention_lib
from opd_jax.models.config import ModelConfig
from opd_jax.sharding import Sharder

NEG_INF = -1e30  # finite "minus infinity": masked rows stay NaN-free
# Keys are cached transposed, [B, K, Dh, S], or standard, [B, K, S, Dh]
# (``ModelConfig.key_cache_layout``; "auto": transposed on XLA:CPU, where a
# decode step's q·k then reduces over a non-minor axis in one fused loop).
KEY_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_head_dim", "cache_length")
VALUE_CACHE_AXES = ("cache_batch", "cache_kv_heads", "cache_length", "cache_head_dim")
# Leading axis of the stacked (``scan_layers``) parameters and caches.
LAYERS_AXIS = "layers"
CACHE_LAYERS_AXIS = "cache_layers"


def key_cache_axes(cfg: ModelConfig) -> tuple[str, ...]:
  """Logical axes of one layer's key cache under ``cfg.key_cache_layout``."""
  transposed = attention_lib.resolve_key_layout(cfg.key_cache_layout) == "transposed"
  return KEY_CACHE_AXES if transposed else VALUE_CACHE_AXES


class KVCache(NamedTuple):
  """Fixed-size decoding cache.

  k, v: per-layer lists of keys ``[B, K, Dh, S]`` and values ``[B, K, S, Dh]``
  (kv-head-major; keys ``[B, K, S, Dh]`` with ``key_cache_layout`` "standard"),
  or with ``scan_layers`` one stacked array each, ``[L, B, K, Dh, S]`` /
  ``[L, B, K, S, Dh]``; ``valid``: ``[B, S]`` bool, which
  slots hold real tokens; ``index``: scalar int32, the next slot to write (all
  rows share it: prompts are left-padded to a common length).
  """

  k: list[jax.Array] | jax.Array
  v: list[jax.Array] | jax.Array
  valid: jax.Array
  index: jax.Array


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal", scale=0.02):
  if init == "normal":
    value = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
  elif init == "ones":
    value = jnp.ones(shape, jnp.float32)
  else:
    value = jnp.zeros(shape, jnp.float32)
  return nnx.Param(value.astype(dtype), logical_axes=tuple(axes))


def dense(x: jax.Array, w: jax.Array, n_in: int = 1) -> jax.Array:
  """x ``[..., *w.shape[:n_in]]`` · w ``[*in, *out]`` -> ``[..., *out]``: the
  last ``n_in`` axes of x contracted with the first ``n_in`` of w, as one 2-D
  matmul over the flattened tokens (M = tokens, K = prod(in), N = prod(out)).

  Same values as the einsum; the point is the backward pass: autodiff then
  states dW = xᵀ·g and dx = g·Wᵀ as 2-D matmuls too, where the N-d einsum's
  gradients made XLA:CPU write each activation gradient in a transposed layout
  first (the student's backward ran 10-15% slower).
  """
  k = math.prod(w.shape[:n_in])
  y = x.reshape(-1, k) @ w.reshape(k, -1)
  return y.reshape(x.shape[: x.ndim - n_in] + w.shape[n_in:])


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Left-padded mask ``[B, T]`` -> positions ``[B, T]`` (pads get 0), as HF."""
  mask = mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) * mask


class RMSNorm(nnx.Module):
  """y = w * x / sqrt(mean(x^2) + eps), statistics in float32 (Zhang & Sennrich 2019)."""

  def __init__(self, dim: int, eps: float, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.eps = eps
    self.dtype = jnp.dtype(cfg.dtype)
    self.weight = _param(rngs, (dim,), ("norm",), cfg.param_dtype, init="ones")

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(self.dtype) * xf.astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotary embedding, HF "rotate_half" layout. x ``[B,T,N,Dh]``, positions ``[B,T]``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def _attend(qg, keys, values, key_valid, q_slot, dt, cfg=None, aligned=False, sharder=None):
  """softmax(q k^T / sqrt(Dh) + mask) v for grouped queries.

  qg ``[B, T, K, G, Dh]``; keys ``[B, K, Dh, S]`` (transposed), values
  ``[B, K, S, Dh]``; key_valid ``[B, S]``;
  q_slot ``[T]`` cache slot of each query (causal: keys at slots <= it).
  Scores and softmax in float32. Returns ``[B, T, K, G, Dh]``. T > 1 goes to
  ``cfg.attention`` (:mod:`opd_jax.models.attention`; dense without cfg);
  ``aligned``: no cache (S == T, query t at slot t); ``sharder``: its mesh.
  """
  if qg.shape[1] == 1:
    # One query per row without a cache (cached decode steps go to
    # attention_lib.decode_blocked / decode_dense from Attention).
    out = attention_lib.decode_dense(
      qg[:, 0], keys, values, key_valid, q_slot[0], dt, "reduce", "transposed"
    )
    return out[:, None]  # [B, 1, K, G, Dh]
  # Many queries (prefill, training): the configured implementation.
  if cfg is None:
    return attention_lib.dense(qg, keys, values, key_valid, q_slot, dt)
  return attention_lib.attend_many(cfg, qg, keys, values, key_valid, q_slot, dt, aligned, sharder)


class Attention(nnx.Module):
  """Grouped-query causal self-attention with optional KV cache."""

  def __init__(self, cfg: ModelConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    d, h, k, dh, pd = (
      cfg.hidden_size,
      cfg.num_heads,
      cfg.num_kv_heads,
      cfg.head_dim,
      cfg.param_dtype,
    )
    self.cfg, self.sharder = cfg, sharder
    self.inv_freq = tuple(float(f) for f in cfg.inv_freq())
    self.q = _param(rngs, (d, h, dh), ("embed", "heads", "head_dim"), pd)
    self.k = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
    self.v = _param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), pd)
    self.o = _param(rngs, (h, dh, d), ("heads", "head_dim", "embed"), pd)
    if cfg.qkv_bias:
      self.q_bias = _param(rngs, (h, dh), ("heads", "head_dim"), pd, init="zeros")
      self.k_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), pd, init="zeros")
      self.v_bias = _param(rngs, (k, dh), ("kv_heads", "head_dim"), pd, init="zeros")
    if cfg.o_bias:
      self.o_bias = _param(rngs, (d,), ("embed",), pd, init="zeros")
    if cfg.qk_norm:
      self.q_norm = RMSNorm(dh, cfg.rms_norm_eps, cfg, rngs=rngs)
      self.k_norm = RMSNorm(dh, cfg.rms_norm_eps, cfg, rngs=rngs)

  def __call__(self, x, positions, key_valid, q_start, cache_kv=None, layer=None):
    """x ``[B,T,D]``; positions ``[B,T]``; key_valid ``[B,S]``; q_start: slot of
    the first query (0 without cache); cache_kv: this layer's (k, v) cache, or
    with ``layer`` (int32 scalar) the stacked ``[L, ...]`` caches. Returns
    (out ``[B,T,D]``, the updated (k, v), stacked when given stacked).

    Write first, then read: the T new keys / values go into the cache
    (in place: a dynamic update slice of the given buffer, for a stacked cache
    of the scan's carry itself), and attention then reads the updated cache;
    a decode step (T == 1) reads only its filled blocks (``decode_attention``
    "blocked"), straight from the stack when stacked.
    """
    cfg, dt, sh = self.cfg, jnp.dtype(self.cfg.dtype), self.sharder

    def proj(w, b):
      y = dense(x, w[...].astype(dt))  # [B, T, N, Dh]
      return y if b is None else y + b[...].astype(dt)

    q = proj(self.q, getattr(self, "q_bias", None))
    k = proj(self.k, getattr(self, "k_bias", None))
    v = proj(self.v, getattr(self, "v_bias", None))
    if cfg.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    inv_freq = np.asarray(self.inv_freq)
    q, k = rope(q, positions, inv_freq), rope(k, positions, inv_freq)
    q = sh.constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
    k = sh.constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
    v = sh.constrain(v, ("activation_batch", "activation_length", "activation_kv_heads", None))

    b, t, h, dh = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, dh)
    # Kv-head-major values [B, K, S, Dh] and keys [B, K, Dh, S] (transposed)
    # or [B, K, S, Dh], as cached: the contractions need no per-step
    # transpose of the cache.
    transposed = attention_lib.resolve_key_layout(cfg.key_cache_layout) == "transposed"
    v = jnp.swapaxes(v, 1, 2)
    k = jnp.transpose(k, (0, 2, 3, 1)) if transposed else jnp.swapaxes(k, 1, 2)
    if cache_kv is None:
      out = _attend(
        qg,
        k if transposed else jnp.swapaxes(k, 2, 3),
        v,
        key_valid,
        jnp.arange(t),
        dt,
        cfg,
        True,
        sh,
      )
      new_kv = None
    else:
      ck, cv = cache_kv
      lead = () if layer is None else (layer,)
      at = lambda c, x, axis: jax.lax.dynamic_update_slice(
        c,
        x.astype(c.dtype)[None] if layer is not None else x.astype(c.dtype),
        lead + tuple(q_start if a == axis else 0 for a in range(4)),
      )
      ck, cv = at(ck, k, 3 if transposed else 2), at(cv, v, 2)
      pre = () if layer is None else (CACHE_LAYERS_AXIS,)
      ck = sh.constrain(ck, pre + key_cache_axes(cfg))
      cv = sh.constrain(cv, pre + VALUE_CACHE_AXES)
      new_kv = (ck, cv)
      decode = attention_lib.resolve_decode(cfg.decode_attention, cfg.scan_layers)
      layout = "transposed" if transposed else "standard"
      if t == 1 and decode == "blocked":
        out = attention_lib.decode_blocked(
          qg[:, 0],
          ck,
          cv,
          key_valid,
          q_start,
          dt,
          cfg.decode_block,
          attention_lib.resolve_contraction(cfg.decode_contraction),
          layout,
          layer,
        )[:, None]
      else:
        if layer is not None:
          ck = jax.lax.dynamic_index_in_dim(ck, layer, keepdims=False)
          cv = jax.lax.dynamic_index_in_dim(cv, layer, keepdims=False)
        keys, values = ck.astype(dt), cv.astype(dt)
        if t == 1 and decode == "pallas_gpu":
          out = attention_lib.decode_pallas_gpu(
            qg[:, 0], keys, values, key_valid, q_start, dt, layout, sh
          )[:, None]
        elif t == 1:
          out = attention_lib.decode_dense(
            qg[:, 0],
            keys,
            values,
            key_valid,
            q_start,
            dt,
            attention_lib.resolve_contraction(cfg.decode_contraction),
            layout,
          )[:, None]
        else:
          out = _attend(
            qg,
            keys if transposed else jnp.swapaxes(keys, 2, 3),
            values,
            key_valid,
            q_start + jnp.arange(t),
            dt,
            cfg,
            False,
            sh,
          )

    out = out.reshape(b, t, h, dh)
    out = sh.constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
    y = dense(out, self.o[...].astype(dt), n_in=2)  # [B, T, D]
    if cfg.o_bias:
      y = y + self.o_bias[...].astype(dt)
    return y, new_kv


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)) (Shazeer 2020)."""

  def __init__(self, cfg: ModelConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
    self.cfg, self.sharder = cfg, sharder
    self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.up = _param(rngs, (d, f), ("embed", "mlp"), pd)
    self.down = _param(rngs, (f, d), ("mlp", "embed"), pd)
    if cfg.mlp_bias:
      self.gate_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.up_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
      self.down_bias = _param(rngs, (d,), ("embed",), pd, init="zeros")

  def __call__(self, x):
    dt = jnp.dtype(self.cfg.dtype)
    g = dense(x, self.gate[...].astype(dt))
    u = dense(x, self.up[...].astype(dt))
    if self.cfg.mlp_bias:
      g, u = g + self.gate_bias[...].astype(dt), u + self.up_bias[...].astype(dt)
    hidden = self.sharder.constrain(
      jax.nn.silu(g) * u, ("activation_batch", "activation_length", "activation_mlp")
    )
    y = dense(hidden, self.down[...].astype(dt))
    if self.cfg.mlp_bias:
      y = y + self.down_bias[...].astype(dt)
    return y


class DecoderLayer(nnx.Module):
  """Pre-norm block: h += attn(norm(h)); h += mlp(norm(h))."""

  def __init__(self, cfg: ModelConfig, sharder: Sharder, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs=rngs)
    self.attn = Attention(cfg, sharder, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg, rngs=rngs)
    self.mlp = MLP(cfg, sharder, rngs=rngs)
    self.sharder = sharder

  def __call__(self, h, positions, key_valid, q_start, cache_kv=None, layer=None):
    a, new_kv = self.attn(self.input_norm(h), positions, key_valid, q_start, cache_kv, layer)
    h = h + a
    h = h + self.mlp(self.post_attn_norm(h))
    h = self.sharder.constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    return h, new_kv


def stacked_layers(cfg: ModelConfig, sharder: Sharder, rngs: nnx.Rngs) -> DecoderLayer:
  """``cfg.num_layers`` decoder layers as one :class:`DecoderLayer` whose params
  are stacked ``[L, ...]`` (``nnx.vmap`` init, one rng split per layer); each
  param's ``logical_axes`` gains a leading ``"layers"``."""

  @nnx.split_rngs(splits=cfg.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(r):
    return DecoderLayer(cfg, sharder, rngs=r)

  layers = make(rngs)
  for _, var in nnx.iter_graph(layers):
    if isinstance(var, nnx.Variable):
      axes = tuple(var.get_metadata()["logical_axes"])
      var.set_metadata("logical_axes", (LAYERS_AXIS,) + axes)
  return layers


class Transformer(nnx.Module):
  """Causal LM. ``model(ids, mask, positions)`` -> float32 logits ``[B, T, V]``."""

  def __init__(self, cfg: ModelConfig, *, sharder: Sharder = Sharder(), rngs: nnx.Rngs):
    self.cfg, self.sharder = cfg, sharder
    v, d, pd = cfg.padded_vocab_size, cfg.hidden_size, cfg.param_dtype
    self.embed = _param(rngs, (v, d), ("vocab", "embed"), pd)
    if cfg.scan_layers:
      self.layers = stacked_layers(cfg, sharder, rngs)
    else:
      self.layers = nnx.List([DecoderLayer(cfg, sharder, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(d, cfg.rms_norm_eps, cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), pd)

  # -- pieces used by the sampler and the chunked losses --------------------

  def unembedding(self) -> jax.Array:
    """Output projection ``[D, V]`` in the compute dtype."""
    w = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
    return w.astype(jnp.dtype(self.cfg.dtype))

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    """Final hidden ``[..., D]`` -> float32 logits ``[..., V]``; padded rows masked."""
    logits = jnp.einsum("...d,dv->...v", h, self.unembedding(), preferred_element_type=jnp.float32)
    if self.cfg.padded_vocab_size > self.cfg.vocab_size:
      real = jnp.arange(self.cfg.padded_vocab_size) < self.cfg.vocab_size
      logits = jnp.where(real, logits, NEG_INF)
    return logits

  def hidden(self, input_ids, attention_mask=None, positions=None, cache: KVCache | None = None):
    """Final normed hidden states ``[B, T, D]`` (and the updated cache).

    Without a cache, ``attention_mask`` ``[B, T]`` marks real tokens (left
    padding allowed). With a cache the T new tokens are written at slots
    ``cache.index ... index+T-1``; ``attention_mask`` marks which of them are
    real, and attention covers every valid slot up to each query's own.
    """
    cfg, sh = self.cfg, self.sharder
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.bool_)
    attention_mask = attention_mask.astype(jnp.bool_)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    h = jnp.take(self.embed[...], input_ids, axis=0, mode="clip").astype(jnp.dtype(cfg.dtype))
    h = sh.constrain(h, ("activation_batch", "activation_length", "activation_embed"))
    if cache is None:
      key_valid, q_start = attention_mask, 0
    else:
      key_valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, cache.index))
      q_start = cache.index
    if cfg.scan_layers:
      h, new_k, new_v = self._scan_layers(h, positions, key_valid, q_start, cache)
      return self.final_norm(h), (
        None if cache is None else KVCache(new_k, new_v, key_valid, cache.index + t)
      )
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      if cfg.remat and cache is None:
        h, _ = nnx.remat(lambda l, x: l(x, positions, key_valid, 0))(layer, h)
        out_kv = None
      else:
        h, out_kv = layer(h, positions, key_valid, q_start, kv)
      if out_kv is not None:
        new_k.append(out_kv[0])
        new_v.append(out_kv[1])
    h = self.final_norm(h)
    new_cache = None if cache is None else KVCache(new_k, new_v, key_valid, cache.index + t)
    return h, new_cache

  def _scan_layers(self, h, positions, key_valid, q_start, cache):
    """The stacked layers as one ``lax.scan`` (the body is traced once, so
    compile time does not grow with depth) -> (h, stacked k, stacked v).

    Without a cache the carry is h ``[B, T, D]``; under ``remat`` the body is
    checkpointed, so the backward pass keeps only each layer's input h
    (``[L, B, T, D]`` in all) and recomputes the rest layer by layer. With a
    cache the stacked k ``[L, B, K, Dh, S]`` / v ``[L, B, K, S, Dh]`` ride in the
    carry and layer i's attention gets the stacks and i: it writes its T new
    slots into the carry in place and reads its (filled) blocks straight from
    it, so no layer's slice is copied out.
    """
    graphdef, state = nnx.split(self.layers)
    if cache is None:

      def body(h, layer_state):
        h, _ = nnx.merge(graphdef, layer_state)(h, positions, key_valid, 0)
        return h, None

      if self.cfg.remat:
        body = jax.checkpoint(body, prevent_cse=False)
      h, _ = jax.lax.scan(body, h, state)
      return h, None, None

    def body_cached(carry, xs):
      h, ck, cv = carry
      layer_state, i = xs
      h, (ck, cv) = nnx.merge(graphdef, layer_state)(h, positions, key_valid, q_start, (ck, cv), i)
      return (h, ck, cv), None

    layer_ids = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    (h, ck, cv), _ = jax.lax.scan(body_cached, (h, cache.k, cache.v), (state, layer_ids))
    sh = self.sharder
    return (
      h,
      sh.constrain(ck, (CACHE_LAYERS_AXIS,) + key_cache_axes(self.cfg)),
      sh.constrain(cv, (CACHE_LAYERS_AXIS,) + VALUE_CACHE_AXES),
    )

  def __call__(self, input_ids, attention_mask=None, positions=None):
    h, _ = self.hidden(input_ids, attention_mask, positions)
    logits = self.logits_from_hidden(h)
    return self.sharder.constrain(
      logits, ("activation_batch", "activation_length", "activation_vocab")
    )

  def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
    """Empty cache of ``max_len`` slots, sharded by the cache rules."""
    cfg = self.cfg
    dtype = jnp.dtype(dtype or cfg.dtype)
    kv, dh = cfg.num_kv_heads, cfg.head_dim
    zeros = lambda shape, axes: self.sharder.constrain(jnp.zeros(shape, dtype), axes)
    valid, index = jnp.zeros((batch, max_len), jnp.bool_), jnp.zeros((), jnp.int32)
    k_axes = key_cache_axes(cfg)
    k_shape = (batch, kv, dh, max_len) if k_axes == KEY_CACHE_AXES else (batch, kv, max_len, dh)
    v_shape = (batch, kv, max_len, dh)
    if cfg.scan_layers:
      n = cfg.num_layers
      return KVCache(
        zeros((n,) + k_shape, (CACHE_LAYERS_AXIS,) + k_axes),
        zeros((n,) + v_shape, (CACHE_LAYERS_AXIS,) + VALUE_CACHE_AXES),
        valid,
        index,
      )
    return KVCache(
      [zeros(k_shape, k_axes) for _ in range(cfg.num_layers)],
      [zeros(v_shape, VALUE_CACHE_AXES) for _ in range(cfg.num_layers)],
      valid,
      index,
    )

  def cache_lengths(self, prompt_len: int, max_new: int) -> tuple[int, ...]:
    """Cache sizes of a sampler's decode phases for ``prompt_len`` prompt and
    ``max_new`` new slots (``attention.phase_lengths``): one fixed cache, or
    under ``decode_attention`` "phased" a cache that grows per phase."""
    cfg = self.cfg
    decode = attention_lib.resolve_decode(cfg.decode_attention, cfg.scan_layers)
    return attention_lib.phase_lengths(prompt_len, max_new, decode, cfg.decode_phase_slots)

  def grow_cache(self, cache: KVCache, max_len: int) -> KVCache:
    """``cache`` with empty slots appended up to ``max_len`` (keys, values and
    ``valid`` padded along the slot axis; ``index`` kept). One copy of the
    cache per phase of a phased decode, never per step."""
    extra = max_len - cache.valid.shape[1]
    if extra < 0:
      raise ValueError(f"grow_cache: {max_len} slots < the cache's {cache.valid.shape[1]}")
    if extra == 0:
      return cache
    pre = (CACHE_LAYERS_AXIS,) if self.cfg.scan_layers else ()
    k_axes, v_axes = pre + key_cache_axes(self.cfg), pre + VALUE_CACHE_AXES

    def grow(x, axes):
      widths = [(0, extra if a == "cache_length" else 0) for a in axes]
      return self.sharder.constrain(jnp.pad(x, widths), axes)

    k = grow(cache.k, k_axes) if self.cfg.scan_layers else [grow(x, k_axes) for x in cache.k]
    v = grow(cache.v, v_axes) if self.cfg.scan_layers else [grow(x, v_axes) for x in cache.v]
    return KVCache(k, v, jnp.pad(cache.valid, ((0, 0), (0, extra))), cache.index)

  def decode(self, input_ids, attention_mask, positions, cache: KVCache):
    """Runs T new tokens through the cache -> (float32 logits ``[B,T,V]``, cache)."""
    h, cache = self.hidden(input_ids, attention_mask, positions, cache)
    return self.logits_from_hidden(h), cache
