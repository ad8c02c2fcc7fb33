"""Scanned layers (``ModelConfig.scan_layers``): stacked params, one lax.scan.

Every check compares against the unrolled model with the same weights
(:func:`opd_jax.models.factory.convert_layers` moves them between layouts).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hf_models import left_padded_batch, random_model, tiny_hf_config
from tiny import tiny_model_config

from opd_jax.models.config import ModelConfig
from opd_jax.models.factory import abstract_model, convert_layers, create_model
from opd_jax.models.transformer import positions_from_mask
from opd_jax.sampling import SamplingConfig, sample
from opd_jax.sharding import Sharder, make_mesh

IDS, MASK = left_padded_batch(lengths=(7, 4, 9, 1), seed=1)
REAL = MASK == 1


def _cfg(family="qwen3", **kw) -> ModelConfig:
  layers = kw.pop("num_hidden_layers", 3)
  return ModelConfig.from_hf_dict(tiny_hf_config(family, num_hidden_layers=layers), **kw)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids, mask):
  return nnx.merge(graphdef, state)(ids, mask)


def _logits(model) -> np.ndarray:
  return np.asarray(_forward(*nnx.split(model), IDS, MASK))


def _pair(family="qwen3", **kw):
  """(unrolled, scanned) models with the same weights."""
  unrolled = random_model(_cfg(family, **kw), seed=3)
  return unrolled, convert_layers(unrolled, scan_layers=True)


def _stack(pure_unrolled, n):
  """Unrolled pure dict -> the stacked layout (per-layer leaves stacked on axis 0)."""
  layers = pure_unrolled["layers"]
  return {
    **pure_unrolled,
    "layers": jax.tree.map(lambda *xs: np.stack(xs), *[layers[i] for i in range(n)]),
  }


def _pure(state):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


# -- layout -------------------------------------------------------------------


def test_stacked_params_and_logical_axes():
  cfg = _cfg(scan_layers=True)
  model = abstract_model(cfg)
  assert not isinstance(model.layers, nnx.List)
  per_layer = nnx.state(abstract_model(cfg.replace(scan_layers=False)).layers[0], nnx.Param)
  flat = dict(
    jax.tree_util.tree_flatten_with_path(
      nnx.state(model.layers, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable)
    )[0]
  )
  ref = dict(
    jax.tree_util.tree_flatten_with_path(per_layer, is_leaf=lambda x: isinstance(x, nnx.Variable))[
      0
    ]
  )
  assert flat.keys() == ref.keys() and len(flat) >= 9
  for path, var in flat.items():
    axes = var.get_metadata()["logical_axes"]
    assert axes == ("layers",) + ref[path].get_metadata()["logical_axes"]
    assert var.get_value().shape == (cfg.num_layers,) + ref[path].get_value().shape
  # Non-layer params keep their axes.
  assert model.embed.get_metadata()["logical_axes"] == ("vocab", "embed")


def test_convert_layers_round_trip():
  unrolled, scanned = _pair()
  n = unrolled.cfg.num_layers
  a, b = _pure(nnx.state(unrolled)), _pure(nnx.state(scanned))
  jax.tree.map(np.testing.assert_array_equal, _stack(a, n), b)
  back = _pure(nnx.state(convert_layers(scanned, scan_layers=False)))
  jax.tree.map(np.testing.assert_array_equal, back, a)


# -- numerics -------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama3"])
def test_scanned_logits_equal_unrolled(family):
  unrolled, scanned = _pair(family)
  np.testing.assert_allclose(_logits(scanned)[REAL], _logits(unrolled)[REAL], atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_grads_equal_unrolled(remat):
  unrolled, scanned = _pair(remat=remat)
  w = jax.random.normal(jax.random.key(0), (IDS.shape[0], IDS.shape[1], unrolled.cfg.vocab_size))

  @jax.jit
  def grads(state, graphdef):
    def loss(s):
      logits = nnx.merge(graphdef, s)(IDS, MASK)
      return jnp.sum(jnp.where(REAL[..., None], logits * w, 0.0))

    return jax.grad(loss)(state)

  def run(model):
    graphdef, state = nnx.split(model)
    return _pure(jax.jit(grads, static_argnums=1)(state, graphdef))

  n = unrolled.cfg.num_layers
  g_unrolled, g_scanned = _stack(run(unrolled), n), run(scanned)
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(g_unrolled))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0), g_scanned, g_unrolled
  )


def test_remat_scan_same_logits():
  unrolled, scanned = _pair()
  remat = convert_layers(random_model(_cfg(remat=True), seed=3), scan_layers=True)
  assert remat.cfg.remat and remat.cfg.scan_layers
  np.testing.assert_allclose(_logits(remat)[REAL], _logits(unrolled)[REAL], atol=1e-5, rtol=0)


def test_remat_scan_saves_only_layer_inputs():
  """Under remat the backward pass of the scan keeps, per layer, only the layer
  input ``[B, T, D]`` (stacked ``[L, B, T, D]``) besides the stacked params."""
  cfg = _cfg(remat=True, scan_layers=True, num_hidden_layers=4).replace(
    attention="dense", attention_block=0
  )
  b, t, n = 2, 16, cfg.num_layers
  ids = jnp.zeros((b, t), jnp.int32)

  def stacked_residuals(cfg):
    graphdef, state = nnx.split(abstract_model(cfg))
    loss = lambda s: jnp.sum(nnx.merge(graphdef, s).hidden(ids)[0])
    res = jax.tree.leaves(jax.eval_shape(lambda s: jax.vjp(loss, s)[1], state))
    params = {x.shape for x in jax.tree.leaves(state)}
    return sorted(x.shape for x in res if x.ndim > 1 and x.shape[0] == n and x.shape not in params)

  assert stacked_residuals(cfg) == [(n, b, t, cfg.hidden_size)]
  # Without remat every layer's intermediates are kept.
  assert len(stacked_residuals(cfg.replace(remat=False))) > 10


# -- decoding ------------------------------------------------------------------


def test_scanned_kv_cache_matches_full_forward():
  unrolled, scanned = _pair()
  gen = np.random.default_rng(2).integers(3, 97, size=(IDS.shape[0], 3)).astype(np.int32)
  ids = np.concatenate([IDS, gen], axis=1)
  mask = np.concatenate([MASK, np.ones_like(gen)], axis=1)
  full = np.asarray(unrolled(ids, mask))
  positions = positions_from_mask(jnp.asarray(mask))
  cache = scanned.init_cache(ids.shape[0], max_len=16)
  assert cache.k.shape == (3, 4, 2, 8, 16) and cache.v.shape == (3, 4, 2, 16, 8)
  outs, start = [], 0
  for n in (5,) + (1,) * 7:
    sl = slice(start, start + n)
    logits, cache = scanned.decode(ids[:, sl], mask[:, sl], positions[:, sl], cache)
    outs.append(np.asarray(logits))
    start += n
  assert int(cache.index) == start
  got = np.concatenate(outs, axis=1)
  np.testing.assert_allclose(got[mask == 1], full[mask == 1], atol=2e-5, rtol=0)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_sample(graphdef, state, ids, mask, key, config):
  return sample(nnx.merge(graphdef, state), ids, mask, key, config)


def test_sample_same_tokens_as_unrolled():
  unrolled, scanned = _pair()
  config = SamplingConfig(max_new_tokens=8, temperature=0.9, top_k=20, eos_ids=(5,), num_samples=2)
  key = jax.random.key(7)
  a = _jit_sample(*nnx.split(unrolled), IDS, MASK, key, config)
  b = _jit_sample(*nnx.split(scanned), IDS, MASK, key, config)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


# -- sharding ------------------------------------------------------------------


def test_sharded_stacked_params_same_logits():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharder = Sharder(mesh)
  cfg = _cfg()
  sharded = convert_layers(random_model(cfg, seed=3, sharder=sharder), scan_layers=True)
  q, gate = sharded.layers.attn.q[...], sharded.layers.mlp.gate[...]
  assert q.shape == (3, 32, 4, 8) and len(q.sharding.device_set) == 8
  assert q.sharding.spec[0] is None  # "layers" -> replicated by default
  assert q.addressable_shards[0].data.shape == (3, 16, 2, 8)
  assert gate.addressable_shards[0].data.shape == (3, 16, 32)
  ids = jax.device_put(IDS, sharder.batch(2, IDS.shape[0]))
  mask = jax.device_put(MASK, sharder.batch(2, IDS.shape[0]))
  got = _forward(*nnx.split(sharded), ids, mask)
  assert len(got.sharding.device_set) == 8
  plain = random_model(cfg, seed=3)  # same values, one device, unrolled
  np.testing.assert_allclose(np.asarray(got)[REAL], _logits(plain)[REAL], atol=1e-5, rtol=0)


def test_layers_axis_can_be_sharded():
  """A rule for "layers" shards the stack (here over fsdp); logits unchanged."""
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = dict(Sharder().rules) | {"layers": "fsdp", "embed": None}
  sharder = Sharder(mesh, tuple(rules.items()))
  model = create_model(_cfg(scan_layers=True, num_hidden_layers=4), seed=0, sharder=sharder)
  q = model.layers.attn.q[...]
  assert q.sharding.spec[0] == "fsdp" and q.addressable_shards[0].data.shape == (2, 32, 2, 8)
  plain = convert_layers(model, scan_layers=False)
  assert plain.layers[1].attn.q[...].shape == (32, 4, 8)
  np.testing.assert_allclose(_logits(model)[REAL], _logits(plain)[REAL], atol=1e-5, rtol=0)


# -- compile size --------------------------------------------------------------


def _program_size(cfg, what: str) -> int:
  """Characters of the lowered (StableHLO) fwd+bwd of ``hidden`` or of the
  sampler (prefill + decode loop); no compile."""
  graphdef, state = nnx.split(abstract_model(cfg))
  ids = jnp.zeros((2, 8), jnp.int32)

  if what == "fwd_bwd":

    def fn(s):
      return jax.grad(lambda s: jnp.sum(nnx.merge(graphdef, s).hidden(ids)[0]))(s)
  else:

    def fn(s):
      return sample(
        nnx.merge(graphdef, s),
        ids,
        jnp.ones_like(ids),
        jax.random.key(0),
        SamplingConfig(max_new_tokens=4),
      ).tokens

  return len(jax.jit(fn).lower(state).as_text())


@pytest.mark.parametrize("what,remat", [("fwd_bwd", False), ("fwd_bwd", True), ("sample", False)])
def test_program_size_flat_in_depth_when_scanned(what, remat):
  sizes = {
    (scan, n): _program_size(_cfg(num_hidden_layers=n, remat=remat, scan_layers=scan), what)
    for scan in (False, True)
    for n in (2, 8)
  }
  assert sizes[True, 8] <= 1.2 * sizes[True, 2], sizes
  assert sizes[False, 8] >= 2.0 * sizes[False, 2], sizes


# -- the OPD step --------------------------------------------------------------


def test_opd_step_scanned_equals_unrolled():
  """Student and teacher both scanned: same loss and updated params as unrolled."""
  from opd_jax import opd_step, optim

  vocab = 64
  s_cfg = tiny_model_config(vocab_size=vocab, remat=True)
  t_cfg = s_cfg.replace(hidden_size=48, num_layers=3)
  prompts = np.array([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]], np.int32)
  batch = {"prompt_ids": jnp.asarray(prompts), "prompt_mask": jnp.asarray(prompts > 0)}
  cfg = opd_step.OPDConfig(
    sampling=SamplingConfig(max_new_tokens=8, eos_ids=(1, 2, 3), num_samples=2),
    loss="reverse_kl",
    loss_chunk=5,
    position_chunk=4,
    metrics=False,
  )
  tx, sched = optim.make_optimizer({"name": "sgd", "lr": 0.1, "grad_clip": 0})
  out = {}
  for scan in (False, True):
    student, teacher = create_model(s_cfg, seed=0), create_model(t_cfg, seed=1)
    if scan:
      student = convert_layers(student, scan_layers=True)
      teacher = convert_layers(teacher, scan_layers=True)
    state, _ = opd_step.init_train_state(student, tx, 0, Sharder())
    gd_t, t_params = nnx.split(teacher)
    step = opd_step.make_opd_step(
      nnx.graphdef(student), gd_t, tx, sched, cfg, vocab_size=vocab, sharder=Sharder()
    )
    state, m = step(state, t_params, batch)
    out[scan] = (opd_step.host_metrics(m, step.token_metric_names()), _pure(state.params))
  (m0, p0), (m1, p1) = out[False], out[True]
  assert m0["loss"] > 0
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["mean_response_length"], m0["mean_response_length"])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
    p1,
    _stack(p0, s_cfg.num_layers),
  )
