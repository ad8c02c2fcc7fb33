"""Tests for opd_jax.sampling: HF parity, distribution, EOS, sharding, jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import tiny_model_config

from opd_jax import sampling as sampling_lib
from opd_jax.models import ModelConfig, abstract_model, param_shardings, positions_from_mask
from opd_jax.sampling import (
  SampleOutput,
  SamplingConfig,
  concat_prompt_completion,
  process_logits,
  sample,
)
from opd_jax.sharding import Sharder, make_mesh

try:
  from tests.hf_models import left_padded_batch, save_random_hf_model
except ImportError:  # tests/ itself on sys.path
  from hf_models import left_padded_batch, save_random_hf_model

VOCAB = 61  # padded to 64: the 3 padded logits (-1e30) must never be sampled


def tiny_cfg(**kw) -> ModelConfig:
  """One layer keeps each sampler compile short; the HF parity tests run 2 layers."""
  base = dict(
    model_type="llama", vocab_size=VOCAB, padded_vocab_size=64, num_layers=1, qk_norm=False
  )
  return tiny_model_config(**{**base, **kw})


def peaky_state(cfg: ModelConfig, seed: int = 0):
  """Random numpy weights (no XLA init compile) with O(1-2) context-dependent
  logits (the default 0.02 init gives near-uniform next-token distributions)."""
  graphdef, abstract = nnx.split(abstract_model(cfg))
  rng = np.random.default_rng(seed)

  def init(path, x):
    name = jax.tree_util.keystr(path)
    if "norm" in name:
      w = 1.0 + 0.1 * rng.standard_normal(x.shape)
    elif "embed" in name:
      w = 0.5 * rng.standard_normal(x.shape)
    elif "lm_head" in name:
      w = 0.3 * rng.standard_normal(x.shape)
    else:  # [fan_in..., fan_out]: o is [H, Dh, D], the rest [D, ...] / [F, D]
      fan_in = x.shape[0] * x.shape[1] if "'o'" in name else x.shape[0]
      w = rng.standard_normal(x.shape) / np.sqrt(fan_in)
    return np.asarray(w, np.float32)

  return jax.tree_util.tree_map_with_path(init, abstract)


def make_model(cfg: ModelConfig, state, sharder: Sharder = Sharder()):
  """The model with ``state`` placed on the sharder's parameter shardings."""
  graphdef, abstract = nnx.split(abstract_model(cfg, sharder))
  if sharder.mesh is not None:
    state = jax.device_put(state, param_shardings(abstract, sharder))
  else:
    state = jax.tree.map(jnp.asarray, state)
  return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _jit_sample(graphdef, state, ids, mask, key, config):
  _TRACES.append(config)
  return sample(nnx.merge(graphdef, state), ids, mask, key, config)


@functools.partial(jax.jit, static_argnums=0)
def _jit_forward(graphdef, state, ids, mask, positions):
  return nnx.merge(graphdef, state)(ids, mask, positions)


_TRACES: list = []


def jit_sampler(model, config: SamplingConfig):
  """``(ids, mask, key) -> SampleOutput`` under jax.jit, the model merged from
  (graphdef, state) inside the jitted function as in the training step.
  Compiled once per (graphdef, config, shapes, shardings)."""
  graphdef, state = nnx.split(model)
  return lambda ids, mask, key: _jit_sample(graphdef, state, ids, mask, key, config)


def forward(model, ids, mask, positions=None):
  """Uncached full forward (jitted) -> np.float32 logits ``[B, T, V]``."""
  graphdef, state = nnx.split(model)
  if positions is None:
    positions = positions_from_mask(jnp.asarray(mask))
  return np.asarray(
    _jit_forward(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions))
  )


@pytest.fixture(scope="module")
def weights():
  return peaky_state(tiny_cfg())


@pytest.fixture(scope="module")
def model(weights):
  return make_model(tiny_cfg(), weights)


def prompts(lengths=(5, 2, 7, 4), seed=0):
  ids, mask = left_padded_batch(VOCAB, lengths=lengths, seed=seed)
  return jnp.asarray(ids), jnp.asarray(mask)


