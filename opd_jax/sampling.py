"""Autoregressive sampling from the NNX :class:`~opd_jax.models.Transformer`.

:func:`sample` is a pure function meant to run *inside* a jitted step (e.g. the
OPD training step, with the student merged from ``(graphdef, state)``):

1. repeat every prompt ``num_samples`` times (rows ``b*n .. b*n+n-1`` belong to
   prompt ``b``);
2. prefill the left-padded prompts ``[B, P]`` in one call into a cache of
   ``P + N`` slots (``N = max_new_tokens``), or of the first phase's slots when
   the model decodes in phases (``decode_attention="phased"``,
   ``Transformer.cache_lengths``);
3. ``jax.lax.while_loop``: each iteration samples token ``i`` from the carried
   hidden state, then runs that one token through the cache (one decode step;
   the prefix is never re-run). The loop stops after N tokens or as soon as
   every row has emitted an EOS. A phased model runs one such loop per phase,
   the cache grown (one copy) between them, so each step attends over its
   phase's slots, not all P + N.

The model's parameters enter through ``stop_gradient``: sampled tokens and their
log-probs are data (the behaviour policy), so a caller may sample inside a
function it differentiates.

Positions: prompt tokens get ``cumsum(mask) - 1`` (left pads 0); generated token
``i`` of a row with ``L`` real prompt tokens gets position ``L + i``. Prompts must
be left-padded with >= 1 real token (the last column is every row's last token).

Randomness: one uniform per row and token, ``u = uniform(rng, [N, B*n])``
drawn once before the decode loop (token ``i`` of row ``r`` uses ``u[i, r]``,
by inverse CDF; no random-bit generation inside the loop). With JAX's
partitionable threefry (the default) the bits do not depend on how the batch
is sharded, so a key gives the same samples on any mesh (up to float
reduction-order ties in the logits).

Logit processing follows Hugging Face ``generate``: temperature, then top-k
(``TopKLogitsWarper``: keep logits >= the k-th largest), then top-p
(``TopPLogitsWarper``: keep the smallest set of most likely tokens whose mass
is >= ``top_p``; the most likely token is always kept).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax.models.transformer import positions_from_mask
from opd_jax.sharding import Sharder

_BATCH = "activation_batch"
PREFIX_SUMS = ("auto", "matmul", "cumsum")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static sampling settings (hashable; pass as a static / closed-over arg).

  Attributes:
    max_new_tokens: N, completion buffer length (static shape).
    temperature: logits are divided by it (ignored when ``greedy``).
    top_k: keep the k most likely tokens (ties at the k-th value kept); 0 = off.
    top_p: nucleus mass in (0, 1]; 1 = off.
    greedy: argmax decoding (temperature / top-k / top-p ignored).
    eos_ids: tokens that end a row (may be empty: every row runs N tokens).
    pad_id: written after a row's EOS.
    num_samples: completions per prompt.
    vocab_size: only ids < vocab_size are ever sampled (0: the model's whole
      output; set it to the tokenizer size when checkpoints pad their
      embedding rows, so padded ids are never drawn).
    prefix_sum: the inverse-CDF draw's prefix sums: "matmul" (one matmul with
      the triangular ones; XLA:CPU lowers ``cumsum`` to an O(n²)
      ``reduce_window``), "cumsum" (``jnp.cumsum``) or "auto" (matmul on
      XLA:CPU, cumsum elsewhere; resolved when the sampler is traced).
  """

  max_new_tokens: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  eos_ids: tuple[int, ...] = ()
  pad_id: int = 0
  num_samples: int = 1
  vocab_size: int = 0
  prefix_sum: str = "auto"
  # Under ``jax.vmap(..., axis_name=...)`` (a vmapped sweep's points): the
  # decode loop runs until every point is done (``lax.pmin`` over the axis),
  # so its predicate is not batched and no per-iteration select copies the
  # carried caches; rows already done only emit padding, as they do anyway.
  loop_axis_name: str | None = None

  def __post_init__(self):
    def whole(name, lo):
      v = getattr(self, name)
      if isinstance(v, bool) or int(v) != v or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
      object.__setattr__(self, name, int(v))

    whole("max_new_tokens", 1)
    whole("top_k", 0)
    whole("num_samples", 1)
    whole("pad_id", 0)
    whole("vocab_size", 0)
    eos = (self.eos_ids,) if isinstance(self.eos_ids, int) else tuple(self.eos_ids)
    if any(int(e) != e or e < 0 for e in eos):
      raise ValueError(f"eos_ids must be ints >= 0, got {self.eos_ids!r}")
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))
    object.__setattr__(self, "temperature", float(self.temperature))
    object.__setattr__(self, "top_p", float(self.top_p))
    object.__setattr__(self, "greedy", bool(self.greedy))
    if not self.greedy and not self.temperature > 0:
      raise ValueError(
        f"temperature must be > 0 when sampling (use greedy=True for "
        f"argmax), got {self.temperature!r}"
      )
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
    if self.prefix_sum not in PREFIX_SUMS:
      raise ValueError(f"prefix_sum={self.prefix_sum!r}; expected one of {PREFIX_SUMS}")


