"""The compiled OPD step: sample, score, per-token divergence, update.

One XLA program per step (no host round trip):

1. the student samples ``num_samples`` completions per prompt (KV cache,
   ``lax.while_loop``; no gradient) for a fraction λ of the rows; the other
   rows take off-policy completions (dataset, or teacher samples = sequence-
   level KD) — GKD's on/off-policy mix, per sample (Agarwal et al. 2024);
2. the teacher scores prompt + completion (stop-gradient);
3. the student recomputes its hidden states with gradient; logits and the
   per-token divergence are formed chunk by chunk over the sequence in a
   ``lax.scan`` whose custom VJP forms the gradient in the same pass, so no
   ``[B, T, V]`` array of either model is ever live and no head is recomputed;
   token-level alignment metrics ride along in the same chunks; a loss that
   reads each row's sequence-mean log-probs (DistiLLM-2's adaptive α) gets a
   forward-only pre-pass over the same chunks first;
4. an optax update is applied to the student only.

With ``micro_batches`` = M > 1, steps 1-3 run in a ``lax.scan`` over M equal
groups of rows (one group's KV caches and activations live at a time);
gradients accumulate in float32, the loss normaliser (token / sequence
count) is applied once at the end, and one update follows. Every row's
on/off-policy role and sampler uniforms are drawn up front for all rows, so
the step's result does not depend on M (up to float summation order).

Multi-teacher OPD (``cfg.teachers`` = ((name, q_k), ...), ``opd_jax.teachers``):
the batch holds teacher k's q_k prompts contiguously, in order; the step
slices those static row ranges, plans each one on its own (λ split, M groups,
sampler key ``fold_in(key, k)``), and teacher k scores (and, off-policy,
samples) only its rows; micro-batch g holds group g of every teacher. The
loss, gradient and metrics are sums over the teachers' rows, also logged per
teacher (``teacher/<name>/<metric>``).

Shapes: R = B·n rows, P prompt length, N completion length, C loss chunk,
V common vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from opd_jax import losses as losses_lib
from opd_jax import metrics as metrics_lib
from opd_jax import optim
from opd_jax import schedules as schedules_lib
from opd_jax.models.config import ModelConfig
from opd_jax.models.transformer import NEG_INF
from opd_jax.sampling import SamplingConfig, full_sequence, sample
from opd_jax.sharding import Sharder

OFF_POLICY_SOURCES = ("dataset", "teacher")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the teacher is not in here)."""

  step: jax.Array  # int32 scalar
  params: Any  # nnx.State of the student's parameters
  opt_state: Any  # optax state (student only)
  rng: jax.Array  # PRNG key


@dataclasses.dataclass(frozen=True)
class OPDConfig:
  """Static settings of the compiled step (hashable)."""

  sampling: SamplingConfig
  loss: str = "reverse_kl"
  loss_kwargs: tuple[tuple[str, Any], ...] = ()
  aggregation: str = "token_mean"
  normalizer: float | None = None
  on_policy_fraction: float = 1.0  # GKD λ
  off_policy_source: str = "dataset"  # or "teacher"
  teacher_sampling: SamplingConfig | None = None
  loss_chunk: int = 64  # 0: auto, from loss_chunk_budget_mib
  loss_chunk_budget_mib: float = 1024.0
  metrics: bool = True
  metrics_top_k: int = 16
  position_chunk: int = 64
  micro_batches: int = 1  # M row groups per step, one update
  # ((target, schedules.Schedule), ...) or the config string "loss.beta=linear:...;...":
  # values computed in the step from its counter (traced), see check_schedules.
  schedules: tuple[tuple[str, Any], ...] = ()
  # Outcome losses (opd_grpo): verifier(tokens [R, N], mask [R, N], answer_ids
  # [R, A]) -> reward [R] f32, run in the step (opd_jax.tasks.verify); the batch
  # then carries answer_ids [B, A] (-1 padded).
  verifier: Any = None
  # Multi-teacher OPD: ((name, prompts per step), ...) in batch order; the batch
  # holds each teacher's prompts contiguously (see teacher_segments). (): one teacher.
  teachers: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    if isinstance(self.loss_kwargs, Mapping):
      object.__setattr__(self, "loss_kwargs", tuple(sorted(self.loss_kwargs.items())))
    if isinstance(self.schedules, str):
      object.__setattr__(self, "schedules", schedules_lib.parse_all(self.schedules))
    if not 0.0 <= self.on_policy_fraction <= 1.0:
      raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
    if self.off_policy_source not in OFF_POLICY_SOURCES:
      raise ValueError(
        f"unknown off_policy_source {self.off_policy_source!r}; valid: {OFF_POLICY_SOURCES}"
      )
    if self.loss_chunk < 0:
      raise ValueError(f"loss_chunk must be >= 0 (0: auto), got {self.loss_chunk}")
    if not self.loss_chunk_budget_mib > 0:
      raise ValueError(f"loss_chunk_budget_mib must be positive, got {self.loss_chunk_budget_mib}")
    m = self.micro_batches
    if isinstance(m, bool) or int(m) != m or m < 1:
      raise ValueError(f"micro_batches must be an int >= 1, got {m!r}")
    object.__setattr__(self, "micro_batches", int(m))
    losses_lib.get_loss(self.loss, dict(self.loss_kwargs))  # fail fast, clear error
    check_schedules(self)
    check_outcome(self, require_verifier=False)  # the verifier: at make_opd_step
    object.__setattr__(self, "teachers", tuple((str(k), int(q)) for k, q in self.teachers))
    names = [k for k, _ in self.teachers]
    if len(set(names)) != len(names) or any(q < 1 for _, q in self.teachers):
      raise ValueError(f"teachers must have distinct names and >= 1 prompt each: {self.teachers}")
    if self.teachers and losses_lib.needs_outcome(self.loss):
      raise ValueError(f"loss {self.loss!r} (an outcome loss) does not support multi-teacher OPD")


SCHEDULE_TARGETS = (
  "loss.<numeric loss keyword>",
  "on_policy_fraction",
  "data.mixture.<source> (data, host side)",
  "sampling.temperature",
  "teacher_sampling.temperature",
)
TEMPERATURE_TARGETS = {
  "sampling.temperature": "sampling",
  "teacher_sampling.temperature": "teacher_sampling",
}


class _Tempered:
  """A model whose logits are divided by τ_t/τ (τ_t traced, τ the sampling
  config's temperature), so the sampler, dividing by τ, samples at τ_t; all
  else is the model's. The step's completions read tokens and masks only
  (``logprobs_t1`` of such a sample is at τ_t, not 1)."""

  def __init__(self, model, temperature, base: float):
    graphdef, state = nnx.split(model)
    self._model = nnx.merge(graphdef, jax.lax.stop_gradient(state))
    self._ratio = jnp.asarray(temperature, jnp.float32) / jnp.float32(base)

  def __getattr__(self, name):
    return getattr(self._model, name)

  def logits_from_hidden(self, h):
    return self._model.logits_from_hidden(h) / self._ratio


def _tempered(model, cfg: OPDConfig, target: str, hparams):
  """``model`` sampling at the scheduled temperature ``target`` if any."""
  if model is None or target not in (hparams or {}):
    return model
  base = getattr(cfg, TEMPERATURE_TARGETS[target]) or cfg.sampling
  return _Tempered(model, hparams[target], base.temperature)


def lambda_scheduled(cfg: OPDConfig) -> bool:
  """Whether λ follows a schedule: then every row is sampled by the student
  AND given its off-policy completion, and a traced per-row mask picks one
  (``round(λ_t·R)`` rows on-policy; ``cfg.on_policy_fraction`` is unused)."""
  return any(t == "on_policy_fraction" for t, _ in cfg.schedules)