def check_invariants(out: SampleOutput, config: SamplingConfig, vocab: int = VOCAB):
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  lengths, trunc = np.asarray(out.lengths), np.asarray(out.truncated)
  n = config.max_new_tokens
  np.testing.assert_array_equal(mask.sum(-1), lengths)
  np.testing.assert_array_equal(mask, np.arange(n)[None] < lengths[:, None])
  assert (tokens[mask == 0] == config.pad_id).all()
  assert (np.asarray(out.logprobs)[mask == 0] == 0).all()
  assert (np.asarray(out.logprobs_t1)[mask == 0] == 0).all()
  assert (tokens < vocab).all()
  eos = np.isin(tokens, config.eos_ids) & (mask == 1)
  for r in range(tokens.shape[0]):
    hits = np.flatnonzero(eos[r])
    if trunc[r]:
      assert lengths[r] == n and hits.size == 0
    else:
      assert hits.size == 1 and hits[0] == lengths[r] - 1  # EOS is the last real token
  assert int(out.steps) == lengths.max()  # the loop ran exactly as long as needed


# ----------------------------------------------------------------------------
# Config / input validation.


@pytest.mark.parametrize(
  "kw",
  [
    dict(max_new_tokens=0),
    dict(max_new_tokens=4, temperature=0.0),
    dict(max_new_tokens=4, top_p=0.0),
    dict(max_new_tokens=4, top_p=1.5),
    dict(max_new_tokens=4, top_k=-1),
    dict(max_new_tokens=4, num_samples=0),
    dict(max_new_tokens=4, eos_ids=(-3,)),
  ],
)
def test_config_validation(kw):
  with pytest.raises(ValueError):
    SamplingConfig(**kw)


def test_config_hashable_and_greedy_temperature():
  c = SamplingConfig(max_new_tokens=4, greedy=True, temperature=0.0, eos_ids=[2, 3])
  assert c.eos_ids == (2, 3) and hash(c) == hash(
    SamplingConfig(4, 0.0, greedy=True, eos_ids=(2, 3))
  )


def test_bad_inputs_raise_at_trace_time(model):
  ids, mask = prompts()  # P = 7, max_position_embeddings = 64
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    jit_sampler(model, SamplingConfig(max_new_tokens=58))(ids, mask, key)
  with pytest.raises(ValueError, match="shape"):
    sample(model, ids, mask[:, 1:], key, SamplingConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match="B, P"):
    sample(model, ids[0], mask[0], key, SamplingConfig(max_new_tokens=4))
  with pytest.raises(ValueError, match="vocab_size"):
    sample(model, ids, mask, key, SamplingConfig(max_new_tokens=4, eos_ids=(VOCAB,)))
  with pytest.raises(ValueError, match="never be sampled"):
    sample(model, ids, mask, key, SamplingConfig(max_new_tokens=4, eos_ids=(50,), vocab_size=40))


# ----------------------------------------------------------------------------
# Greedy parity with transformers.generate.


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_matches_hf_generate(tmp_path, family):
  import torch
  import transformers

  from opd_jax.models.hf_io import from_hf

  path = save_random_hf_model(tmp_path / family, family, seed=3)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, attn_implementation="eager"
  ).eval()
  model = from_hf(path)
  ids, mask = left_padded_batch(97, lengths=(6, 3, 9, 1), seed=1)
  n_new, pad = 20, 0

  def hf_generate(eos):
    with torch.no_grad():
      out = hf.generate(
        input_ids=torch.as_tensor(ids, dtype=torch.long),
        attention_mask=torch.as_tensor(mask, dtype=torch.long),
        do_sample=False,
        max_new_tokens=n_new,
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=None,
      )
    return out[:, ids.shape[1] :].numpy()

  # Pick as EOS a token greedy emits mid-way in row 0 (first occurrence >= 4).
  free = hf_generate(None)
  row0 = list(free[0])
  eos = next(t for i, t in enumerate(row0) if i >= 4 and t not in row0[:i] and t != pad)
  ref = hf_generate(int(eos))
  assert (ref == eos).any()

  config = SamplingConfig(max_new_tokens=n_new, greedy=True, eos_ids=(int(eos),), pad_id=pad)
  out = jit_sampler(model, config)(jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0))
  tokens = np.asarray(out.tokens)
  width = ref.shape[1]  # HF stops once every row is done
  np.testing.assert_array_equal(tokens[:, :width], ref)
  assert (tokens[:, width:] == pad).all()
  assert int(out.steps) == width
  for r in range(len(ids)):
    hit = np.flatnonzero(ref[r] == eos)
    expect = hit[0] + 1 if hit.size else n_new
    assert int(out.lengths[r]) == expect and bool(out.truncated[r]) == (hit.size == 0)
  check_invariants(out, config, vocab=97)