class SampleOutput(NamedTuple):
  """Sampler result; ``R = B * num_samples`` rows, ``N = max_new_tokens``.

  tokens: ``[R, N]`` int32, ``pad_id`` after EOS.
  logprobs: ``[R, N]`` f32, log pi(token) under the sampling distribution
    (after temperature / top-k / top-p; 0 for greedy; 0 where masked).
  logprobs_t1: ``[R, N]`` f32, log softmax(raw logits)[token] (0 where masked).
  mask: ``[R, N]`` int32, 1 up to and including EOS.
  lengths: ``[R]`` int32, completion lengths (= ``mask.sum(-1)``).
  truncated: ``[R]`` bool, reached N tokens without EOS.
  prompt_ids, prompt_mask: ``[R, P]`` the repeated prompts.
  steps: scalar int32, tokens sampled per row before the loop stopped (<= N).
  """

  tokens: jax.Array
  logprobs: jax.Array
  logprobs_t1: jax.Array
  mask: jax.Array
  lengths: jax.Array
  truncated: jax.Array
  prompt_ids: jax.Array
  prompt_mask: jax.Array
  steps: jax.Array


# ----------------------------------------------------------------------------
# Logit processing.


def process_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Raw logits ``[..., V]`` -> sampling logits (``-inf`` = filtered out).

  z = logits / T; top-k keeps z >= (k-th largest z); top-p keeps tokens whose
  exclusive descending cumulative probability is < top_p (HF semantics). The
  argmax always survives, so every row keeps >= 1 finite entry.
  """
  z = logits.astype(jnp.float32) / jnp.float32(config.temperature)
  v = z.shape[-1]
  k = min(config.top_k, v) if config.top_k > 0 else 0
  if k == 0 and config.top_p >= 1.0:
    return z
  if k > 0:
    desc = jax.lax.top_k(z, k)[0]  # [..., k] descending
    z = jnp.where(z >= desc[..., -1:], z, -jnp.inf)
  else:
    desc = -jnp.sort(-z, axis=-1)  # [..., V] descending
  if config.top_p < 1.0:
    p = jax.nn.softmax(desc, axis=-1)
    exclusive = jnp.cumsum(p, axis=-1) - p  # mass strictly above
    keep = exclusive < config.top_p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    z = jnp.where(z >= threshold, z, -jnp.inf)
  return z


def _token_logprob(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log softmax(logits ``[R, V]``)[tokens ``[R]``] -> ``[R]``."""
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def _inclusive_prefix_sum(x: jax.Array, method: str = "matmul") -> jax.Array:
  """Prefix sums along the last axis of a short ``[..., n]``: ``"matmul"`` as
  one matmul with the upper-triangular ones (XLA:CPU lowers ``cumsum`` to an
  O(n²) ``reduce_window``; full float32 precision on every backend),
  ``"cumsum"`` as ``jnp.cumsum``, ``"auto"`` matmul on XLA:CPU else cumsum."""
  if method == "auto":
    method = "matmul" if jax.default_backend() == "cpu" else "cumsum"
  if method == "cumsum":
    return jnp.cumsum(x, axis=-1)
  n = x.shape[-1]
  return jnp.matmul(x, jnp.triu(jnp.ones((n, n), x.dtype)), precision=jax.lax.Precision.HIGHEST)