def check_schedules(cfg: OPDConfig) -> None:
  """Raises ValueError unless every scheduled target can be a traced scalar:
  ``loss.<kw>`` with ``kw`` a keyword of the loss whose value is a number
  (not a string / bool / None) and that the loss accepts as a traced value
  (checked by tracing it once abstractly; e.g. JSD's β, special-cased at the
  endpoints in Python, and top-k's k, a shape, are static)."""
  traced = {}
  for target, sched in cfg.schedules:
    if not isinstance(sched, schedules_lib.Schedule):
      raise ValueError(f"schedules: {target!r} is not a Schedule: {sched!r}")
    if target in TEMPERATURE_TARGETS:
      base = getattr(cfg, TEMPERATURE_TARGETS[target]) or cfg.sampling
      if base.greedy or not all(v > 0 for v in sched.values):
        raise ValueError(
          f"schedules: {target} needs values > 0 and sampling (not greedy), got {sched.values}"
        )
      continue
    if target == "on_policy_fraction":
      if not all(0.0 <= v <= 1.0 for v in sched.values):
        raise ValueError(
          f"schedules: on_policy_fraction values must lie in [0, 1], got {sched.values}"
        )
      continue
    kind, _, name = target.partition(".")
    if kind != "loss" or not name:
      raise ValueError(f"schedules: unknown target {target!r}; valid: {list(SCHEDULE_TARGETS)}")
    valid = losses_lib.LOSSES.valid_kwargs(cfg.loss, exclude=losses_lib.ROW_INPUTS)
    if name not in valid:
      raise ValueError(
        f"schedules: {target!r}: loss {cfg.loss!r} has no keyword {name!r}; valid: {valid}"
      )
    current = {**losses_lib.LOSSES.keyword_defaults(cfg.loss), **dict(cfg.loss_kwargs)}[name]
    if isinstance(current, bool) or not isinstance(current, (int, float)):
      raise ValueError(
        f"schedules: {target!r}: loss keyword {name!r} is not numeric "
        f"(value {current!r}); only numbers can follow a schedule"
      )
    traced[name] = jax.ShapeDtypeStruct((), jnp.float32)
  if not traced:
    return
  loss_fn = losses_lib.get_loss(cfg.loss, dict(cfg.loss_kwargs))
  logits = jax.ShapeDtypeStruct((1, 1, 2), jnp.float32)
  rows = losses_lib.row_inputs(
    cfg.loss, jax.ShapeDtypeStruct((1, 1), jnp.bool_), loss_kwargs=dict(cfg.loss_kwargs)
  )
  try:
    jax.eval_shape(
      lambda s, hp, r: losses_lib.logits_value_and_grad(loss_fn)(
        s, s, jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1)), **hp, **r
      ),
      logits,
      traced,
      rows,
    )
  except (jax.errors.JAXTypeError, TypeError, ValueError) as e:
    raise ValueError(
      f"schedules: loss {cfg.loss!r} uses {sorted(traced)} as static values "
      f"(Python control flow or shapes), so they cannot follow a schedule "
      f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    ) from None


def check_outcome(cfg: OPDConfig, require_verifier: bool = True) -> None:
  """An outcome loss (``losses.needs_outcome``) needs ``cfg.verifier`` (made
  once the tokenizer is known: ``require_verifier=False`` before) and student
  samples only (λ = 1, not scheduled: GRPO groups are a prompt's
  ``num_samples`` on-policy completions); ValueError naming the setting."""
  if not losses_lib.needs_outcome(cfg.loss):
    return
  if require_verifier and (cfg.verifier is None or not callable(cfg.verifier)):
    raise ValueError(
      f"loss {cfg.loss!r} needs a verifier (OPDConfig.verifier, e.g. "
      "opd_jax.tasks.verify.make_verifier(task, tokenizer))"
    )
  if cfg.on_policy_fraction != 1.0 or lambda_scheduled(cfg):
    raise ValueError(
      f"loss {cfg.loss!r} needs on_policy_fraction=1 (got {cfg.on_policy_fraction}"
      f"{', scheduled' if lambda_scheduled(cfg) else ''}): its GRPO groups are student samples"
    )


def outcome_stats(cfg: OPDConfig, reward, group, mask, hparams=None) -> dict[str, jax.Array]:
  """Additive sums for the outcome metrics of one group of rows: reward [G],
  group [G] (prompt of each row), mask [G, N] (completion tokens)."""
  kw = {**losses_lib.LOSSES.keyword_defaults(cfg.loss), **dict(cfg.loss_kwargs)}
  alpha = (hparams or {}).get("loss.alpha", kw["alpha"])
  adv, zero = losses_lib.grpo_advantages(
    reward, group, eps=kw["eps"], norm_by_std=kw["norm_by_std"]
  )
  inv = 1.0 / jnp.sum((group[:, None] == group[None, :]).astype(jnp.float32), axis=1)
  part = alpha * adv[:, None] * mask.astype(jnp.float32)
  return dict(
    outcome_reward=jnp.sum(reward),
    outcome_groups=jnp.sum(inv),
    outcome_zero_var_groups=jnp.sum(jnp.where(zero, inv, 0.0)),
    outcome_adv=jnp.sum(part),
    outcome_adv_abs=jnp.sum(jnp.abs(part)),
  )


def common_vocab_size(
  student: ModelConfig, teacher: ModelConfig, tokenizer_size: int | None = None
) -> int:
  """Vocabulary the divergence is taken over.

  Checkpoints pad their embedding rows differently (Qwen2.5-1.5B: 151,936,
  -7B: 152,064, one tokenizer of 151,665); rows past the tokenizer are never
  sampled. With ``tokenizer_size`` the common vocabulary is the tokenizer's;
  without it both checkpoints must agree. Raises before anything compiles.
  """
  if tokenizer_size is not None:
    small = min(student.vocab_size, teacher.vocab_size)
    if tokenizer_size > small:
      raise ValueError(
        f"vocab mismatch: tokenizer has {tokenizer_size} tokens but the "
        f"student has {student.vocab_size} and the teacher {teacher.vocab_size} "
        "embedding rows"
      )
    return int(tokenizer_size)
  if student.vocab_size != teacher.vocab_size:
    raise ValueError(
      f"vocab mismatch: student vocab_size={student.vocab_size}, teacher "
      f"vocab_size={teacher.vocab_size}; if they share a tokenizer, pass its "
      "size (tokenizer_size=len(tokenizer)) so the padded rows can be ignored"
    )
  return int(student.vocab_size)


def split_rows(num_rows: int, fraction: float) -> int:
  """Number of on-policy rows: round(λ·R), the rest off-policy."""
  return int(round(fraction * num_rows))


def _project(h: jax.Array, w: jax.Array, vocab: int) -> jax.Array:
  """Hidden ``[..., D]`` x unembedding ``[D, V']`` -> float32 logits over the
  first ``V' `` rows with rows >= ``vocab`` masked to -1e30."""
  logits = jnp.einsum("...d,dv->...v", h, w, preferred_element_type=jnp.float32)
  if w.shape[-1] > vocab:
    logits = jnp.where(jnp.arange(w.shape[-1]) < vocab, logits, NEG_INF)
  return logits


