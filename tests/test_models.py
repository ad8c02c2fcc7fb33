"""Transformer: KV-cache decoding, sharding, dtypes, remat, config validation.

No torch needed: models come from tiny HF-style config dicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import left_padded_batch, perturb_params, random_model, tiny_hf_config

from opd_jax.models.config import ModelConfig
from opd_jax.models.factory import create_model
from opd_jax.models.transformer import dense, positions_from_mask
from opd_jax.sharding import Sharder, make_mesh

PROMPT, PMASK = left_padded_batch(lengths=(7, 4, 9, 1), seed=1)
GEN = 3


def _cfg(family, **kw) -> ModelConfig:
  return ModelConfig.from_hf_dict(tiny_hf_config(family), **kw)


def _full_sequence(seed=2):
  """Prompt + GEN generated tokens: ids, mask ``[B, T+GEN]``."""
  rng = np.random.default_rng(seed)
  gen = rng.integers(3, 97, size=(PROMPT.shape[0], GEN)).astype(np.int32)
  ids = np.concatenate([PROMPT, gen], axis=1)
  mask = np.concatenate([PMASK, np.ones_like(gen)], axis=1)
  return ids, mask


def _mesh():
  return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


# -- KV cache -----------------------------------------------------------------


@pytest.mark.parametrize(
  "schedule",
  [
    (5,) + (1,) * 7,  # prefill, then token-by-token decode (pads included)
    (5, 7),  # two chunks (crossing prompt / generation)
  ],
)
@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_kv_cache_matches_full_forward(family, schedule):
  model = random_model(_cfg(family), seed=3)
  ids, mask = _full_sequence()
  full = np.asarray(model(ids, mask))
  positions = positions_from_mask(jnp.asarray(mask))
  cache = model.init_cache(ids.shape[0], max_len=16)
  outs, start = [], 0
  for n in schedule:
    sl = slice(start, start + n)
    logits, cache = model.decode(ids[:, sl], mask[:, sl], positions[:, sl], cache)
    assert logits.dtype == jnp.float32
    outs.append(np.asarray(logits))
    start += n
  assert start == ids.shape[1] and int(cache.index) == start
  np.testing.assert_array_equal(np.asarray(cache.valid[:, :start]), mask.astype(bool))
  got = np.concatenate(outs, axis=1)
  real = mask == 1
  np.testing.assert_allclose(got[real], full[real], atol=2e-5, rtol=0)


# -- sharding -----------------------------------------------------------------


def test_sharded_create_model_matches_unsharded():
  cfg = ModelConfig.from_hf_dict(
    tiny_hf_config("qwen3", num_hidden_layers=1, tie_word_embeddings=True)
  )
  sharded = create_model(cfg, seed=0, sharder=Sharder(_mesh()))
  perturb_params(sharded, seed=4)
  embed = sharded.embed[...]
  assert len(embed.sharding.device_set) == 8
  assert embed.addressable_shards[0].data.shape == (97, 16)  # 97 % tensor != 0
  attn, mlp = sharded.layers[0].attn, sharded.layers[0].mlp
  assert attn.q[...].addressable_shards[0].data.shape == (16, 2, 8)
  assert attn.k[...].addressable_shards[0].data.shape == (16, 1, 8)
  assert attn.o[...].addressable_shards[0].data.shape == (2, 8, 16)
  assert mlp.gate[...].addressable_shards[0].data.shape == (16, 32)
  assert mlp.down[...].addressable_shards[0].data.shape == (32, 16)

  # The same values on one device, no mesh.
  plain = random_model(cfg)
  host = jax.tree.map(lambda x: np.asarray(x), nnx.state(sharded, nnx.Param))
  nnx.update(plain, host)
  ids, mask = PROMPT, PMASK
  batch = sharded.sharder.batch(2, ids.shape[0])
  out_sharded = nnx.jit(lambda m, i, k: m(i, k))(
    sharded, jax.device_put(ids, batch), jax.device_put(mask, batch)
  )
  assert len(out_sharded.sharding.device_set) == 8
  real = mask == 1
  np.testing.assert_allclose(
    np.asarray(out_sharded)[real], np.asarray(plain(ids, mask))[real], atol=1e-5, rtol=0
  )


# -- dtypes / remat -------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_bf16_compute(param_dtype):
  ref_model = random_model(_cfg("llama3"), seed=5)
  model = random_model(_cfg("llama3", dtype="bfloat16", param_dtype=param_dtype), seed=5)
  assert model.layers[0].mlp.up[...].dtype == jnp.dtype(param_dtype)
  out = model(PROMPT, PMASK)
  assert out.dtype == jnp.float32
  real = PMASK == 1
  out, ref = np.asarray(out)[real], np.asarray(ref_model(PROMPT, PMASK))[real]
  assert np.isfinite(out).all()
  assert np.abs(out - ref).mean() < 0.05 * np.abs(ref).mean()


def test_remat_same_logits_and_grads():
  cfg = ModelConfig.from_hf_dict(tiny_hf_config("qwen2", num_hidden_layers=1))
  a, b = random_model(cfg, seed=6), random_model(cfg.replace(remat=True), seed=6)
  assert b.cfg.remat and not a.cfg.remat
  ids, mask = jnp.asarray(PROMPT), jnp.asarray(PMASK)

  def loss(m):
    logp = jax.nn.log_softmax(m(ids, mask)[:, :-1], axis=-1)
    tok = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
    w = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
    return -(tok * w).sum() / w.sum()

  fwd_grad = nnx.jit(lambda m: (m(ids, mask), *nnx.value_and_grad(loss)(m)))
  oa, la, ga = fwd_grad(a)
  ob, lb, gb = fwd_grad(b)
  np.testing.assert_allclose(np.asarray(oa), np.asarray(ob), atol=1e-6)
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-6)
  flat_a = jax.tree_util.tree_leaves_with_path(ga)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(gb))
  assert len(flat_a) == len(flat_b) > 0
  for path, g in flat_a:
    np.testing.assert_allclose(
      np.asarray(g), np.asarray(flat_b[path]), atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )
  assert any(np.abs(np.asarray(g)).max() > 0 for _, g in flat_a)


# -- config ---------------------------------------------------------------------


def test_config_validation_errors():
  base = _cfg("llama")
  with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
    base.replace(num_heads=6, num_kv_heads=4)
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
    base.replace(rope_scaling=(("factor", 4.0), ("rope_type", "yarn")))
  with pytest.raises(ValueError, match="unsupported rope_scaling type 'dynamic'"):
    ModelConfig.from_hf_dict(
      tiny_hf_config("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    )
  with pytest.raises(ValueError, match="param_dtype"):
    base.replace(param_dtype="int8")
  with pytest.raises(ValueError, match="padded_vocab_size"):
    base.replace(padded_vocab_size=base.vocab_size - 1)
  with pytest.raises(ValueError, match="unsupported architecture"):
    ModelConfig.from_hf_dict({**tiny_hf_config("llama"), "model_type": "gpt2"})


def test_config_transformers4_and_5_styles_agree():
  old = tiny_hf_config("llama3")
  new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
  new["rope_parameters"] = {**old["rope_scaling"], "rope_theta": old["rope_theta"]}
  a, b = ModelConfig.from_hf_dict(old), ModelConfig.from_hf_dict(new)
  assert a == b and dict(a.rope_scaling)["rope_type"] == "llama3"
  plain = ModelConfig.from_hf_dict(
    {**new, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
  )
  assert plain.rope_scaling is None
  assert (
    ModelConfig.from_hf_dict(
      tiny_hf_config("llama", vocab_size=97), vocab_pad_multiple=64
    ).padded_vocab_size
    == 128
  )


@pytest.mark.parametrize(
  "x_shape,w_shape,n_in,spec",
  [
    ((2, 5, 6), (6, 3, 4), 1, "btd,dnh->btnh"),  # q / k / v projection
    ((2, 5, 3, 4), (3, 4, 6), 2, "btnh,nhd->btd"),  # output projection
    ((7, 6), (6, 9), 1, "td,df->tf"),  # MLP on flat tokens
  ],
)
def test_dense_value_and_gradients_match_einsum(x_shape, w_shape, n_in, spec):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, x_shape, jnp.float32)
  w = jax.random.normal(kw, w_shape, jnp.float32)
  ref = lambda x, w: jnp.einsum(spec, x, w, precision="highest")
  y = dense(x, w, n_in)
  np.testing.assert_allclose(y, ref(x, w), rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape, jnp.float32)
  got = jax.vjp(lambda x, w: dense(x, w, n_in), x, w)[1](g)
  want = jax.vjp(ref, x, w)[1](g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # second order and forward mode work (no custom derivative rule)
  hv = jax.grad(lambda w: jnp.sum(jax.grad(lambda w: jnp.sum(dense(x, w, n_in) ** 2))(w) ** 2))(w)
  hv_ref = jax.grad(lambda w: jnp.sum(jax.grad(lambda w: jnp.sum(ref(x, w) ** 2))(w) ** 2))(w)
  np.testing.assert_allclose(hv, hv_ref, rtol=1e-4, atol=1e-4)
  jv = jax.jvp(lambda x: dense(x, w, n_in), (x,), (x,))[1]
  np.testing.assert_allclose(jv, ref(x, w), rtol=1e-5, atol=1e-5)  # linear in x