# ----------------------------------------------------------------------------
# Sampling distribution.


def _hf_processed(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
  """Reference: HF's own logits warpers (temperature, top-k, top-p) in torch."""
  import torch
  from transformers.generation import logits_process as lp

  scores = torch.as_tensor(logits, dtype=torch.float32)
  if config.vocab_size:
    scores[..., config.vocab_size :] = -float("inf")
  warpers = [lp.TemperatureLogitsWarper(config.temperature)]
  if config.top_k:
    warpers.append(lp.TopKLogitsWarper(config.top_k))
  if config.top_p < 1.0:
    warpers.append(lp.TopPLogitsWarper(config.top_p))
  for w in warpers:
    scores = w(None, scores)
  return torch.log_softmax(scores, dim=-1).numpy()


def _np_processed(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
  """Numpy re-implementation of HF's warpers (no torch): log-probs ``[..., V]``."""
  z = np.asarray(logits, np.float64) / config.temperature
  if config.vocab_size:
    z = np.where(np.arange(z.shape[-1]) < config.vocab_size, z, -np.inf)
  if config.top_k:
    kth = np.sort(z, -1)[..., -min(config.top_k, z.shape[-1]), None]
    z = np.where(z < kth, -np.inf, z)
  if config.top_p < 1.0:
    order = np.argsort(z, -1, kind="stable")  # ascending, as HF
    asc = np.take_along_axis(z, order, -1)
    cum = np.cumsum(np.exp(_log_softmax(asc)), -1)
    remove = cum <= 1 - config.top_p
    remove[..., -1] = False
    z = np.where(_scatter(remove, order), -np.inf, z)
  return _log_softmax(z)


def _scatter(values: np.ndarray, order: np.ndarray) -> np.ndarray:
  out = np.empty_like(values)
  np.put_along_axis(out, order, values, -1)
  return out


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
  """Pearson chi-square goodness of fit over the support of ``probs``; bins
  with expected count < 5 are pooled (into the next-smallest bin if the pool
  itself stays < 5)."""
  support = probs > 0
  expected, counts = probs[support] * counts.sum(), counts[support].astype(np.float64)
  order = np.argsort(expected)
  expected, counts = expected[order], counts[order]
  k = int(np.searchsorted(np.cumsum(expected), 5.0)) + 1  # smallest prefix with mass >= 5
  exp = np.append(expected[:k].sum(), expected[k:])
  obs = np.append(counts[:k].sum(), counts[k:])
  stat = float(((obs - exp) ** 2 / exp).sum())
  return float(jax.scipy.stats.chi2.sf(stat, len(exp) - 1))


@pytest.mark.parametrize(
  "kw",
  [dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8), dict(temperature=1.5, vocab_size=40)],
)
def test_first_token_distribution(model, kw):
  ids, mask = prompts(lengths=(6, 3))
  reps = 10_000
  config = SamplingConfig(max_new_tokens=1, num_samples=reps, **kw)
  out = jit_sampler(model, config)(ids, mask, jax.random.key(42))
  raw = forward(model, ids, mask)[:, -1, :VOCAB].astype(np.float64)
  ref_logp = _np_processed(raw, config)  # HF warper semantics (checked against HF below)
  ref_logp_t1 = _log_softmax(
    np.where(np.arange(VOCAB) < (config.vocab_size or VOCAB), raw, -np.inf)
  )
  tokens = np.asarray(out.tokens)[:, 0].reshape(len(ids), reps)
  assert (tokens < (config.vocab_size or VOCAB)).all()
  lp = np.asarray(out.logprobs)[:, 0].reshape(len(ids), reps)
  lp1 = np.asarray(out.logprobs_t1)[:, 0].reshape(len(ids), reps)
  for b in range(len(ids)):
    probs = np.exp(ref_logp[b])
    counts = np.bincount(tokens[b], minlength=VOCAB)
    assert counts[probs == 0].sum() == 0, "sampled a filtered-out token"
    if kw.get("top_k") or kw.get("top_p"):
      assert (probs == 0).any()  # the filter is actually active
    assert _chi2_pvalue(counts, probs) > 1e-3
    np.testing.assert_allclose(lp[b], ref_logp[b][tokens[b]], atol=2e-4)
    np.testing.assert_allclose(lp1[b], ref_logp_t1[b][tokens[b]], atol=2e-4)


@pytest.mark.parametrize("vocab", [1, 2, 7, 61, 64, 1000, 151_936])
def test_inverse_cdf_matches_numpy_searchsorted(vocab):
  """The two-level draw == numpy's inverse CDF (float64) on a grid of
  uniforms up to float32 rounding at interval boundaries; never a
  zero-probability id; every heavy enough id is reached."""
  rng = np.random.default_rng(vocab)
  rows, grid = 4, (4096 if vocab < 10_000 else 32)
  p = rng.gamma(0.3, size=(rows, vocab)) * (rng.random((rows, vocab)) < 0.6)
  p[:, rng.integers(vocab)] += 1.0  # every row has mass
  p[1] = 0.0
  p[1, -1] = 2.0  # a single id, the last one
  u = (np.arange(grid) + 0.5) / grid
  pr = np.repeat(p, grid, axis=0).astype(np.float32)
  ur = np.tile(u, rows).astype(np.float32)
  got = np.asarray(jax.jit(sampling_lib._inverse_cdf)(jnp.asarray(pr), jnp.asarray(ur)))
  cdf = np.cumsum(pr.astype(np.float64), axis=-1)
  target = (1 - ur) * cdf[:, -1]
  want = np.array([np.searchsorted(c, t, side="left") for c, t in zip(cdf, target)])
  picked = pr[np.arange(len(got)), got]
  assert (picked > 0).all(), "drew a zero-probability id"
  assert np.mean(got == want) > 0.98
  # Where they differ, float32 rounding moved a boundary: the drawn id's
  # CDF interval still holds the target to within 1e-6 of the total mass.
  hi = cdf[np.arange(len(got)), got]
  tol = 1e-6 * cdf[:, -1]
  assert ((hi - picked - tol <= target) & (target <= hi + tol)).all()
  for r in range(rows):
    big = p[r] / p[r].sum() > 4.0 / grid  # owns >= 4 grid points
    seen = np.zeros(vocab, bool)
    seen[got[r * grid : (r + 1) * grid]] = True
    assert seen[big].all()
  assert (got[grid : 2 * grid] == vocab - 1).all()


def test_process_logits_matches_hf_warpers():
  logits = np.asarray(jax.random.normal(jax.random.key(0), (16, 50))) * 3
  for kw in (dict(top_p=0.5), dict(temperature=0.5, top_k=20, top_p=0.95), dict(top_k=100)):
    config = SamplingConfig(max_new_tokens=1, **kw)
    ours = np.asarray(jax.nn.log_softmax(process_logits(jnp.asarray(logits), config)))
    ref = _hf_processed(logits, config)
    np.testing.assert_allclose(_np_processed(logits, config), ref, atol=1e-5)  # torch-free ref
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ref)], ref[~np.isinf(ref)], atol=1e-5)


