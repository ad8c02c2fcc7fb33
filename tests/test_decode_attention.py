"""Decode attention over the KV cache (``ModelConfig.decode_attention`` and the
per-backend decode knobs): blocked == dense, same samples for a key, no cache
copies in a compiled decode step, prefix-sum knob."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_model_config

from opd_jax import sampling as sampling_lib
from opd_jax.models import ModelConfig
from opd_jax.models import attention as attention_lib
from opd_jax.models.factory import convert_layers
from opd_jax.sampling import SamplingConfig, sample

try:
  from tests.hf_models import left_padded_batch, save_random_hf_model
  from tests.test_sampling import make_model, peaky_state
except ImportError:  # tests/ itself on sys.path
  from hf_models import left_padded_batch, save_random_hf_model
  from test_sampling import make_model, peaky_state

VOCAB = 61
N_NEW = 200
P = 9


def cfg_of(**kw) -> ModelConfig:
  base = dict(
    vocab_size=VOCAB,
    padded_vocab_size=64,
    max_position_embeddings=256,
    decode_attention="dense",
    decode_contraction="reduce",
    key_cache_layout="transposed",
  )
  return tiny_model_config(**{**base, **kw})


@functools.partial(jax.jit, static_argnums=(0, 4))
def _jit_sample(graphdef, state, ids, mask, config):
  return sample(nnx.merge(graphdef, state), ids, mask, jax.random.key(7), config)


def run(model, config):
  ids, mask = left_padded_batch(VOCAB, lengths=(P, 3, 6, 1), seed=2)
  graphdef, state = nnx.split(model)
  out = _jit_sample(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), config)
  return np.asarray(out.tokens), np.asarray(out.logprobs)


@pytest.fixture(scope="module")
def weights():
  return peaky_state(cfg_of())


@pytest.fixture(scope="module")
def reference(weights):
  """Today's decode: dense multiply-reduce over every slot, transposed keys."""
  return run(make_model(cfg_of(), weights), SamplingConfig(max_new_tokens=N_NEW))


# Block sizes dividing P + N = 209 slots or not (7 does, 16 / 48 do not,
# 512 > the cache: one block), every contraction / key layout, scanned layers.
@pytest.mark.slow
@pytest.mark.parametrize(
  "kw",
  [
    dict(decode_attention="blocked", decode_block=16),
    dict(
      decode_attention="blocked",
      decode_block=48,
      decode_contraction="dot",
      key_cache_layout="standard",
    ),
    dict(decode_attention="blocked", decode_block=7, key_cache_layout="standard"),
    dict(decode_attention="blocked", decode_block=512, decode_contraction="dot"),
    dict(decode_attention="blocked", decode_block=16, scan_layers=True),
    dict(
      decode_attention="blocked",
      decode_block=48,
      scan_layers=True,
      decode_contraction="dot",
      key_cache_layout="standard",
    ),
    dict(decode_attention="dense", decode_contraction="dot", key_cache_layout="standard"),
    dict(decode_attention="blocked", decode_contraction="auto", key_cache_layout="auto"),
    dict(decode_attention="auto", decode_block=16, scan_layers=True),
    # Phased: 200 new slots in phases of <= 64 (4 loops) or 7 (29 loops), and
    # one phase (= dense); with scanned layers and the other layout.
    dict(decode_attention="phased", decode_phase_slots=64),
    dict(decode_attention="phased", decode_phase_slots=7, decode_contraction="dot"),
    dict(decode_attention="phased", decode_phase_slots=512),
    dict(
      decode_attention="phased",
      decode_phase_slots=50,
      scan_layers=True,
      key_cache_layout="standard",
    ),
    # The Pallas GPU kernel (interpret mode off GPU), over a cache of 224 slots.
    dict(decode_attention="pallas_gpu", key_cache_layout="standard"),
  ],
)
def test_same_samples_as_dense_decode(weights, reference, kw):
  """200 sampled tokens per row identical to the dense-cache sampler's for one
  key; log-probs equal to float rounding."""
  kw = dict(kw)
  scan = kw.pop("scan_layers", False)
  model = make_model(cfg_of(**kw), weights)
  if scan:
    model = convert_layers(model, scan_layers=True)
  tokens, logprobs = run(model, SamplingConfig(max_new_tokens=N_NEW))
  np.testing.assert_array_equal(tokens, reference[0])
  np.testing.assert_allclose(logprobs, reference[1], atol=2e-4)