def _inverse_cdf(p: jax.Array, u: jax.Array, prefix_sum: str = "matmul") -> jax.Array:
  """Index drawn from unnormalised probabilities ``p`` ``[R, V]`` (>= 0, each
  row with some p > 0) by inverse CDF with row uniforms ``u ~ U[0, 1)`` ``[R]``:
  the first id with p > 0 whose cumulative mass reaches (1 − u)·Σp.

  Two levels, never a length-V scan: the vocabulary is cut into ~√V blocks
  of ~√V ids; the block is found from the blocks' prefix masses, then the id
  from the prefix masses inside that block only. Only ids with p > 0 can be
  returned: a float rounding that leaves no hit (measure zero) falls back to
  the heaviest block / the block's last id with p > 0. ``prefix_sum``: see
  :func:`_inclusive_prefix_sum`.
  """
  rows, v = p.shape
  size = int(math.ceil(math.sqrt(v)))
  num = -(-v // size)
  blocks = jnp.pad(p, ((0, 0), (0, num * size - v))).reshape(rows, num, size)
  mass = jnp.sum(blocks, axis=-1)  # [R, nb]
  upto = _inclusive_prefix_sum(mass, prefix_sum)  # [R, nb]
  target = (1.0 - u.astype(jnp.float32))[:, None] * upto[:, -1:]
  hit = (upto >= target) & (mass > 0)
  block = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), jnp.argmax(mass, axis=-1))
  before = jnp.take_along_axis(upto - mass, block[:, None], axis=-1)  # [R, 1]
  inside = jnp.take_along_axis(blocks, block[:, None, None], axis=1)[:, 0]  # [R, size]
  hit = ((before + _inclusive_prefix_sum(inside, prefix_sum)) >= target) & (inside > 0)
  last = size - 1 - jnp.argmax((inside > 0)[:, ::-1], axis=-1)
  return (block * size + jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), last)).astype(
    jnp.int32
  )


def sample_token(logits: jax.Array, u: jax.Array, config: SamplingConfig):
  """One step: raw logits ``[R, V]`` and row uniforms ``u ~ U[0, 1)`` ``[R]``
  -> (tokens ``[R]`` int32, logprobs, logprobs_t1).

  ``logprobs`` is under the processed distribution (0 for greedy),
  ``logprobs_t1`` under softmax(raw logits) (both restricted to ids <
  ``config.vocab_size`` when it is set).

  Draws by inverse CDF (:func:`_inverse_cdf`): same distribution as
  ``jax.random.categorical`` (Gumbel-max), which needs V random draws and two
  logs per vocabulary entry at every decode step; zero-probability (filtered)
  ids can never be drawn.
  """
  logits = logits.astype(jnp.float32)
  if config.vocab_size and config.vocab_size < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) < config.vocab_size, logits, -jnp.inf)
  if config.greedy:
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return tok, jnp.zeros(tok.shape, jnp.float32), _token_logprob(logits, tok)
  z = process_logits(logits, config)
  top = jnp.max(z, axis=-1, keepdims=True)
  p = jnp.exp(z - top)  # unnormalised, 0 where filtered
  tok = _inverse_cdf(p, u, config.prefix_sum)
  lp = (
    jnp.take_along_axis(z, tok[:, None], axis=-1)[:, 0] - top[:, 0] - jnp.log(jnp.sum(p, axis=-1))
  )
  unprocessed = config.temperature == 1.0 and config.top_k == 0 and config.top_p >= 1.0
  return tok, lp, (lp if unprocessed else _token_logprob(logits, tok))


# ----------------------------------------------------------------------------
# Sampler.


