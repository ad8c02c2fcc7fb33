"""Many-query attention implementations (models/attention.py) against the dense
reference: values and gradients (f32, bf16), left padding, GQA, ragged blocks,
prefill into a larger cache; linear memory of the blockwise path; the knob."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import left_padded_batch, random_model, tiny_hf_config

from opd_jax import configs_lib
from opd_jax.models import attention as A
from opd_jax.models.config import ModelConfig
from opd_jax.models.transformer import positions_from_mask

# (T, S, q_start): training (S == T), prefill of T tokens at q_start into S slots.
CASES = {"train": (37, 37, 0), "prefill": (45, 100, 30)}


def _inputs(t, s, q_start, dt, b=3, kh=2, g=3, dh=16, seed=0):
  """Grouped queries / transposed keys / values; row 0 left-padded by 5, row 2
  by 40 (its first queries see no key at all); slots past the prefill invalid."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  qg = jax.random.normal(ks[0], (b, t, kh, g, dh)).astype(dt)
  keys = jax.random.normal(ks[1], (b, kh, dh, s)).astype(dt)
  values = jax.random.normal(ks[2], (b, kh, s, dh)).astype(dt)
  first = jnp.asarray([5, 0, 40])[:b]
  valid = (jnp.arange(s)[None] >= first[:, None]) & (jnp.arange(s)[None] < q_start + t)
  q_slot = q_start + jnp.arange(t)
  rows = np.asarray(A.allowed(q_slot, valid, jnp.arange(s)).any(-1))  # [B, T]
  return qg, keys, values, valid, q_slot, rows


def _impl(name, block_q=16, block_k=32):
  cfg = types.SimpleNamespace(attention=name, attention_block=block_q, attention_key_block=block_k)
  return lambda qg, k, v, valid, q_slot, dt, aligned: A.attend_many(
    cfg, qg, k, v, valid, q_slot, dt, aligned
  )


def _value_and_grads(fn, qg, keys, values, rows):
  """Output and d/d(q, k, v) of sum(out * w), w random on rows with keys."""
  w = jax.random.normal(jax.random.PRNGKey(7), qg.shape, jnp.float32)
  w = w * rows[:, :, None, None, None]
  loss = lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * w)
  out = fn(qg, keys, values)
  return out, jax.grad(loss, (0, 1, 2))(qg, keys, values)


def _rel(a, b, rows=None):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if rows is not None:
    a, b = a[rows], b[rows]
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["blockwise", "xla"])
def test_matches_dense(impl, dtype, case):
  t, s, q_start = CASES[case]
  dt = jnp.dtype(dtype)
  qg, keys, values, valid, q_slot, rows = _inputs(t, s, q_start, dt)
  aligned = case == "train"
  fn = lambda q, k, v: _impl(impl)(q, k, v, valid, q_slot, dt, aligned)
  out, grads = _value_and_grads(fn, qg, keys, values, rows)
  assert out.dtype == dt and out.shape == qg.shape
  # The reference in float32: bf16 paths are judged by their distance to it.
  f32 = [x.astype(jnp.float32) for x in (qg, keys, values)]
  ref_fn = lambda q, k, v: A.dense(q, k, v, valid, q_slot, jnp.float32)
  ref, ref_grads = _value_and_grads(ref_fn, *f32, rows)
  tol = 1e-5 if dtype == "float32" else 2e-2
  assert _rel(out, ref, rows) < tol
  for g, r in zip(grads, ref_grads):
    assert g.dtype == dt
    assert _rel(g, r) < tol * 2
  if dtype == "bfloat16":  # no worse than the bf16 dense path, up to rounding
    dense_bf16 = A.dense(qg, keys, values, valid, q_slot, dt)
    assert _rel(out, ref, rows) < 2 * _rel(dense_bf16, ref, rows) + 1e-3
  # Fully masked rows (row 2's first queries) stay finite, values and grads.
  assert not rows.all()
  all_rows = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
  for x in (out, *all_rows(qg, keys, values)):
    assert np.isfinite(np.asarray(x, np.float32)).all()


@pytest.mark.parametrize("blocks", [(16, 32), (8, 8), (64, 16)])
def test_blockwise_block_shapes(blocks):
  """Blocks that divide nothing, square blocks, query block > key block."""
  t, s, q_start = CASES["prefill"]
  qg, keys, values, valid, q_slot, rows = _inputs(t, s, q_start, jnp.float32, seed=3)
  fn = lambda q, k, v: A.blockwise(q, k, v, valid, q_slot, jnp.float32, *blocks)
  out, grads = _value_and_grads(fn, qg, keys, values, rows)
  ref, ref_grads = _value_and_grads(
    lambda q, k, v: A.dense(q, k, v, valid, q_slot, jnp.float32), qg, keys, values, rows
  )
  assert _rel(out, ref, rows) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert _rel(g, r) < 2e-5


@pytest.mark.slow
def test_pallas_tpu_interpret_matches_dense():
  """The Pallas TPU kernel in TPU interpret mode (on CPU); a clear error without."""
  import jax.experimental.pallas.tpu as pltpu

  t, s, _ = CASES["train"]
  qg, keys, values, valid, q_slot, rows = _inputs(t, s, 0, jnp.float32, b=2)
  fn = lambda q, k, v: _impl("pallas_tpu")(q, k, v, valid, q_slot, jnp.float32, True)
  if jax.default_backend() != "tpu":
    with pytest.raises(ValueError, match="needs a TPU"):
      fn(qg, keys, values)
  with pltpu.force_tpu_interpret_mode():
    out, grads = _value_and_grads(fn, qg, keys, values, rows)
  ref, ref_grads = _value_and_grads(
    lambda q, k, v: A.dense(q, k, v, valid, q_slot, jnp.float32), qg, keys, values, rows
  )
  assert _rel(out, ref, rows) < 1e-5
  for g, r in zip(grads, ref_grads):
    assert _rel(g, r) < 2e-5