def test_logprobs_match_full_forward_over_completion(model):
  """Every step's logprobs == the full (uncached) forward on prompt+completion;
  EOS / padding invariants under sampling; concat_prompt_completion layout."""
  ids, mask = prompts()
  # EOS = each prompt's 2nd most likely first token: some rows end early.
  first = forward(model, ids, mask)[:, -1, :VOCAB].argsort(-1)[:, -2]
  config = SamplingConfig(
    max_new_tokens=12,
    temperature=0.8,
    top_k=10,
    top_p=0.9,
    eos_ids=tuple(sorted({int(t) for t in first})),
    pad_id=3,
    num_samples=4,
  )
  out = jit_sampler(model, config)(ids, mask, jax.random.key(5))
  check_invariants(out, config)
  trunc = np.asarray(out.truncated)
  assert trunc.any() and not trunc.all()
  np.testing.assert_array_equal(np.asarray(out.prompt_ids), np.repeat(np.asarray(ids), 4, 0))
  np.testing.assert_array_equal(np.asarray(out.prompt_mask), np.repeat(np.asarray(mask), 4, 0))

  full, fmask, fpos = concat_prompt_completion(out)
  p, n = ids.shape[1], config.max_new_tokens
  np.testing.assert_array_equal(full, np.concatenate([out.prompt_ids, out.tokens], 1))
  np.testing.assert_array_equal(fmask, np.concatenate([out.prompt_mask, out.mask], 1))
  lens = np.asarray(out.prompt_mask).sum(-1)
  expect_pos = np.where(np.asarray(out.mask) == 1, lens[:, None] + np.arange(n), 0)
  np.testing.assert_array_equal(np.asarray(fpos)[:, p:], expect_pos)
  np.testing.assert_array_equal(
    np.asarray(fpos)[:, :p], positions_from_mask(jnp.asarray(out.prompt_mask))
  )
  logits = forward(model, full, fmask, fpos)[:, p - 1 : -1, :VOCAB]  # predicts token i
  ref = _np_processed(logits, config)
  ref_t1 = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  tok = np.asarray(out.tokens)
  m = np.asarray(out.mask).astype(bool)
  pick = lambda a: np.take_along_axis(a, tok[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs)[m], pick(ref)[m], atol=2e-4)
  np.testing.assert_allclose(np.asarray(out.logprobs_t1)[m], pick(ref_t1)[m], atol=2e-4)
  assert np.isfinite(pick(ref)[m]).all()