def _check_inputs(model, prompt_ids, prompt_mask, config: SamplingConfig):
  if not isinstance(config, SamplingConfig):
    raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
  if prompt_ids.ndim != 2:
    raise ValueError(f"prompt_ids must be [B, P], got shape {tuple(prompt_ids.shape)}")
  if tuple(prompt_mask.shape) != tuple(prompt_ids.shape):
    raise ValueError(
      f"prompt_mask shape {tuple(prompt_mask.shape)} != prompt_ids shape {tuple(prompt_ids.shape)}"
    )
  if not jnp.issubdtype(prompt_ids.dtype, jnp.integer):
    raise ValueError(f"prompt_ids must be integers, got {prompt_ids.dtype}")
  if prompt_ids.shape[0] < 1 or prompt_ids.shape[1] < 1:
    raise ValueError(f"empty prompt batch {tuple(prompt_ids.shape)}")
  cfg = model.cfg
  p, n = prompt_ids.shape[1], config.max_new_tokens
  if p + n > cfg.max_position_embeddings:
    room = cfg.max_position_embeddings - n
    hint = (
      f"prompts may be at most {room} tokens" if room > 0 else "max_new_tokens alone is too large"
    )
    raise ValueError(
      f"prompt length {p} + max_new_tokens {n} = {p + n} exceeds the model's "
      f"max_position_embeddings {cfg.max_position_embeddings}; {hint}"
    )
  bad = [t for t in (config.pad_id,) + config.eos_ids if t >= cfg.vocab_size]
  if bad:
    raise ValueError(f"pad_id / eos_ids {bad} out of range for vocab_size {cfg.vocab_size}")
  if config.vocab_size > cfg.padded_vocab_size:
    raise ValueError(
      f"SamplingConfig.vocab_size {config.vocab_size} > the model's {cfg.padded_vocab_size} logits"
    )
  unreachable = [t for t in config.eos_ids if config.vocab_size and t >= config.vocab_size]
  if unreachable:
    raise ValueError(
      f"eos_ids {unreachable} can never be sampled with "
      f"SamplingConfig.vocab_size={config.vocab_size}"
    )