@pytest.mark.parametrize("layout", ["transposed", "standard"])
@pytest.mark.parametrize("contraction", ["reduce", "dot"])
def test_decode_blocked_equals_dense(layout, contraction):
  """decode_blocked == decode_dense for every query slot, block sizes that
  divide S or not, per-layer and stacked (``layer``) caches, left padding."""
  rng = np.random.default_rng(0)
  b, kh, g, dh, s, layers = 3, 2, 2, 8, 37, 3
  q = jnp.asarray(rng.standard_normal((b, kh, g, dh)), jnp.float32)
  kshape = (layers, b, kh, dh, s) if layout == "transposed" else (layers, b, kh, s, dh)
  ck = jnp.asarray(rng.standard_normal(kshape), jnp.float32)
  cv = jnp.asarray(rng.standard_normal((layers, b, kh, s, dh)), jnp.float32)
  valid = jnp.asarray(np.arange(s)[None] >= np.array([0, 5, 11])[:, None])
  dense = jax.jit(
    lambda i, l: attention_lib.decode_dense(
      q, ck[l], cv[l], valid, i, jnp.float32, contraction, layout
    )
  )
  for block in (1, 5, 8, 37, 64):
    blocked = jax.jit(
      lambda i, l, stacked: attention_lib.decode_blocked(
        q,
        ck if stacked else ck[l],
        cv if stacked else cv[l],
        valid,
        i,
        jnp.float32,
        block,
        contraction,
        layout,
        l if stacked else None,
      ),
      static_argnums=2,
    )
    for i in (11, 12, 20, 36):
      for l, stacked in ((1, False), (2, True)):
        np.testing.assert_allclose(blocked(i, l, stacked), dense(i, l), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slots", [64, 224, 768])
def test_decode_pallas_gpu_equals_dense(slots):
  """The Pallas GPU decode kernel (interpret mode) == decode_dense for query
  slots in the first / a middle / the last key split, rows with left pads,
  both key layouts."""
  rng = np.random.default_rng(slots)
  b, kh, g, dh = 3, 2, 2, 16
  q = jnp.asarray(rng.standard_normal((b, kh, g, dh)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, kh, slots, dh)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, kh, slots, dh)), jnp.float32)
  pads = np.array([0, 3, 17])
  for index in (20, slots // 2, slots - 1):
    valid = jnp.asarray((np.arange(slots)[None] >= pads[:, None]) & (np.arange(slots) <= index))
    ref = attention_lib.decode_dense(q, k, v, valid, index, jnp.float32, "dot", "standard")
    for layout, keys in (("standard", k), ("transposed", jnp.swapaxes(k, 2, 3))):
      got = attention_lib.decode_pallas_gpu(q, keys, v, valid, index, jnp.float32, layout)
      np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5)