# ----------------------------------------------------------------------------
# EOS handling and early stop.


def test_eos_handling_and_early_stop(model):
  ids, mask = prompts(lengths=(5, 2, 7, 4, 3, 6))
  n = 16
  free_cfg = SamplingConfig(max_new_tokens=n, greedy=True)
  free = jit_sampler(model, free_cfg)(ids, mask, jax.random.key(0))
  free_tok = np.asarray(free.tokens)
  assert int(free.steps) == n and np.asarray(free.truncated).all()
  # greedy: the uncached forward on prompt + completion reproduces every token
  full, fmask, fpos = concat_prompt_completion(free)
  logits = forward(model, full, fmask, fpos)
  np.testing.assert_array_equal(logits[:, ids.shape[1] - 1 : -1].argmax(-1), free_tok)

  # (a) one EOS id = a token row 0 emits mid-way: some rows stop, others truncate.
  row0 = list(free_tok[0])
  eos = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])
  config = SamplingConfig(max_new_tokens=n, greedy=True, eos_ids=(int(eos),), pad_id=VOCAB - 1)
  out = jit_sampler(model, config)(ids, mask, jax.random.key(0))
  check_invariants(out, config)
  hits = [np.flatnonzero(r == eos) for r in free_tok]
  expect_len = np.array([h[0] + 1 if h.size else n for h in hits])
  np.testing.assert_array_equal(np.asarray(out.lengths), expect_len)
  np.testing.assert_array_equal(np.asarray(out.truncated), [h.size == 0 for h in hits])
  tok = np.asarray(out.tokens)
  for r in range(len(ids)):
    np.testing.assert_array_equal(tok[r, : expect_len[r]], free_tok[r, : expect_len[r]])
    assert (tok[r, expect_len[r] :] == VOCAB - 1).all()
  assert int(out.steps) == expect_len.max()

  # (b) every row emits one of the EOS ids by step 3 -> the loop stops early.
  eos_ids = tuple(sorted({int(t) for t in free_tok[:, 2]}))
  config = SamplingConfig(max_new_tokens=n, greedy=True, eos_ids=eos_ids)
  out = jit_sampler(model, config)(ids, mask, jax.random.key(0))
  check_invariants(out, config)
  first = [np.flatnonzero(np.isin(r, eos_ids))[0] + 1 for r in free_tok]
  np.testing.assert_array_equal(np.asarray(out.lengths), first)
  assert int(out.steps) == max(first) <= 3 < n
  assert not np.asarray(out.truncated).any()


# ----------------------------------------------------------------------------
# Sharding invariance and compilation.