def sample(
  model: Any,
  prompt_ids: jax.Array,
  prompt_mask: jax.Array,
  rng: jax.Array | None,
  config: SamplingConfig,
  *,
  uniforms: jax.Array | None = None,
) -> SampleOutput:
  """Samples ``config.num_samples`` completions per left-padded prompt.

  Args:
    model: a :class:`~opd_jax.models.Transformer` (``init_cache`` / ``hidden`` /
      ``logits_from_hidden``), possibly merged from (graphdef, state) under jit.
    prompt_ids: ``[B, P]`` int, left-padded.
    prompt_mask: ``[B, P]``, 1 on real prompt tokens.
    rng: PRNG key; token ``i`` of row ``r`` uses ``uniform(rng, [N, R])[i, r]``.
    config: static :class:`SamplingConfig`.
    uniforms: optional ``[N, R]`` float32 in [0, 1) used instead of drawing
      from ``rng`` (which is then ignored, may be None): a caller that samples
      a batch in groups passes each group its columns of one up-front draw, so
      the samples do not depend on the grouping.

  Returns:
    :class:`SampleOutput` with ``R = B * num_samples`` rows.
  """
  _check_inputs(model, prompt_ids, prompt_mask, config)
  if isinstance(model, nnx.Module):  # no gradient flows into the sampler
    graphdef, state = nnx.split(model)
    model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
  sh: Sharder = getattr(model, "sharder", None) or Sharder()
  n_new, reps = config.max_new_tokens, config.num_samples
  eos = jnp.asarray(config.eos_ids or (-1,), jnp.int32)
  pad = jnp.int32(config.pad_id)

  ids = jnp.repeat(prompt_ids.astype(jnp.int32), reps, axis=0)
  pmask = jnp.repeat(prompt_mask.astype(jnp.int32), reps, axis=0)
  ids = sh.constrain(ids, (_BATCH, None))
  pmask = sh.constrain(pmask, (_BATCH, None))
  rows, p = ids.shape
  prompt_len = sh.constrain(jnp.sum(pmask, axis=-1), (_BATCH,))  # [R]

  def is_eos(tok):
    if not config.eos_ids:
      return jnp.zeros(tok.shape, jnp.bool_)
    return jnp.any(tok[:, None] == eos[None, :], axis=-1)

  # Prefill: the whole prompt in one call; only the last slot's hidden state is
  # kept (left padding puts every row's last real token there). The cache
  # holds the first phase's slots (all P + N unless the model decodes in
  # phases: Transformer.cache_lengths).
  phases = model.cache_lengths(p, n_new)
  cache = model.init_cache(rows, phases[0])
  h, cache = model.hidden(ids, pmask.astype(jnp.bool_), positions_from_mask(pmask), cache)
  h = sh.constrain(h[:, -1], (_BATCH, "activation_embed"))  # [R, D]

  def buf(dtype, fill):
    return sh.constrain(jnp.full((rows, n_new), fill, dtype), (_BATCH, None))

  if uniforms is None:
    if rng is None:
      raise ValueError("sample needs rng or uniforms")
    uniforms = jax.random.uniform(rng, (n_new, rows), jnp.float32)
  elif tuple(uniforms.shape) != (n_new, rows):
    raise ValueError(
      f"uniforms must be [max_new_tokens, rows] = {(n_new, rows)}, got {tuple(uniforms.shape)}"
    )
  uniforms = sh.constrain(uniforms.astype(jnp.float32), (None, _BATCH))

  def emit(step, h, done, lengths, tokens, logprobs, logprobs_t1):
    """Samples token ``step`` from the hidden state ``h`` that predicts it and
    records it (pad, logprob 0 for rows already done)."""
    logits = sh.constrain(model.logits_from_hidden(h), (_BATCH, "activation_vocab"))
    tok, lp, lp1 = sample_token(logits, uniforms[step], config)
    live = ~done
    tok = sh.constrain(jnp.where(live, tok, pad), (_BATCH,))
    col = lambda buf, x: sh.constrain(
      jax.lax.dynamic_update_slice(buf, x[:, None], (0, step)), (_BATCH, None)
    )
    return (
      tok,
      done | is_eos(tok),
      lengths + live.astype(jnp.int32),
      col(tokens, tok),
      col(logprobs, jnp.where(live, lp, 0.0)),
      col(logprobs_t1, jnp.where(live, lp1, 0.0)),
    )

  # Token 0 comes from the prefill; every loop iteration first runs the
  # previous token through the cache (slot P + step - 1, position
  # L + step - 1), then samples token `step` — no decode is wasted after the
  # last token, and the body has no conditional.
  done = sh.constrain(jnp.zeros((rows,), jnp.bool_), (_BATCH,))
  lengths = sh.constrain(jnp.zeros((rows,), jnp.int32), (_BATCH,))
  tok, *rest = emit(
    jnp.int32(0),
    h,
    done,
    lengths,
    buf(jnp.int32, config.pad_id),
    buf(jnp.float32, 0.0),
    buf(jnp.float32, 0.0),
  )
  state = (jnp.int32(1), cache, tok, *rest)

  def cond(last, state):
    step, _, _, done = state[:4]
    finished = jnp.all(done)
    if config.loop_axis_name:  # every vmapped point done
      finished = jax.lax.pmin(finished.astype(jnp.int32), config.loop_axis_name) > 0
    return (step < last) & ~finished

  def body(state):
    step, cache, tok, *rest = state
    pos = (prompt_len + step - 1)[:, None]
    h, cache = model.hidden(tok[:, None], jnp.ones((rows, 1), jnp.bool_), pos, cache)
    h = sh.constrain(h[:, 0], (_BATCH, "activation_embed"))
    return (step + 1, cache, *emit(step, h, *rest))

  # One decode loop per cache phase: step `step` writes slot P + step - 1, so
  # a phase of S slots runs the steps < S - P + 1 (the last phase: all N).
  for i, slots in enumerate(phases):
    if i:
      state = (state[0], model.grow_cache(state[1], slots), *state[2:])
    state = jax.lax.while_loop(functools.partial(cond, min(n_new, slots - p + 1)), body, state)
  steps, _, _, done, lengths, tokens, logprobs, logprobs_t1 = state
  mask = (jnp.arange(n_new)[None, :] < lengths[:, None]).astype(jnp.int32)
  return SampleOutput(
    tokens=tokens,
    logprobs=logprobs,
    logprobs_t1=logprobs_t1,
    mask=sh.constrain(mask, (_BATCH, None)),
    lengths=lengths,
    truncated=~done,
    prompt_ids=ids,
    prompt_mask=pmask,
    steps=steps,
  )


def full_sequence(prompt_ids, prompt_mask, tokens, mask):
  """Prompt ``[R, P]`` + completion ``[R, N]`` -> (ids int32, mask bool,
  positions int32), each ``[R, P+N]``, for teacher scoring / student
  re-scoring.

  Left pads and post-EOS pads have mask 0 and position 0; completion token
  ``i`` has position ``L + i`` (L = the row's prompt length), as in the
  sampler. Logits at column ``P - 1 + i`` predict completion token ``i``.
  """
  ids = jnp.concatenate([prompt_ids, tokens], axis=1).astype(jnp.int32)
  m = jnp.concatenate([prompt_mask.astype(jnp.bool_), mask.astype(jnp.bool_)], axis=1)
  return ids, m, positions_from_mask(m)


def concat_prompt_completion(out: SampleOutput):
  """:func:`full_sequence` of a :class:`SampleOutput`."""
  return full_sequence(out.prompt_ids, out.prompt_mask, out.tokens, out.mask)