def test_decode_pallas_gpu_sharded_equals_one_device():
  """On a 2x2x2 mesh the kernel runs per shard (rows over data x fsdp, kv
  heads over tensor) under shard_map: the same output as without a mesh."""
  from opd_jax.sharding import Sharder, make_mesh

  rng = np.random.default_rng(1)
  b, kh, g, dh, slots = 4, 2, 2, 16, 64
  q = jnp.asarray(rng.standard_normal((b, kh, g, dh)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, kh, slots, dh)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((b, kh, slots, dh)), jnp.float32)
  valid = jnp.asarray((np.arange(slots)[None] >= np.array([0, 5, 9, 30])[:, None]))
  sh = Sharder(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
  fn = jax.jit(
    lambda q, k, v, valid, sharder: attention_lib.decode_pallas_gpu(
      q, k, v, valid, 40, jnp.float32, "standard", sharder
    ),
    static_argnums=4,
  )
  want = fn(q, k, v, valid, None)
  cache = sh.named(("cache_batch", "cache_kv_heads", None, None), k.shape)
  got = fn(jax.device_put(q, cache), jax.device_put(k, cache), jax.device_put(v, cache), valid, sh)
  assert len(got.sharding.device_set) == 8
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_contraction_and_layout_knobs_match():
  """The reduce / dot contractions and both key layouts give the same dense
  decode attention (standard keys are the transposed ones swapped)."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((2, 2, 3, 8)), jnp.float32)
  kt = jnp.asarray(rng.standard_normal((2, 2, 8, 19)), jnp.float32)
  v = jnp.asarray(rng.standard_normal((2, 2, 19, 8)), jnp.float32)
  valid = jnp.ones((2, 19), bool)
  ref = attention_lib.decode_dense(q, kt, v, valid, 15, jnp.float32, "reduce", "transposed")
  for contraction in ("reduce", "dot"):
    for layout, k in (("transposed", kt), ("standard", jnp.swapaxes(kt, 2, 3))):
      got = attention_lib.decode_dense(q, k, v, valid, 15, jnp.float32, contraction, layout)
      np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_auto_knobs_resolve_per_backend(monkeypatch):
  assert attention_lib.resolve_contraction("dot") == "dot"
  assert attention_lib.resolve_key_layout("standard") == "standard"
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert attention_lib.resolve_contraction("auto") == "dot"
  assert attention_lib.resolve_key_layout("auto") == "transposed"
  assert attention_lib.resolve_decode("auto", scan_layers=False) == "phased"
  assert attention_lib.resolve_decode("auto", scan_layers=True) == "blocked"
  assert attention_lib.resolve_decode("dense", scan_layers=True) == "dense"
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert attention_lib.resolve_contraction("auto") == "dot"
  assert attention_lib.resolve_key_layout("auto") == "standard"
  assert attention_lib.resolve_decode("auto", scan_layers=False) == "blocked"


@pytest.mark.parametrize(
  "kw, name",
  [
    (dict(decode_attention="flash"), "decode_attention"),
    (dict(decode_attention="blocked", decode_block=0), "decode_block"),
    (dict(decode_contraction="matmul"), "decode_contraction"),
    (dict(key_cache_layout="bksd"), "key_cache_layout"),
    (dict(decode_attention="phased", decode_phase_slots=0), "decode_phase_slots"),
  ],
)
def test_bad_decode_settings_raise(kw, name):
  with pytest.raises(ValueError, match=name):
    cfg_of(**kw)


def test_key_cache_layout_shapes():
  from opd_jax.models import abstract_model

  for layout, shape in (("transposed", (3, 2, 8, 16)), ("standard", (3, 2, 16, 8))):
    cache = abstract_model(cfg_of(key_cache_layout=layout)).init_cache(3, 16)
    assert cache.k[0].shape == shape and cache.v[0].shape == (3, 2, 16, 8)


# ----------------------------------------------------------------------------
# The compiled decode step copies no cache.


def _cache_copies(hlo: str, s: int) -> list[str]:
  """Lines of optimized HLO that copy or transpose a buffer with a
  cache-length (``s``) axis, directly or as a fusion whose root does."""
  roots, comp = {}, None
  for line in hlo.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if m:
      comp = m.group(1)
    elif "ROOT" in line:
      roots[comp] = line
  hits = []
  for line in hlo.splitlines():
    m = re.search(r"= \w+\[([\d,]*)\]\{[^}]*\} (copy|transpose|fusion)\(", line)
    if not m or str(s) not in m.group(1).split(","):
      continue
    if m.group(2) == "fusion":
      callee = re.search(r"calls=%([\w.\-]+)", line)
      if not callee or not re.search(r" (copy|transpose)\(", roots.get(callee.group(1), "")):
        continue
    hits.append(line.strip())
  return hits


@pytest.mark.parametrize("scan", [False, True])
def test_blocked_decode_step_copies_no_cache(scan):
  """One decode step (T = 1, cache donated) of the blocked decode, unrolled
  and scanned (blocks read straight from the stacked carry): no copy or
  transpose of a cache-length buffer in the optimized HLO, and less temp
  memory than one layer's key cache."""
  s = 1000
  cfg = cfg_of(
    decode_attention="blocked",
    decode_block=128,
    scan_layers=scan,
    max_position_embeddings=2048,
    vocab_size=128,
    padded_vocab_size=128,
  )
  from opd_jax.models import abstract_model

  graphdef, state = nnx.split(abstract_model(cfg))
  b = 4

  def step(state, cache, tok):
    h, cache = nnx.merge(graphdef, state).hidden(
      tok, jnp.ones((b, 1), bool), jnp.full((b, 1), 7), cache
    )
    return h, cache

  cache = jax.eval_shape(lambda: nnx.merge(graphdef, state).init_cache(b, s))
  compiled = (
    jax.jit(step, donate_argnums=1)
    .lower(state, cache, jax.ShapeDtypeStruct((b, 1), jnp.int32))
    .compile()
  )
  assert _cache_copies(compiled.as_text(), s) == []
  key_bytes = b * cfg.num_kv_heads * cfg.head_dim * s * 4
  assert compiled.memory_analysis().temp_size_in_bytes < key_bytes


def test_phase_lengths():
  """Phases end at P + ceil(k·N/K), K = ceil(N / slots); the last one holds all
  P + N slots; any decode but "phased" has one fixed cache."""
  assert attention_lib.phase_lengths(9, 200, "phased", 64) == (59, 109, 159, 209)
  assert attention_lib.phase_lengths(9, 200, "phased", 512) == (209,)
  assert attention_lib.phase_lengths(32, 4096, "phased", 512) == tuple(
    32 + 512 * k for k in range(1, 9)
  )
  assert attention_lib.phase_lengths(9, 200, "dense", 64) == (209,)
  # pallas_gpu: one cache of 16·splits·m slots, a split per 256 (at most 16).
  assert attention_lib.phase_lengths(9, 200, "pallas_gpu", 64) == (224,)
  assert attention_lib.phase_lengths(32, 1000, "pallas_gpu", 64) == (1040,)  # 5 splits
  assert attention_lib.phase_lengths(32, 8192, "pallas_gpu", 64) == (8448,)
  assert attention_lib.phase_lengths(9, 200, "blocked", 64) == (209,)
  model = make_model(
    cfg_of(decode_attention="phased", decode_phase_slots=64), peaky_state(cfg_of())
  )
  assert model.cache_lengths(9, 200) == (59, 109, 159, 209)
  cache = model.grow_cache(model.init_cache(4, 59), 109)
  assert cache.k[0].shape == (4, 2, 8, 109) and cache.v[0].shape == (4, 2, 109, 8)
  assert cache.valid.shape == (4, 109)
  with pytest.raises(ValueError, match="grow_cache"):
    model.grow_cache(cache, 60)


def test_phased_sampler_stops_early_on_eos():
  """A phased sampler whose rows all end in the first phase runs no step of the
  later phases' loops (``steps`` = the tokens sampled), and its tokens equal the
  one-phase sampler's."""
  weights = peaky_state(cfg_of())
  config = SamplingConfig(max_new_tokens=N_NEW, eos_ids=(5, 11, 17, 23, 29, 31, 37, 41))
  ids, mask = left_padded_batch(VOCAB, lengths=(P, 3, 6, 1), seed=2)
  outs = {}
  for slots in (16, 512):
    model = make_model(cfg_of(decode_attention="phased", decode_phase_slots=slots), weights)
    graphdef, state = nnx.split(model)
    outs[slots] = _jit_sample(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), config)
  np.testing.assert_array_equal(np.asarray(outs[16].tokens), np.asarray(outs[512].tokens))
  assert int(outs[16].steps) == int(outs[512].steps) == int(np.max(outs[16].lengths))
  assert int(outs[16].steps) < N_NEW