def _to_chunks(x: jax.Array, chunk: int) -> jax.Array:
  """``[R, N, ...]`` (N a multiple of chunk) -> ``[N/chunk, R, chunk, ...]``."""
  r, n = x.shape[:2]
  x = x.reshape((r, n // chunk, chunk) + x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _pad_time(x: jax.Array, n: int) -> jax.Array:
  pad = n - x.shape[1]
  if pad == 0:
    return x
  return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


LOGIT_AXES = ("activation_batch", "activation_length", "activation_vocab")


def _top_k_2d(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k`` over the last axis of a ``[rows, V]`` view (on an N-d
  operand XLA:CPU first copies the whole array)."""
  vals, ids = jax.lax.top_k(x.reshape(-1, x.shape[-1]), k)
  return vals.reshape(x.shape[:-1] + (k,)), ids.reshape(x.shape[:-1] + (k,))


def sharded_top_k(sharder: Sharder, x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """``jax.lax.top_k`` of ``[R, C, V]`` chunk logits laid out as ``LOGIT_AXES``.

  XLA's SPMD partitioner replicates a TopK whose batch dimensions are sharded
  (it all-gathers the whole ``[R, C, V]`` operand onto every device), so under
  a mesh the top-k runs in ``shard_map``: per device over its rows and its
  vocabulary slice, then, when the vocabulary is split, over the gathered
  ``t·k`` candidates (global ids; ties still go to the lowest id, since the
  slices are concatenated in id order). Returns values and int32 ids
  ``[R, C, k]``, rows sharded like ``x``.
  """
  if sharder.mesh is None:
    return _top_k_2d(x, k)
  spec = sharder.spec(LOGIT_AXES, x.shape)
  rows, _, vocab_axes = spec
  vocab_axes = (
    ()
    if vocab_axes is None
    else ((vocab_axes,) if isinstance(vocab_axes, str) else tuple(vocab_axes))
  )
  v_local = x.shape[-1] // math.prod(sharder.mesh.shape[a] for a in vocab_axes)

  def local(xl):
    vals, ids = _top_k_2d(xl, min(k, v_local))
    if not vocab_axes:
      return vals, ids
    ids = ids + jax.lax.axis_index(vocab_axes) * v_local
    vals = jax.lax.all_gather(vals, vocab_axes, axis=-1, tiled=True)
    ids = jax.lax.all_gather(ids, vocab_axes, axis=-1, tiled=True)
    vals, pick = jax.lax.top_k(vals, k)
    return vals, jnp.take_along_axis(ids, pick, axis=-1)

  out = jax.sharding.PartitionSpec(rows, None, None)
  # Replicated over the vocabulary axes by construction (all-gathered, then
  # the same top-k everywhere); the static check cannot see it when unsplit.
  return jax.shard_map(
    local, mesh=sharder.mesh, in_specs=spec, out_specs=(out, out), check_vma=False
  )(x)


WEIGHT_AXES = ("embed", "vocab")


def _position_chunks(r, n, vocab, chunk, sharder, budget_mib, metrics):
  """``(n_pad, to_chunks)`` for a scan over the N positions of R rows in
  chunks of at most ``chunk`` (0: :func:`auto_loss_chunk`): ceil(N / C) chunks
  of equal length <= C, so padding stays < one per chunk (N=64, C=256 -> one
  chunk of 64, not 256; N=100, C=64 -> 2 x 50); ``to_chunks`` pads ``[R, N,
  ...]`` to n_pad and reshapes it to ``[K, R, C, ...]``, rows sharded."""
  if chunk == 0:
    chunk = auto_loss_chunk(r, n, vocab, sharder, budget_mib=budget_mib, metrics=metrics)
  num_chunks = max(1, math.ceil(n / chunk))
  chunk = math.ceil(n / num_chunks)
  n_pad = num_chunks * chunk
  chunk_axes = lambda a: (None, "activation_batch") + (None,) * (a.ndim - 2)
  to_chunks = lambda a: sharder.constrain(
    _to_chunks(_pad_time(a, n_pad), chunk), chunk_axes(a) + (None,)
  )
  return n_pad, to_chunks


def _gather_unembedding(w: jax.Array, sharder: Sharder) -> jax.Array:
  """``[D, V]`` unembedding on its parameter sharding -> D gathered (vocab
  stays on ``vocab``), once before the scan rather than per use in the body."""
  return sharder.constrain(sharder.constrain(w, WEIGHT_AXES), (None, "vocab"))


# Float32 [R_dev, C, V_dev] arrays live at once at the peak of one loss chunk
# (logits of both models, p, the logit gradient and the reduction inputs that
# XLA:CPU materialises), measured with compiled.memory_analysis() of the whole
# step at vocabulary 151,936 (tests/test_opd_step.py::test_loss_chunk_memory_*):
# 5.2-6.6 with the token metrics, 3.2-3.6 without (1 device / data=8).
LIVE_VOCAB_ARRAYS = {True: 7, False: 4}


def auto_loss_chunk(
  rows: int, length: int, vocab: int, sharder: Sharder, *, budget_mib: float, metrics: bool
) -> int:
  """Largest loss chunk C whose estimated per-device working set fits.

  estimate(C) = R_dev · C · V_dev · 4 bytes · LIVE_VOCAB_ARRAYS[metrics], with
  R_dev = rows per device (rows over the batch axes) and V_dev = the vocabulary
  per device (over ``activation_vocab``), as the chunk logits are laid out.
  Returns C in [1, length] (1 when even one token per row does not fit).
  """
  r_dev, v_dev = rows, vocab
  if sharder.mesh is not None:
    spec = sharder.spec(LOGIT_AXES, (rows, 1, vocab))
    per = lambda a: (
      1
      if a is None
      else math.prod(sharder.mesh.shape[x] for x in ((a,) if isinstance(a, str) else a))
    )
    r_dev, v_dev = math.ceil(rows / per(spec[0])), math.ceil(vocab / per(spec[2]))
  per_token = r_dev * v_dev * 4 * LIVE_VOCAB_ARRAYS[bool(metrics)]
  return int(max(1, min(length, budget_mib * 2**20 // per_token)))


def chunked_divergence(
  h_s,
  w_s,
  h_t,
  w_t,
  tokens,
  weights,
  metric_mask,
  *,
  loss_fn,
  vocab: int,
  chunk: int,
  metrics: bool,
  top_k: int,
  position_chunk: int,
  sharder: Sharder,
  chunk_budget_mib: float = 1024.0,
  loss_inputs=None,
  loss_hparams=None,
  sequence_logps=None,
):
  """Σ_t weights·loss_t over a sequence, in chunks, plus metric sums.

  h_s ``[R, N, Ds]`` (differentiable), h_t ``[R, N, Dt]`` (teacher, constant),
  w_s ``[Ds, Vs]``, w_t ``[Dt, Vt]``, tokens/weights/metric_mask ``[R, N]``.
  Only one chunk's ``[R, C, V]`` logits exist at a time, so peak memory
  scales with C, not N. The gradient is formed in the same pass (custom VJP):
  per chunk, ∂loss/∂logits (closed form for reverse KL and top-k OPD, see
  :func:`losses.logits_value_and_grad`) is pulled back through the projection
  to ∂/∂h_s (kept, ``[R, N, Ds]``) and ∂/∂w_s (accumulated in float32,
  ``[Ds, V]``, sharded like the unembedding); the backward pass only scales
  them by the incoming cotangent, so no logits of either model are
  recomputed. Token metrics reuse the chunk's logits and normalisers.

  Sharding: chunk logits, their gradient and every per-token array keep rows
  on the batch axes and the vocabulary on ``activation_vocab``; both
  unembeddings are gathered once, before the scan (not per use in the body);
  top-k runs per device (:func:`sharded_top_k`).

  ``chunk=0`` picks C with :func:`auto_loss_chunk` from ``chunk_budget_mib``.
  ``loss_inputs``: optional dict of ``[R, N]`` per-position arrays (e.g. the
  row role ``on_policy``, :func:`losses.row_inputs`), chunked like the tokens
  and passed to the loss as keywords. ``loss_hparams``: optional dict of
  scalar (traced) loss keywords, e.g. scheduled values, overriding the bound
  ones. ``sequence_logps``: optional (mask ``[R, N]``, τ_s, τ_t) for a loss
  that reads each row's sequence-mean log-probs
  (:func:`losses.needs_sequence_logps`): a forward-only pre-pass scan over
  the same chunks and gathered unembeddings (:func:`sequence_log_probs`)
  computes them first; the loss gets ``seq_logp`` / ``seq_logq``, and they
  come back as a third output {"seq_logp", "seq_logq"} of ``[R]`` arrays.
  """
  r, n = tokens.shape
  extra_names = tuple(sorted(loss_inputs or {}))
  vmin = min(w_s.shape[-1], w_t.shape[-1]) if h_t is not None else w_s.shape[-1]
  n_pad, to_chunks = _position_chunks(r, n, vmin, chunk, sharder, chunk_budget_mib, metrics)
  has_teacher = h_t is not None
  if metrics and not has_teacher:
    raise ValueError("token metrics need a teacher")
  if sequence_logps is not None and not has_teacher:
    raise ValueError("sequence log-probs (sequence_logps) need a teacher")
  weight_axes = WEIGHT_AXES
  if has_teacher:
    w_t = _gather_unembedding(jax.lax.stop_gradient(w_t[:, :vmin]), sharder)
  else:
    h_t = jnp.zeros(h_s.shape[:2] + (0,), h_s.dtype)  # placeholder, unused
  top_k_fn = lambda x, k: sharded_top_k(sharder, x, k)
  value_and_grad = losses_lib.logits_value_and_grad(loss_fn, top_k_fn)
  positions = jnp.broadcast_to(jnp.arange(n_pad, dtype=jnp.int32), (r, n_pad))
  consts = tuple(
    to_chunks(a)
    for a in (jax.lax.stop_gradient(h_t), tokens, weights, metric_mask, positions)
    + tuple(jax.lax.stop_gradient(loss_inputs[k]) for k in extra_names)
  )
  num_pos_chunks = max(1, int(math.ceil(n / position_chunk)))
  sums0 = {}
  if metrics:
    shapes = jax.eval_shape(
      lambda: metrics_lib.accumulate(
        metrics_lib.token_metrics(
          jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)), jnp.zeros((1, 1), jnp.int32), k=top_k
        ),
        jnp.ones((1, 1)),
        jnp.zeros((1, 1), jnp.int32),
        chunk_len=position_chunk,
        num_chunks=num_pos_chunks,
      )
    )
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def run(h_s, w_s, with_grad: bool):
    ws = _gather_unembedding(w_s[:, :vmin], sharder)
    hs_chunks = to_chunks(h_s)
    names, seq, xs = extra_names, {}, consts
    if sequence_logps is not None:  # rows' sequence means first, same chunks and weights
      m = sequence_logps[0].astype(jnp.float32)
      sp, sq = _sequence_scan(
        (hs_chunks, consts[0], consts[1], to_chunks(m)),
        ws,
        w_t,
        vocab=vocab,
        sharder=sharder,
        ts=sequence_logps[1],
        tt=sequence_logps[2],
      )
      count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
      seq = dict(seq_logp=sp / count, seq_logq=sq / count)
      per_row = lambda v: to_chunks(jnp.broadcast_to(v[:, None], (r, n)))
      names = extra_names + tuple(seq)
      xs = consts + tuple(per_row(v) for v in seq.values())

    def body(carry, x):
      total, sums, dw_acc = carry
      hs, ht, y, w, mm, pos = x[:6]
      extra = dict(zip(names, x[6:]), **(loss_hparams or {}))
      ls = sharder.constrain(_project(hs, ws, vocab), LOGIT_AXES)
      lt = sharder.constrain(_project(ht, w_t, vocab), LOGIT_AXES) if has_teacher else None
      dhs = None
      if with_grad:
        per_tok, dls = value_and_grad(ls, lt, y, w, **extra)
        if vmin > vocab:  # masked (padded) columns get no gradient
          dls = jnp.where(jnp.arange(vmin) < vocab, dls, 0.0)
        dls = sharder.constrain(dls.astype(hs.dtype), LOGIT_AXES)
        # 2-D matmuls over the chunk's R·C tokens (the N-d einsum's layout
        # makes XLA:CPU copy the [R, C, V] gradient once more).
        dls2, hs2 = dls.reshape(-1, vmin), hs.reshape(-1, hs.shape[-1])
        dhs = jax.lax.dot_general(
          dls2, ws, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
        )
        dhs = sharder.constrain(
          dhs.astype(hs.dtype).reshape(hs.shape), ("activation_batch", None, None)
        )
        dws = jax.lax.dot_general(
          hs2, dls2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        dw_acc = sharder.constrain(dw_acc + dws, weight_axes)
      else:
        per_tok = loss_fn(ls, lt, y, **extra)
      value = jnp.sum(w * per_tok)
      if metrics:
        per_tok = metrics_lib.token_metrics(ls, lt, y, k=top_k, top_k_fn=top_k_fn)
        sums = metrics_lib.merge_sums(
          sums,
          metrics_lib.accumulate(
            per_tok, mm, pos, chunk_len=position_chunk, num_chunks=num_pos_chunks
          ),
        )
      return (total + value, sums, dw_acc), dhs

    dw0 = (
      sharder.constrain(jnp.zeros((w_s.shape[0], vmin), jnp.float32), weight_axes)
      if with_grad
      else jnp.zeros((), jnp.float32)
    )
    (total, sums, dw), dhs = jax.lax.scan(
      body, (jnp.zeros((), jnp.float32), sums0, dw0), (hs_chunks,) + xs
    )
    if not with_grad:
      return total, sums, seq
    dhs = sharder.constrain(dhs, (None, "activation_batch", None, None))
    dh = jnp.moveaxis(dhs, 0, 1).reshape((r, n_pad) + h_s.shape[2:])[:, :n]
    dw = jnp.pad(dw, [(0, 0), (0, w_s.shape[-1] - vmin)]) if w_s.shape[-1] > vmin else dw
    return total, sums, seq, dh, sharder.constrain(dw.astype(w_s.dtype), weight_axes)

  @jax.custom_vjp
  def divergence(h_s, w_s):
    return run(h_s, w_s, with_grad=False)

  def divergence_fwd(h_s, w_s):
    total, sums, seq, dh, dw = run(h_s, w_s, with_grad=True)
    return (total, sums, seq), (dh, dw)

  def divergence_bwd(residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw)

  divergence.defvjp(divergence_fwd, divergence_bwd)
  total, sums, seq = divergence(h_s, w_s)
  return (total, sums) if sequence_logps is None else (total, sums, seq)


def _sequence_scan(xs, ws, wt, *, vocab: int, sharder: Sharder, ts, tt):
  """Σ_t m·log p(y_t), Σ_t m·log q(y_t) per row ([R] each) over position
  chunks ``xs`` = (h_s, h_t, tokens, mask) chunked ``[K, R, C, ...]``, with the
  gathered unembeddings ``ws`` / ``wt``; forward only."""

  def body(carry, x):
    hs, ht, y, mm = x
    ls = sharder.constrain(_project(hs, ws, vocab), LOGIT_AXES)
    lt = sharder.constrain(_project(ht, wt, vocab), LOGIT_AXES)
    lp = losses_lib.token_log_probs(ls, y, ts)
    lq = losses_lib.token_log_probs(lt, y, tt)
    return (carry[0] + jnp.sum(mm * lp, axis=1), carry[1] + jnp.sum(mm * lq, axis=1)), None

  zeros = jnp.zeros((xs[2].shape[1],), jnp.float32)
  sg = jax.lax.stop_gradient
  (sp, sq), _ = jax.lax.scan(body, (zeros, zeros), tuple(sg(x) for x in xs))
  return sg(sp), sg(sq)


def sequence_log_probs(
  h_s,
  w_s,
  h_t,
  w_t,
  tokens,
  mask,
  *,
  vocab: int,
  chunk: int,
  sharder: Sharder,
  student_temperature=1.0,
  teacher_temperature=1.0,
  chunk_budget_mib: float = 1024.0,
):
  """Each row's mean log p(y_t) and log q(y_t) over its response tokens:
  (``[R]``, ``[R]``) = Σ_t m·log p(y_t) / max(Σ_t m, 1), at the given
  temperatures, forward only (stop-gradient). h_s ``[R, N, Ds]``, h_t
  ``[R, N, Dt]``, w ``[D, V']``, tokens / mask ``[R, N]``. A ``lax.scan`` over
  position chunks as in :func:`chunked_divergence` (one chunk's ``[R, C, V]``
  logits of each model at a time; ``chunk=0``: auto). The step runs the same
  pre-pass inside :func:`chunked_divergence` (``sequence_logps``), on the
  unembeddings it gathers anyway."""
  r, n = tokens.shape
  vmin = min(w_s.shape[-1], w_t.shape[-1])
  _, to_chunks = _position_chunks(r, n, vmin, chunk, sharder, chunk_budget_mib, False)
  sg = jax.lax.stop_gradient
  ws = _gather_unembedding(sg(w_s[:, :vmin]), sharder)
  wt = _gather_unembedding(sg(w_t[:, :vmin]), sharder)
  m = mask.astype(jnp.float32)
  xs = tuple(to_chunks(a) for a in (h_s, h_t, tokens, m))
  sp, sq = _sequence_scan(
    xs, ws, wt, vocab=vocab, sharder=sharder, ts=student_temperature, tt=teacher_temperature
  )
  count = jnp.maximum(jnp.sum(m, axis=1), 1.0)
  return sp / count, sq / count


def _repeat(x: jax.Array, n: int) -> jax.Array:
  return x if n == 1 else jnp.repeat(x, n, axis=0)


def data_parallel_size(sharder: Sharder) -> int:
  """Devices the rows are split over: the mesh axes of "activation_batch"."""
  if sharder.mesh is None:
    return 1
  axes = dict(sharder.rules).get("activation_batch") or ()
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(int(sharder.mesh.shape[a]) for a in axes if a in sharder.mesh.shape)


def check_micro_batches(rows: int, cfg: OPDConfig, dp: int = 1) -> None:
  """Raises unless ``cfg.micro_batches`` = M splits the R rows into equal
  groups: M | R, (R/M) a multiple of the data-parallel size ``dp`` (M > 1),
  and M | the on-policy and off-policy row counts (every group gets the same
  static λ mix)."""
  m = cfg.micro_batches
  n_on = rows if lambda_scheduled(cfg) else split_rows(rows, cfg.on_policy_fraction)
  if rows % m:
    raise ValueError(
      f"micro_batches={m} must divide the rows per step (batch_size x num_samples = {rows})"
    )
  if m > 1 and (rows // m) % dp:
    raise ValueError(
      f"micro_batches={m}: each group's {rows // m} rows must be a multiple "
      f"of the data-parallel size {dp} (rows per step {rows})"
    )
  if n_on % m or (rows - n_on) % m:
    raise ValueError(
      f"micro_batches={m} must divide the on-policy rows ({n_on}) and the "
      f"off-policy rows ({rows - n_on}) of on_policy_fraction="
      f"{cfg.on_policy_fraction} x {rows} rows"
    )


def plan_rows(batch, rng, cfg: OPDConfig, sharder: Sharder | None = None, lam=None):
  """Everything about the rows that is decided before any sampling, grouped
  for ``cfg.micro_batches`` = M (shapes: R rows, G = R/M per group, a / b
  on- / off-policy rows per group, N completion length).

  The on/off row sets (a random permutation unless λ = 1) and the sampler's
  uniforms (``uniform(k, [N, n_on])`` for the student, ``[N, n_off]`` for a
  teacher) are drawn for all rows at once, exactly as for M = 1; group g
  takes on-policy rows ``g·a .. g·a+a-1`` and off-policy rows
  ``g·b .. g·b+b-1`` of those lists, so no sample depends on M.

  With λ scheduled (:func:`lambda_scheduled`; ``lam`` its traced value) rows
  stay in batch order, every row gets the student's uniforms AND its
  off-policy inputs, and ``on_mask`` ``[M, G]`` marks the ``round(λ·R)`` rows
  (the first of a random permutation) that are on-policy.

  Returns (order ``[R]`` int32: original row of each grouped row, or None
  when it is the identity; dict of group-major ``[M, ...]`` arrays: prompt_ids /
  prompt_mask ``[M, G, P]``, u_on ``[M, N, a]``, u_off ``[M, N', b]``
  (teacher samples), off_tokens / off_mask ``[M, b, N]`` (dataset)).
  """
  sh = sharder or Sharder()
  n, m = cfg.sampling.num_samples, cfg.micro_batches
  prompt_ids = _repeat(batch["prompt_ids"], n)
  prompt_mask = _repeat(batch["prompt_mask"], n).astype(jnp.bool_)
  rows, big_n = prompt_ids.shape[0], cfg.sampling.max_new_tokens
  check_micro_batches(rows, cfg, data_parallel_size(sh))
  scheduled = lambda_scheduled(cfg)
  if scheduled and lam is None:
    raise ValueError("a scheduled on_policy_fraction needs its value (lam=)")
  n_on = rows if scheduled else split_rows(rows, cfg.on_policy_fraction)
  n_off = rows if scheduled else rows - n_on
  k_sample, k_perm, k_teacher = jax.random.split(rng, 3)

  def groups(x, axis=0):  # [..., K, ...] -> [M, ..., K/M, ...] along `axis`
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape((m, x.shape[0] // m) + x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)

  def shard(x, batch_axis):  # group-major array: its rows over the data axes
    names = [None] * x.ndim
    names[batch_axis] = "activation_batch"
    return sh.constrain(x, names)

  xs = {}
  if n_on:
    u = jax.random.uniform(k_sample, (big_n, n_on), jnp.float32)
    xs["u_on"] = shard(groups(u, axis=1), 2)
  if scheduled:  # batch order; a traced mask picks each row's completion
    order = None
    rank = jnp.argsort(jax.random.permutation(k_perm, rows))  # row -> its place
    on_mask = rank < jnp.round(jnp.asarray(lam, jnp.float32) * rows).astype(jnp.int32)
    xs["on_mask"] = shard(groups(on_mask), 1)
    off_rows = jnp.arange(rows)
  if n_on == rows and not scheduled:  # pure on-policy: rows keep prompt-grouped order
    order = None
  elif not scheduled:
    perm = jax.random.permutation(k_perm, rows)
    on_rows, off_rows = perm[:n_on], perm[n_on:]
    order = jnp.concatenate([groups(on_rows), groups(off_rows)], axis=1).reshape(rows)
    prompt_ids, prompt_mask = prompt_ids[order], prompt_mask[order]
  if n_on < rows or scheduled:
    if cfg.off_policy_source == "teacher":
      u = jax.random.uniform(k_teacher, (big_n, n_off), jnp.float32)
      xs["u_off"] = shard(groups(u, axis=1), 2)
    else:
      if "completion_ids" not in batch:
        raise ValueError(
          "on_policy_fraction < 1 with off_policy_source='dataset' needs "
          "batch['completion_ids'] and batch['completion_mask']"
        )
      comp = _pad_time(_repeat(batch["completion_ids"], n), big_n)[:, :big_n]
      comp_mask = _pad_time(_repeat(batch["completion_mask"], n), big_n)[:, :big_n]
      xs["off_tokens"] = shard(groups(comp[off_rows].astype(jnp.int32)), 1)
      xs["off_mask"] = shard(groups(comp_mask[off_rows].astype(jnp.bool_)), 1)
  if losses_lib.needs_outcome(cfg.loss):  # GRPO: answers and each row's prompt
    if "answer_ids" not in batch:
      raise ValueError(f"loss {cfg.loss!r} needs batch['answer_ids'] ([B, A], -1 padded)")
    if (rows // m) % n:
      raise ValueError(
        f"loss {cfg.loss!r}: micro_batches={m} must keep each prompt's {n} samples "
        f"in one group ({rows // m} rows per group)"
      )
    prompt_index = jnp.arange(rows, dtype=jnp.int32) // n
    answer_ids = _repeat(jnp.asarray(batch["answer_ids"], jnp.int32), n)
    if order is not None:
      prompt_index, answer_ids = prompt_index[order], answer_ids[order]
    xs["prompt_index"] = shard(groups(prompt_index), 1)
    xs["answer_ids"] = shard(groups(answer_ids), 1)
  xs["prompt_ids"] = shard(groups(prompt_ids), 1)
  xs["prompt_mask"] = shard(groups(prompt_mask), 1)
  return order, xs


def group_completions(student, teacher, x, cfg: OPDConfig, hparams=None):
  """One group's completions from its slice ``x`` of :func:`plan_rows` (the
  group's first a rows on-policy, the other b off-policy).

  Returns a dict of ``[G, ...]`` arrays: prompt_ids, prompt_mask, tokens,
  mask (completion), on_policy (bool rows), lengths, truncated. ``hparams``:
  scheduled values (a scheduled sampling temperature is used here).
  """
  student = _tempered(student, cfg, "sampling.temperature", hparams)
  teacher = _tempered(teacher, cfg, "teacher_sampling.temperature", hparams)
  prompt_ids, prompt_mask = x["prompt_ids"], x["prompt_mask"]
  g, big_n = prompt_ids.shape[0], cfg.sampling.max_new_tokens
  a = x["u_on"].shape[-1] if "u_on" in x else 0
  scheduled = "on_mask" in x  # λ scheduled: both completions for every row
  b0 = 0 if scheduled else a  # first off-policy row
  one = dataclasses.replace(cfg.sampling, num_samples=1)
  parts = []
  if a:
    out = sample(student, prompt_ids[:a], prompt_mask[:a], None, one, uniforms=x["u_on"])
    parts.append(
      dict(
        tokens=out.tokens,
        mask=out.mask.astype(jnp.bool_),
        lengths=out.lengths,
        truncated=out.truncated,
      )
    )
  if b0 < g:
    if cfg.off_policy_source == "teacher":
      tcfg = dataclasses.replace(
        cfg.teacher_sampling or cfg.sampling, num_samples=1, max_new_tokens=big_n
      )
      out = sample(teacher, prompt_ids[b0:], prompt_mask[b0:], None, tcfg, uniforms=x["u_off"])
      off_tokens, off_mask = out.tokens, out.mask.astype(jnp.bool_)
    else:
      off_tokens, off_mask = x["off_tokens"], x["off_mask"]
    parts.append(
      dict(
        tokens=off_tokens.astype(jnp.int32),
        mask=off_mask,
        lengths=off_mask.sum(-1).astype(jnp.int32),
        truncated=jnp.zeros((g - b0,), jnp.bool_),
      )
    )
  if scheduled:
    on_policy = x["on_mask"]
    pick = lambda a_, b_: jnp.where(on_policy.reshape((g,) + (1,) * (a_.ndim - 1)), a_, b_)
    comp = {k: pick(parts[0][k], parts[1][k]) for k in parts[0]}
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, on_policy=on_policy, **comp)
  comp = {
    k: jnp.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]
  }
  on_policy = jnp.arange(g) < a
  return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, on_policy=on_policy, **comp)


def build_completions(student, teacher, batch, rng, cfg: OPDConfig, hparams=None):
  """Chooses and produces each row's completion (steps 1 and the λ mix), all
  rows at once (the compiled step does the same group by group).

  Returns a dict of ``[R, ...]`` arrays in the batch's row order: prompt_ids,
  prompt_mask, tokens, mask (completion), on_policy (bool rows), lengths,
  truncated. Independent of ``cfg.micro_batches``. ``hparams``: the step's
  scheduled values ({target: float32 scalar}; λ and temperatures are read).
  """
  hparams = hparams or {}
  order, xs = plan_rows(batch, rng, cfg, lam=hparams.get("on_policy_fraction"))
  groups = [
    group_completions(student, teacher, jax.tree.map(lambda v: v[i], xs), cfg, hparams)
    for i in range(cfg.micro_batches)
  ]
  out = jax.tree.map(lambda *v: jnp.concatenate(v), *groups)
  if order is not None:  # back to the batch's row order
    out = {k: jnp.zeros_like(v).at[order].set(v) for k, v in out.items()}
  return out


def with_vocab_size(cfg: OPDConfig, vocab_size: int) -> OPDConfig:
  """``cfg`` whose samplers never draw ids >= ``vocab_size`` (the common
  vocabulary: padded embedding rows are never sampled)."""
  return dataclasses.replace(
    cfg,
    sampling=dataclasses.replace(cfg.sampling, vocab_size=vocab_size),
    teacher_sampling=None
    if cfg.teacher_sampling is None
    else dataclasses.replace(cfg.teacher_sampling, vocab_size=vocab_size),
  )


def distillm2_anchors(
  student, teacher, batches, rng, cfg: OPDConfig, *, vocab_size: int, sharder: Sharder | None = None
) -> dict[str, float]:
  """DistiLLM-2's adaptive-α anchors from the (initial) models: {"anchor_teacher":
  Δ0_t, "anchor_student": Δ0_s} to set in ``config.loss`` (see
  :func:`losses.distillm2`). Over the rows of ``batches`` (an iterable of
  step batches; e.g. the first logging window's), each batch's completions
  made as the step makes them (:func:`build_completions`, key
  ``fold_in(rng, i)``), the mean over teacher-response rows of
  exp(mean_t log q(y_t)) − exp(mean_t log p(y_t)) and over student rows of
  exp(mean_t log p) − exp(mean_t log q) (the official trainer's anchors: the
  mean of those batch means over its first logging window; here the mean
  over all rows with response tokens). A role with no rows gives None."""
  sharder = sharder or Sharder()
  run_cfg = with_vocab_size(cfg, vocab_size)
  ts, tt = losses_lib.loss_temperatures(cfg.loss, dict(cfg.loss_kwargs))
  s_gd, s_state = nnx.split(student)
  t_gd, t_state = nnx.split(teacher)

  @jax.jit
  def gaps(s_state, t_state, batch, key):
    st, te = nnx.merge(s_gd, s_state), nnx.merge(t_gd, t_state)
    comp = build_completions(st, te, batch, key, run_cfg)
    p, n = comp["prompt_ids"].shape[1], comp["tokens"].shape[1]
    ids, mask, pos = full_sequence(
      comp["prompt_ids"], comp["prompt_mask"], comp["tokens"], comp["mask"]
    )
    hidden = lambda model: model.hidden(ids, mask, pos)[0][:, p - 1 : p - 1 + n]
    lp, lq = sequence_log_probs(
      hidden(st),
      st.unembedding(),
      hidden(te),
      te.unembedding(),
      comp["tokens"],
      comp["mask"],
      vocab=vocab_size,
      chunk=cfg.loss_chunk,
      sharder=sharder,
      student_temperature=ts,
      teacher_temperature=tt,
      chunk_budget_mib=cfg.loss_chunk_budget_mib,
    )
    return role_gap_sums(lp, lq, comp["mask"], comp["on_policy"])

  total = dict.fromkeys(("gap_on", "gap_off", "gap_rows_on", "gap_rows_off"), 0.0)
  for i, batch in enumerate(batches):
    got = jax.device_get(gaps(s_state, t_state, batch, jax.random.fold_in(rng, i)))
    total = {k: v + np.float64(got[k]) for k, v in total.items()}
  mean = lambda a, c: float(a / c) if c > 0 else None
  return {
    "anchor_teacher": mean(total["gap_off"], total["gap_rows_off"]),
    "anchor_student": mean(total["gap_on"], total["gap_rows_on"]),
  }


def role_gap_sums(seq_logp, seq_logq, mask, on_policy) -> dict[str, jax.Array]:
  """Sums of DistiLLM-2's sequence-level gaps Δ_i per row role over the rows
  with response tokens: ``gap_on`` Σ exp(seq_logp) − exp(seq_logq) over
  student rows, ``gap_off`` Σ exp(seq_logq) − exp(seq_logp) over teacher rows,
  and their row counts ``gap_rows_on`` / ``gap_rows_off``. seq_logp /
  seq_logq / on_policy ``[R]``, mask ``[R, N]``."""
  has = mask.any(axis=1)
  gap = jnp.exp(seq_logp) - jnp.exp(seq_logq)  # p − q: the student-response orientation
  on, off = has & on_policy, has & ~on_policy
  return dict(
    gap_on=jnp.sum(jnp.where(on, gap, 0.0)),
    gap_off=jnp.sum(jnp.where(off, -gap, 0.0)),
    gap_rows_on=jnp.sum(on.astype(jnp.float32)),
    gap_rows_off=jnp.sum(off.astype(jnp.float32)),
  )


def teacher_segments(cfg: OPDConfig, batch_size: int) -> tuple[tuple[str, int, int], ...]:
  """``(name, first prompt, prompts)`` of each teacher of ``cfg.teachers`` in a
  batch of ``batch_size`` prompts (contiguous, in order; rows r = prompt·n ..
  prompt·n + n-1 follow their prompt); () for a single-teacher step. The
  quotas must add up to the batch (the data pipeline fills them)."""
  if not cfg.teachers:
    return ()
  total = sum(q for _, q in cfg.teachers)
  if total != batch_size:
    raise ValueError(
      f"teachers' prompts per step {dict(cfg.teachers)} add up to {total}, "
      f"not the batch's {batch_size} prompts"
    )
  out, start = [], 0
  for name, q in cfg.teachers:
    out.append((name, start, q))
    start += q
  return tuple(out)


def _unnormalised_weights(mask: jax.Array, mode: str, normalizer: float | None):
  """Per-group (w ``[G, N]``, z scalar) such that, over all groups,
  ``aggregate_weights(mask) = w / max(Σ_g z, 1)`` ("token_mean": w = m, z =
  Σ m; "sequence_mean": w = m / Σ_t m per row, z = #rows with tokens) or
  ``= w`` ("constant": w = m / normalizer; z = 0, unused)."""
  m = mask.astype(jnp.float32)
  if mode == "token_mean":
    return m, jnp.sum(m)
  if mode == "sequence_mean":
    per_seq = jnp.sum(m, axis=1, keepdims=True)
    has = per_seq > 0
    return (jnp.where(has, m / jnp.where(has, per_seq, 1.0), 0.0), jnp.sum(has.astype(jnp.float32)))
  return losses_lib.aggregate_weights(m, mode, normalizer), jnp.zeros((), jnp.float32)


def make_opd_step(
  student_graphdef,
  teacher_graphdef,
  tx: optax.GradientTransformation,
  schedule: optax.Schedule,
  cfg: OPDConfig,
  *,
  vocab_size: int,
  sharder: Sharder,
  state_shardings=None,
  teacher_shardings=None,
  batch_shardings=None,
  donate: bool = True,
):
  """Returns ``step(state, teacher_params, batch) -> (state, metrics)``, jitted
  once with explicit shardings, the train state donated.

  With ``cfg.micro_batches`` = M > 1 the rows are processed in M groups
  (:func:`plan_rows`, :func:`group_completions`) inside one ``lax.scan``;
  the result equals M = 1's up to float summation order. M must divide the
  rows and both λ row counts, and each group's rows must fill the data axes
  (:func:`check_micro_batches`, raised when the step is traced).

  With ``cfg.teachers`` (multi-teacher), ``teacher_graphdef`` and the step's
  ``teacher_params`` (and ``teacher_shardings``) are tuples, one per teacher in
  ``cfg.teachers`` order (:func:`teacher_segments`).

  ``step.trace_count()`` says how often it was traced (1 in steady state);
  the token metrics come back as one vector ``metrics["token_metrics"]`` named
  by ``step.token_metric_names()`` (see :func:`host_metrics`).
  """
  check_outcome(cfg)
  loss_fn = losses_lib.get_loss(cfg.loss, dict(cfg.loss_kwargs))
  run_cfg = with_vocab_size(cfg, vocab_size)
  traces = [0]
  metric_names: list[tuple[str, ...]] = [()]

  def group_step(t_graphdef, params, teacher_params, hparams, x):
    """Samples, scores and differentiates one group of rows with the teacher
    ``t_graphdef`` / ``teacher_params``: (grads of the unnormalised loss Σ w·l,
    stats of additive sums). The models are merged here from fresh Variable
    objects (``tree.map``): NNX refuses to update, e.g. in ``nnx.remat``,
    Variables created outside the scan's trace."""
    params, teacher_params = jax.tree.map(lambda a: a, (params, teacher_params))
    student = nnx.merge(student_graphdef, params)
    teacher = None if t_graphdef is None else nnx.merge(t_graphdef, teacher_params)
    comp = group_completions(student, teacher, x, run_cfg, hparams)
    comp = jax.tree.map(jax.lax.stop_gradient, comp)
    p = comp["prompt_ids"].shape[1]
    ids, mask, pos = full_sequence(
      comp["prompt_ids"], comp["prompt_mask"], comp["tokens"], comp["mask"]
    )
    n = comp["tokens"].shape[1]
    # Position P-1+i predicts completion token i.
    h_t = w_t = None
    if teacher is not None:
      h_t, _ = teacher.hidden(ids, mask, pos)
      h_t = jax.lax.stop_gradient(h_t[:, p - 1 : p - 1 + n])
      w_t = jax.lax.stop_gradient(teacher.unembedding())
    weights, z = _unnormalised_weights(comp["mask"], cfg.aggregation, cfg.normalizer)
    metric_mask = (comp["mask"] & comp["on_policy"][:, None]).astype(jnp.float32)
    outcome = None
    if losses_lib.needs_outcome(cfg.loss):  # the verifier, inside the step
      reward = jnp.asarray(cfg.verifier(comp["tokens"], comp["mask"], x["answer_ids"]), jnp.float32)
      outcome = (reward, x["prompt_index"])
    per_row = lambda v: None if v is None else jnp.broadcast_to(v[:, None], comp["mask"].shape)
    loss_hparams = {k[len("loss.") :]: v for k, v in hparams.items() if k.startswith("loss.")}
    loss_kwargs = dict(cfg.loss_kwargs)
    loss_inputs = losses_lib.row_inputs(
      cfg.loss,
      per_row(comp["on_policy"]),
      *((per_row(outcome[0]), per_row(outcome[1])) if outcome else ()),
    )
    seq_in = None
    if losses_lib.needs_sequence_logps(cfg.loss, loss_kwargs):  # pre-pass in the scan
      ts, tt = losses_lib.loss_temperatures(cfg.loss, {**loss_kwargs, **loss_hparams})
      seq_in = (comp["mask"], ts, tt)

    def loss_of(params):
      model = nnx.merge(student_graphdef, params)
      h_s, _ = model.hidden(ids, mask, pos)
      out = chunked_divergence(
        h_s[:, p - 1 : p - 1 + n],
        model.unembedding(),
        h_t,
        w_t,
        comp["tokens"],
        weights,
        metric_mask,
        loss_fn=loss_fn,
        vocab=vocab_size,
        chunk=cfg.loss_chunk,
        metrics=cfg.metrics,
        top_k=cfg.metrics_top_k,
        position_chunk=cfg.position_chunk,
        sharder=sharder,
        chunk_budget_mib=cfg.loss_chunk_budget_mib,
        loss_inputs=loss_inputs,
        loss_hparams=loss_hparams,
        sequence_logps=seq_in,
      )
      total, sums, seq = out if seq_in is not None else (*out, {})
      return total, (sums, tuple(seq.values()))

    (loss, (sums, seq_rows)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    on = comp["on_policy"].astype(jnp.float32)
    stats = dict(
      loss=loss,
      z=z,
      num_tokens=comp["mask"].sum().astype(jnp.float32),
      on=on.sum(),
      length_on=(comp["lengths"] * on).sum(),
      truncated_on=(comp["truncated"] * on).sum(),
    )
    if outcome is not None:
      stats.update(outcome_stats(cfg, *outcome, comp["mask"], hparams))
    if seq_rows:  # the rows' sequence-level gaps (DistiLLM-2's Δ_i), per role
      stats.update(role_gap_sums(*seq_rows, comp["mask"], comp["on_policy"]))
    if cfg.metrics:
      stats["sums"] = sums
    return grads, stats

  def multi_teacher_groups(params, teacher_params, batch, k_roll, hparams):
    """Multi-teacher rows: teacher k's prompts are the batch's static slice
    ``[start_k, start_k + q_k)`` (:func:`teacher_segments`), planned by
    :func:`plan_rows` on their own (λ split, M groups and sampler uniforms per
    teacher, key ``fold_in(k_roll, k)``; ``k_roll`` itself for one teacher).
    Returns (xs: one plan per teacher, ``one_group(x) -> (grads, stats)``: group
    g of every teacher, each scored by its own teacher only; stats are the
    teachers' sums plus their own under ``"teachers"``)."""
    segments = teacher_segments(cfg, batch["prompt_ids"].shape[0])
    if not isinstance(teacher_params, (tuple, list)) or len(teacher_params) != len(segments):
      raise ValueError(
        f"multi-teacher step: teacher_params must be a tuple of {len(segments)} teachers' "
        f"parameters ({[name for name, _, _ in segments]})"
      )
    lam = hparams.get("on_policy_fraction")
    xs = []
    for k, (name, start, q) in enumerate(segments):
      part = {key: v[start : start + q] for key, v in batch.items()}
      key = k_roll if len(segments) == 1 else jax.random.fold_in(k_roll, k)
      try:
        xs.append(plan_rows(part, key, run_cfg, sharder, lam=lam)[1])
      except ValueError as e:
        raise ValueError(f"teacher {name!r} ({q} prompts per step): {e}") from None

    def one_group(x):
      grads, per = None, []
      for k, xk in enumerate(x):
        g, st = group_step(teacher_graphdef[k], params, teacher_params[k], hparams, xk)
        g = jax.tree.map(lambda a: a.astype(jnp.float32), g)
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        per.append(st)
      total = jax.tree.map(lambda *v: functools.reduce(jnp.add, v), *per)
      return grads, dict(total, teachers=tuple(per))

    return tuple(xs), one_group

  def constrain_grads(g):
    if sharder.mesh is None or state_shardings is None:
      return g
    return jax.lax.with_sharding_constraint(g, state_shardings.params)

  def step(state: TrainState, teacher_params, batch, point=None):
    """``point``: a vmapped sweep's per-point values ({target: float32
    scalar}) replacing those scheduled targets' values, and ``lr_scale``
    multiplying the optimizer's update (see :mod:`opd_jax.vmap_sweep`)."""
    traces[0] += 1
    rng, k_roll = jax.random.split(state.rng)
    # Scheduled settings: traced float32 scalars from the step counter.
    hparams = schedules_lib.values(cfg.schedules, state.step)
    point = dict(point or {})
    lr_scale = point.pop("lr_scale", None)
    hparams.update(point)
    rows = batch["prompt_ids"].shape[0] * cfg.sampling.num_samples
    segments = teacher_segments(cfg, batch["prompt_ids"].shape[0])
    if segments:  # multi-teacher: each teacher plans, samples and scores its own rows
      xs, one_group = multi_teacher_groups(state.params, teacher_params, batch, k_roll, hparams)
    else:
      _, xs = plan_rows(batch, k_roll, run_cfg, sharder, lam=hparams.get("on_policy_fraction"))
      one_group = functools.partial(
        group_step, teacher_graphdef, state.params, teacher_params, hparams
      )
    xs = jax.tree.map(jax.lax.stop_gradient, xs)
    if cfg.micro_batches == 1:
      grads, stats = one_group(jax.tree.map(lambda v: v[0], xs))
    else:
      # Micro-batches: one group's KV caches / activations live at a time;
      # gradients (float32, on the parameters' shardings) and sums add up.
      def body(carry, x):
        grads, stats = one_group(x)
        acc, tot = carry
        acc = constrain_grads(jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads))
        return (acc, jax.tree.map(jnp.add, tot, stats)), None

      shapes = jax.eval_shape(one_group, jax.tree.map(lambda v: v[0], xs))
      zeros = lambda s, dt=None: jnp.zeros(s.shape, dt or s.dtype)
      carry = (
        constrain_grads(jax.tree.map(lambda s: zeros(s, jnp.float32), shapes[0])),
        jax.tree.map(zeros, shapes[1]),
      )
      (grads, stats), _ = jax.lax.scan(body, carry, xs)
    # Normalise once all rows are in (token / sequence means need the totals).
    scale = (
      jnp.ones((), jnp.float32)
      if cfg.aggregation == "constant"
      else 1.0 / jnp.maximum(stats["z"], 1.0)
    )
    grads = jax.tree.map(
      lambda g, p_: (g.astype(jnp.float32) * scale).astype(p_.dtype), grads, state.params
    )
    grads = constrain_grads(optim.nonfinite_if(grads, ~jnp.isfinite(stats["loss"])))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    lr = jnp.asarray(schedule(state.step), jnp.float32)
    if lr_scale is not None:  # lr_k · (adam + wd · p): the update at lr_scale · lr
      updates = jax.tree.map(lambda u: (u * lr_scale).astype(u.dtype), updates)
      lr = lr * lr_scale
    params = optax.apply_updates(state.params, updates)
    n_on = jnp.maximum(stats["on"], 1.0)
    out = {
      "loss": stats["loss"] * scale,
      "grad_norm": optax.tree.norm(grads),
      "lr": lr,
      "num_tokens": stats["num_tokens"],
      "mean_response_length": stats["length_on"] / n_on,
      "truncated_frac": stats["truncated_on"] / n_on,
      "on_policy_frac": stats["on"] / rows,
      **optim.nonfinite_metrics(opt_state),  # optim.skip_nonfinite: skipped steps
      **{f"schedule/{k}": v for k, v in hparams.items()},
    }
    token_arrays, token_names = [], []
    if cfg.metrics:
      # One vector (fast to compile); names are static. See `host_metrics`.
      token_arrays.append(metrics_lib.finalize_array(stats["sums"]))
      token_names += metrics_lib.finalize_names(stats["sums"])
    for (name, _, q), st in zip(segments, stats.get("teachers", ())):
      # Per teacher: its rows' loss (over its own normaliser) and counts.
      pre = f"teacher/{name}/"
      own = 1.0 if cfg.aggregation == "constant" else 1.0 / jnp.maximum(st["z"], 1.0)
      on_k = jnp.maximum(st["on"], 1.0)
      out.update(
        {
          pre + "loss": st["loss"] * own,
          pre + "num_tokens": st["num_tokens"],
          pre + "mean_response_length": st["length_on"] / on_k,
          pre + "truncated_frac": st["truncated_on"] / on_k,
          pre + "on_policy_frac": st["on"] / (q * cfg.sampling.num_samples),
        }
      )
      if cfg.metrics:
        token_arrays.append(metrics_lib.finalize_array(st["sums"]))
        token_names += [pre + n for n in metrics_lib.finalize_names(st["sums"])]
    if token_arrays:
      out["token_metrics"] = jnp.concatenate(token_arrays)
      metric_names[0] = tuple(token_names)
    if "gap_on" in stats:  # sequence pre-pass: mean Δ_i per row role (official logs)
      out["seq_gap/student_rows"] = stats["gap_on"] / jnp.maximum(stats["gap_rows_on"], 1.0)
      out["seq_gap/teacher_rows"] = stats["gap_off"] / jnp.maximum(stats["gap_rows_off"], 1.0)
    if "outcome_reward" in stats:  # OPD + outcome reward: the advantage's two parts
      tokens = jnp.maximum(stats["num_tokens"], 1.0)
      out["outcome/reward_mean"] = stats["outcome_reward"] / rows
      out["outcome/zero_variance_groups"] = stats["outcome_zero_var_groups"] / jnp.maximum(
        stats["outcome_groups"], 1.0
      )
      out["outcome/advantage_outcome"] = stats["outcome_adv"] / tokens
      out["outcome/advantage_outcome_abs"] = stats["outcome_adv_abs"] / tokens
      distill = "topk_kl" if dict(cfg.loss_kwargs).get("reward") == "topk" else "k1"
      if cfg.metrics and distill in metric_names[0]:  # distillation reward = −k1 / −topk_kl
        out["outcome/advantage_distill"] = -out["token_metrics"][metric_names[0].index(distill)]
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, out

  jit_kwargs = {}
  if sharder.mesh is not None:
    rep = sharder.replicated()
    jit_kwargs = dict(
      in_shardings=(state_shardings, teacher_shardings, batch_shardings),
      out_shardings=(state_shardings, rep),
    )
  jitted = jax.jit(
    lambda state, teacher_params, batch: step(state, teacher_params, batch),
    donate_argnums=(0,) if donate else (),
    **jit_kwargs,
  )
  jitted.step_fn = step  # the function itself (vmapped sweeps: step(..., point))
  jitted.trace_count = lambda: traces[0]
  jitted.token_metric_names = lambda: metric_names[0]
  return jitted


def host_metrics(metrics: Mapping[str, Any], token_metric_names=()) -> dict[str, float]:
  """Step metrics -> flat dict of Python floats (unpacks ``token_metrics``)."""
  out = {}
  for k, v in jax.device_get(dict(metrics)).items():  # one transfer for all
    v = np.asarray(v)
    if k == "token_metrics":
      out.update({n: float(x) for n, x in zip(token_metric_names, v)})
    else:
      out[k] = v.item()
  return out


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings, replicated):
  """Shardings of ``tx.init(params)``: moments follow their parameters
  (``optax.tree_map_params``), counters and other state are replicated.
  ``params`` may be abstract (``jax.ShapeDtypeStruct`` s)."""
  return optax.tree_map_params(
    tx,
    lambda _, s: s,
    jax.eval_shape(tx.init, params),
    param_shardings,
    transform_non_params=lambda _: replicated,
  )


def init_train_state(student, tx: optax.GradientTransformation, seed: int, sharder: Sharder):
  """TrainState for an NNX student plus its sharding tree (for jit).

  The optimizer state is created directly on the parameters' shardings
  (``optax.tree_map_params`` maps the param shardings onto the moments;
  counters are replicated). The state shares the student's parameter arrays
  and the step donates them: do not use ``student`` after the first step
  (``nnx.merge(graphdef, state.params)`` gives the current model).
  """
  from opd_jax.models.factory import param_shardings

  params = nnx.state(student, nnx.Param)
  rng = jax.random.PRNGKey(seed)
  if sharder.mesh is None:
    state = TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params), rng=rng
    )
    return state, None
  rep = sharder.replicated()
  p_shard = param_shardings(params, sharder)
  params = jax.device_put(params, p_shard)
  opt_shard = optimizer_shardings(tx, params, p_shard, rep)
  opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
  shardings = TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)
  state = TrainState(
    step=jax.device_put(jnp.zeros((), jnp.int32), rep),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(rng, rep),
  )
  return state, shardings