def test_same_key_same_samples_on_any_mesh_compiled_once(model, weights):
  """Same key -> same samples on 1 device and on a (2, 2, 2) mesh; each jitted
  sampler is traced once however many keys it is called with."""
  single_model, cfg = model, tiny_cfg()
  ids, mask = prompts()
  config = SamplingConfig(
    max_new_tokens=10, temperature=0.9, top_k=20, top_p=0.95, eos_ids=(5,), num_samples=2
  )
  key = jax.random.key(7)
  single = jit_sampler(single_model, config)(ids, mask, key)
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharder = Sharder(mesh)
  model = make_model(cfg, weights, sharder)  # same weights, sharded over 8 devices
  assert len(model.embed[...].sharding.device_set) == 8
  sharded_ids = jax.device_put(ids, sharder.batch(2, ids.shape[0]))
  sharded_mask = jax.device_put(mask, sharder.batch(2, ids.shape[0]))
  multi = jit_sampler(model, config)(sharded_ids, sharded_mask, key)
  assert len(multi.tokens.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(single.tokens), np.asarray(multi.tokens))
  np.testing.assert_array_equal(np.asarray(single.mask), np.asarray(multi.mask))
  np.testing.assert_allclose(np.asarray(single.logprobs), np.asarray(multi.logprobs), atol=1e-4)
  np.testing.assert_allclose(
    np.asarray(single.logprobs_t1), np.asarray(multi.logprobs_t1), atol=1e-4
  )
  # other keys: different samples, no retrace (one trace for each of the 2 models)
  run = jit_sampler(model, config)
  others = [run(sharded_ids, sharded_mask, jax.random.key(s)) for s in (8, 9)]
  assert len({np.asarray(o.tokens).tobytes() for o in others + [multi]}) == 3
  assert sum(c == config for c in _TRACES) == 2


def test_sample_inside_differentiated_function(model):
  """OPD-style step: sample, re-score with the same params, take the gradient.
  No gradient flows into the sampler: its outputs are constants, so the
  gradient equals that of the re-scoring with the samples drawn outside, and a
  loss of the sampler's log-probs alone has a zero gradient."""
  graphdef, state = nnx.split(model)
  ids, mask = prompts(lengths=(3, 2))
  config = SamplingConfig(max_new_tokens=3, eos_ids=(5,))
  key = jax.random.key(0)

  def rescored(state, out):
    student = nnx.merge(graphdef, state)
    full, fmask, fpos = concat_prompt_completion(out)
    logp = jax.nn.log_softmax(student(full, fmask, fpos)[:, ids.shape[1] - 1 : -1], -1)
    logp = jnp.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
    return -(logp * out.mask).sum()

  def loss(state):
    out = sample(nnx.merge(graphdef, state), ids, mask, key, config)
    return rescored(state, out) + out.logprobs.sum()  # sampler logprobs: constants

  def sampler_only(state):
    out = sample(nnx.merge(graphdef, state), ids, mask, key, config)
    return out.logprobs.sum() + out.logprobs_t1.sum()

  grads = jax.jit(jax.grad(loss))(state)
  fixed = sample(model, ids, mask, key, config)
  want = jax.jit(jax.grad(rescored))(state, fixed)
  norms = [float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and sum(norms) > 0
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
  zero = jax.jit(jax.grad(sampler_only))(state)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(zero))


def test_precomputed_uniforms_match_key_and_split_rows(model):
  """``uniforms=uniform(key, [N, R])`` reproduces ``rng=key`` exactly, and a
  subset of rows given its columns samples exactly those rows' tokens (how
  the OPD step samples in micro-batches)."""
  ids, mask = prompts(lengths=(5, 2, 7, 4, 3, 6))
  config = SamplingConfig(
    max_new_tokens=10, temperature=0.9, top_p=0.95, eos_ids=(7,), num_samples=2
  )
  graphdef, state = nnx.split(model)
  key = jax.random.key(5)
  rows = ids.shape[0] * config.num_samples

  @jax.jit
  def run(state, ids, mask, u):
    return sample(nnx.merge(graphdef, state), ids, mask, None, config, uniforms=u)

  u = jax.random.uniform(key, (config.max_new_tokens, rows), jnp.float32)
  ref = jit_sampler(model, config)(ids, mask, key)
  got = run(state, ids, mask, u)
  for name in ("tokens", "logprobs", "mask", "lengths", "truncated"):
    np.testing.assert_array_equal(getattr(got, name), getattr(ref, name), err_msg=name)
  # Prompts 3..5 (rows 6..11) alone, with their columns of u.
  part = run(state, ids[3:], mask[3:], u[:, 6:])
  np.testing.assert_array_equal(part.tokens, np.asarray(ref.tokens)[6:])
  np.testing.assert_array_equal(part.lengths, np.asarray(ref.lengths)[6:])
  with pytest.raises(ValueError, match="uniforms must be"):
    run(state, ids, mask, u[:, 1:])
  with pytest.raises(ValueError, match="needs rng or uniforms"):
    sample(model, ids, mask, None, config)