# ----------------------------------------------------------------------------
# Greedy parity with transformers.generate through several cache blocks.


@pytest.mark.parametrize("decode", ["blocked", "phased"])  # 29 slots: 8 blocks / 4 phases
def test_greedy_matches_hf_generate(tmp_path, decode):
  import torch
  import transformers

  from opd_jax.models.hf_io import from_hf

  path = save_random_hf_model(tmp_path / "qwen3", "qwen3", seed=3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  model = from_hf(path, decode_attention=decode, decode_block=4, decode_phase_slots=6)
  ids, mask = left_padded_batch(97, lengths=(6, 3, 9, 1), seed=1)
  n_new = 20
  with torch.no_grad():
    ref = hf.generate(
      input_ids=torch.as_tensor(ids, dtype=torch.long),
      attention_mask=torch.as_tensor(mask, dtype=torch.long),
      do_sample=False,
      max_new_tokens=n_new,
      pad_token_id=0,
      eos_token_id=None,
      bos_token_id=None,
    )[:, ids.shape[1] :].numpy()
  config = SamplingConfig(max_new_tokens=n_new, greedy=True)
  graphdef, state = nnx.split(model)
  out = _jit_sample(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), config)
  np.testing.assert_array_equal(np.asarray(out.tokens), ref)


# ----------------------------------------------------------------------------
# Prefix-sum knob of the inverse-CDF draw.


def test_prefix_sum_knob_same_draws():
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.gamma(0.5, size=(64, 37)), jnp.float32)
  np.testing.assert_allclose(
    sampling_lib._inclusive_prefix_sum(x, "matmul"),
    sampling_lib._inclusive_prefix_sum(x, "cumsum"),
    rtol=1e-6,
  )
  logits = jnp.asarray(3 * rng.standard_normal((512, 200)), jnp.float32)
  u = jnp.asarray(rng.random(512), jnp.float32)
  draws = {
    m: np.asarray(
      sampling_lib.sample_token(
        logits, u, SamplingConfig(max_new_tokens=1, top_p=0.9, prefix_sum=m)
      )[0]
    )
    for m in sampling_lib.PREFIX_SUMS
  }
  np.testing.assert_array_equal(draws["matmul"], draws["cumsum"])
  np.testing.assert_array_equal(draws["auto"], draws["matmul"])
  with pytest.raises(ValueError, match="prefix_sum"):
    SamplingConfig(max_new_tokens=1, prefix_sum="scan")


def test_decode_knobs_pass_through_config():
  from opd_jax import configs_lib
  from opd_jax.train import model_spec

  m = configs_lib.model_config()
  assert (m.decode_attention, m.decode_block, m.decode_contraction, m.key_cache_layout) == (
    "auto",
    128,
    "auto",
    "auto",
  )
  assert m.decode_phase_slots == 512
  m.decode_attention, m.decode_block, m.key_cache_layout = "dense", 32, "standard"
  m.decode_phase_slots = 96
  kw = model_spec(m).kwargs()
  assert (
    kw["decode_attention"],
    kw["decode_block"],
    kw["decode_contraction"],
    kw["key_cache_layout"],
    kw["decode_phase_slots"],
  ) == ("dense", 32, "auto", "standard", 96)