def test_cudnn_off_gpu_is_a_clear_error():
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU cudnn runs")
  qg, keys, values, valid, q_slot, _ = _inputs(*CASES["train"], jnp.float32)
  with pytest.raises(ValueError, match="needs a GPU"):
    _impl("cudnn")(qg, keys, values, valid, q_slot, jnp.float32, True)


# -- in the model ---------------------------------------------------------------


def _cfg(family, **kw):
  return ModelConfig.from_hf_dict(tiny_hf_config(family), **kw)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_model_logits_and_param_grads_match_dense(family, dtype):
  """Tiny blocks (4 x 8) so the blockwise path runs on a 12-token batch."""
  ids, mask = left_padded_batch(lengths=(12, 5, 9, 1), seed=4)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  models = {
    name: random_model(
      _cfg(family, dtype=dtype, attention=name, attention_block=4, attention_key_block=8), seed=8
    )
    for name in ("dense", "blockwise")
  }

  def loss(m):
    logp = jax.nn.log_softmax(m(ids, mask)[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return -(tok * w).sum() / w.sum()

  res = {
    n: nnx.jit(lambda m: (m(ids, mask), *nnx.value_and_grad(loss)(m)))(m) for n, m in models.items()
  }
  (od, ld, gd), (ob, lb, gb) = res["dense"], res["blockwise"]
  real = np.asarray(mask) == 1
  tol = 1e-5 if dtype == "float32" else 3e-2
  assert _rel(ob, od, real) < tol
  assert abs(float(lb) - float(ld)) < tol * abs(float(ld))
  flat_b = dict(jax.tree_util.tree_leaves_with_path(gb))
  for path, g in jax.tree_util.tree_leaves_with_path(gd):
    assert np.isfinite(np.asarray(flat_b[path], np.float32)).all()
    assert _rel(flat_b[path], g) < tol * 5, path


def test_model_prefill_into_cache_matches_full_forward():
  """Chunked prefill (q_start > 0, S = 24 cache slots) through the blockwise
  path equals the dense full forward on real tokens."""
  ids, mask = left_padded_batch(lengths=(14, 6, 10, 1), seed=5)
  cfg = _cfg("qwen3", attention="blockwise", attention_block=4, attention_key_block=8)
  model = random_model(cfg, seed=9)
  full = np.asarray(random_model(cfg.replace(attention="dense"), seed=9)(ids, mask))
  positions = positions_from_mask(jnp.asarray(mask))
  cache = model.init_cache(ids.shape[0], max_len=24)
  outs, start = [], 0
  for n in (6, 8):
    sl = slice(start, start + n)
    logits, cache = model.decode(ids[:, sl], mask[:, sl], positions[:, sl], cache)
    outs.append(np.asarray(logits))
    start += n
  real = np.asarray(mask) == 1
  np.testing.assert_allclose(np.concatenate(outs, 1)[real], full[real], atol=2e-5, rtol=2e-5)


# -- memory ---------------------------------------------------------------------


def _temp_bytes(fn, t, b=1, kh=2, g=2, dh=64):
  """XLA temporaries of d/d(q, k, v) sum(attention(...)^2) at T = S = t."""
  shapes = [
    jax.ShapeDtypeStruct(s, jnp.float32)
    for s in ((b, t, kh, g, dh), (b, kh, dh, t), (b, kh, t, dh))
  ]
  valid = jax.ShapeDtypeStruct((b, t), jnp.bool_)
  loss = lambda q, k, v, m: jnp.sum(fn(q, k, v, m, jnp.arange(t), jnp.float32) ** 2)
  compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*shapes, valid).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_in_length():
  blockwise = lambda *a: A.blockwise(*a, block_q=256, block_k=512)
  small, large = _temp_bytes(blockwise, 2048), _temp_bytes(blockwise, 8192)
  assert large / small < 6  # dense scores: ~16
  dense_large = _temp_bytes(lambda *a: A.dense(*a, block=0), 8192)
  dense_blocked = _temp_bytes(lambda *a: A.dense(*a, block=256), 8192)
  assert large * 20 < dense_large and large * 3 < dense_blocked


# -- the knob -------------------------------------------------------------------


def test_attention_setting_is_validated_and_passed_through(tmp_path):
  with pytest.raises(ValueError, match="attention='flash'.*blockwise.*dense.*pallas_tpu"):
    _cfg("llama", attention="flash")
  with pytest.raises(ValueError, match="attention_key_block"):
    _cfg("llama", attention="blockwise", attention_key_block=0)
  assert _cfg("llama").attention == "blockwise"
  m = configs_lib.model_config()
  assert (m.attention, m.attention_block, m.attention_key_block) == ("blockwise", 256, 512)
  m.attention, m.attention_key_block = "dense", 128
  from opd_jax.train import model_spec

  kw = model_spec(m).kwargs()
  assert (kw["attention"], kw["attention_block"], kw["attention_key_block"]) == ("dense", 256, 128)
  import json

  from opd_jax.models.hf_io import config_from_hf

  (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config("qwen3")))
  cfg = config_from_hf(tmp_path, **kw)
  assert (cfg.attention, cfg.attention_key_block) == ("dense", 128)
  with pytest.raises(ValueError, match="config.json.*attention='nope'"):
    config_from_hf(tmp_path, attention="nope")
