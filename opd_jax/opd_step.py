"""The compiled OPD step: sample, score, per-token divergence, update.

One XLA program per step (no host round trip):

1. the student samples ``num_samples`` completions per prompt (KV cache,
   ``lax.while_loop``; no gradient) for a fraction λ of the rows; the other
   rows take off-policy completions (dataset, or teacher samples = sequence-
   level KD) — GKD's on/off-policy mix, per sample (Agarwal et al. 2024);
2. the teacher scores prompt + completion (stop-gradient);
3. the student recomputes its hidden states with gradient; logits and the
   per-token divergence are formed chunk by chunk over the sequence inside a
   rematerialised ``lax.scan`` so no ``[B, T, V]`` array of either model is
   ever live; token-level alignment metrics ride along in the same chunks;
4. an optax update is applied to the student only.

Shapes: R = B·n rows, P prompt length, N completion length, C loss chunk,
V common vocabulary.
"""

from __future__ import annotations

import dataclasses
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
from opd_jax.models.config import ModelConfig
from opd_jax.models.transformer import NEG_INF
from opd_jax.sampling import SamplingConfig, full_sequence, sample
from opd_jax.sharding import Sharder

OFF_POLICY_SOURCES = ("dataset", "teacher")


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (the teacher is not in here)."""
  step: jax.Array          # int32 scalar
  params: Any              # nnx.State of the student's parameters
  opt_state: Any           # optax state (student only)
  rng: jax.Array           # PRNG key


@dataclasses.dataclass(frozen=True)
class OPDConfig:
  """Static settings of the compiled step (hashable)."""
  sampling: SamplingConfig
  loss: str = "reverse_kl"
  loss_kwargs: tuple[tuple[str, Any], ...] = ()
  aggregation: str = "token_mean"
  normalizer: float | None = None
  on_policy_fraction: float = 1.0            # GKD λ
  off_policy_source: str = "dataset"         # or "teacher"
  teacher_sampling: SamplingConfig | None = None
  loss_chunk: int = 64                       # 0: auto, from loss_chunk_budget_mib
  loss_chunk_budget_mib: float = 1024.0
  metrics: bool = True
  metrics_top_k: int = 16
  position_chunk: int = 64

  def __post_init__(self):
    if isinstance(self.loss_kwargs, Mapping):
      object.__setattr__(self, "loss_kwargs", tuple(sorted(self.loss_kwargs.items())))
    if not 0.0 <= self.on_policy_fraction <= 1.0:
      raise ValueError(f"on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
    if self.off_policy_source not in OFF_POLICY_SOURCES:
      raise ValueError(f"unknown off_policy_source {self.off_policy_source!r}; "
                       f"valid: {OFF_POLICY_SOURCES}")
    if self.loss_chunk < 0:
      raise ValueError(f"loss_chunk must be >= 0 (0: auto), got {self.loss_chunk}")
    if not self.loss_chunk_budget_mib > 0:
      raise ValueError(f"loss_chunk_budget_mib must be positive, got "
                       f"{self.loss_chunk_budget_mib}")
    losses_lib.get_loss(self.loss, dict(self.loss_kwargs))  # fail fast, clear error


def common_vocab_size(student: ModelConfig, teacher: ModelConfig,
                      tokenizer_size: int | None = None) -> int:
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
          "embedding rows")
    return int(tokenizer_size)
  if student.vocab_size != teacher.vocab_size:
    raise ValueError(
        f"vocab mismatch: student vocab_size={student.vocab_size}, teacher "
        f"vocab_size={teacher.vocab_size}; if they share a tokenizer, pass its "
        "size (tokenizer_size=len(tokenizer)) so the padded rows can be ignored")
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
  vocab_axes = () if vocab_axes is None else (
      (vocab_axes,) if isinstance(vocab_axes, str) else tuple(vocab_axes))
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
  return jax.shard_map(local, mesh=sharder.mesh, in_specs=spec, out_specs=(out, out),
                       check_vma=False)(x)


WEIGHT_AXES = ("embed", "vocab")


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


def auto_loss_chunk(rows: int, length: int, vocab: int, sharder: Sharder, *,
                    budget_mib: float, metrics: bool) -> int:
  """Largest loss chunk C whose estimated per-device working set fits.

  estimate(C) = R_dev · C · V_dev · 4 bytes · LIVE_VOCAB_ARRAYS[metrics], with
  R_dev = rows per device (rows over the batch axes) and V_dev = the vocabulary
  per device (over ``activation_vocab``), as the chunk logits are laid out.
  Returns C in [1, length] (1 when even one token per row does not fit).
  """
  r_dev, v_dev = rows, vocab
  if sharder.mesh is not None:
    spec = sharder.spec(LOGIT_AXES, (rows, 1, vocab))
    per = lambda a: 1 if a is None else math.prod(
        sharder.mesh.shape[x] for x in ((a,) if isinstance(a, str) else a))
    r_dev, v_dev = math.ceil(rows / per(spec[0])), math.ceil(vocab / per(spec[2]))
  per_token = r_dev * v_dev * 4 * LIVE_VOCAB_ARRAYS[bool(metrics)]
  return int(max(1, min(length, budget_mib * 2**20 // per_token)))


def chunked_divergence(h_s, w_s, h_t, w_t, tokens, weights, metric_mask, *,
                       loss_fn, vocab: int, chunk: int, metrics: bool,
                       top_k: int, position_chunk: int, sharder: Sharder,
                       chunk_budget_mib: float = 1024.0):
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
  """
  r, n = tokens.shape
  vmin = min(w_s.shape[-1], w_t.shape[-1]) if h_t is not None else w_s.shape[-1]
  if chunk == 0:
    chunk = auto_loss_chunk(r, n, vmin, sharder, budget_mib=chunk_budget_mib,
                            metrics=metrics)
  # ceil(N / C) chunks of equal length <= C: padding stays < one per chunk
  # (N=64, C=256 -> one chunk of 64, not 256; N=100, C=64 -> 2 x 50).
  num_chunks = max(1, math.ceil(n / chunk))
  chunk = math.ceil(n / num_chunks)
  n_pad = num_chunks * chunk
  has_teacher = h_t is not None
  if metrics and not has_teacher:
    raise ValueError("token metrics need a teacher")
  weight_axes = WEIGHT_AXES
  if has_teacher:
    w_t = _gather_unembedding(jax.lax.stop_gradient(w_t[:, :vmin]), sharder)
  else:
    h_t = jnp.zeros(h_s.shape[:2] + (0,), h_s.dtype)   # placeholder, unused
  top_k_fn = lambda x, k: sharded_top_k(sharder, x, k)
  value_and_grad = losses_lib.logits_value_and_grad(loss_fn, top_k_fn)
  positions = jnp.broadcast_to(jnp.arange(n_pad, dtype=jnp.int32), (r, n_pad))
  chunk_axes = lambda a: (None, "activation_batch") + (None,) * (a.ndim - 2)
  to_chunks = lambda a: sharder.constrain(_to_chunks(_pad_time(a, n_pad), chunk),
                                          chunk_axes(a) + (None,))
  consts = tuple(to_chunks(a) for a in
                 (jax.lax.stop_gradient(h_t), tokens, weights, metric_mask, positions))
  num_pos_chunks = max(1, int(math.ceil(n / position_chunk)))
  sums0 = {}
  if metrics:
    shapes = jax.eval_shape(
        lambda: metrics_lib.accumulate(
            metrics_lib.token_metrics(jnp.zeros((1, 1, 2)), jnp.zeros((1, 1, 2)),
                                      jnp.zeros((1, 1), jnp.int32), k=top_k),
            jnp.ones((1, 1)), jnp.zeros((1, 1), jnp.int32), chunk_len=position_chunk,
            num_chunks=num_pos_chunks))
    sums0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def run(h_s, w_s, with_grad: bool):
    ws = _gather_unembedding(w_s[:, :vmin], sharder)

    def body(carry, x):
      total, sums, dw_acc = carry
      hs, ht, y, w, mm, pos = x
      ls = sharder.constrain(_project(hs, ws, vocab), LOGIT_AXES)
      lt = sharder.constrain(_project(ht, w_t, vocab), LOGIT_AXES) if has_teacher else None
      dhs = None
      if with_grad:
        per_tok, dls = value_and_grad(ls, lt, y, w)
        if vmin > vocab:   # masked (padded) columns get no gradient
          dls = jnp.where(jnp.arange(vmin) < vocab, dls, 0.0)
        dls = sharder.constrain(dls.astype(hs.dtype), LOGIT_AXES)
        # 2-D matmuls over the chunk's R·C tokens (the N-d einsum's layout
        # makes XLA:CPU copy the [R, C, V] gradient once more).
        dls2, hs2 = dls.reshape(-1, vmin), hs.reshape(-1, hs.shape[-1])
        dhs = jax.lax.dot_general(dls2, ws, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        dhs = sharder.constrain(dhs.astype(hs.dtype).reshape(hs.shape),
                                ("activation_batch", None, None))
        dws = jax.lax.dot_general(hs2, dls2, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        dw_acc = sharder.constrain(dw_acc + dws, weight_axes)
      else:
        per_tok = loss_fn(ls, lt, y)
      value = jnp.sum(w * per_tok)
      if metrics:
        per_tok = metrics_lib.token_metrics(ls, lt, y, k=top_k, top_k_fn=top_k_fn)
        sums = metrics_lib.merge_sums(sums, metrics_lib.accumulate(
            per_tok, mm, pos, chunk_len=position_chunk, num_chunks=num_pos_chunks))
      return (total + value, sums, dw_acc), dhs

    hs_chunks = to_chunks(h_s)
    dw0 = (sharder.constrain(jnp.zeros((w_s.shape[0], vmin), jnp.float32), weight_axes)
           if with_grad else jnp.zeros((), jnp.float32))
    (total, sums, dw), dhs = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), sums0, dw0), (hs_chunks,) + consts)
    if not with_grad:
      return total, sums
    dhs = sharder.constrain(dhs, (None, "activation_batch", None, None))
    dh = jnp.moveaxis(dhs, 0, 1).reshape((r, n_pad) + h_s.shape[2:])[:, :n]
    dw = jnp.pad(dw, [(0, 0), (0, w_s.shape[-1] - vmin)]) if w_s.shape[-1] > vmin else dw
    return total, sums, dh, sharder.constrain(dw.astype(w_s.dtype), weight_axes)

  @jax.custom_vjp
  def divergence(h_s, w_s):
    return run(h_s, w_s, with_grad=False)

  def divergence_fwd(h_s, w_s):
    total, sums, dh, dw = run(h_s, w_s, with_grad=True)
    return (total, sums), (dh, dw)

  def divergence_bwd(residuals, cotangents):
    dh, dw = residuals
    g = cotangents[0]
    return (g.astype(dh.dtype) * dh, g.astype(dw.dtype) * dw)

  divergence.defvjp(divergence_fwd, divergence_bwd)
  return divergence(h_s, w_s)


def _repeat(x: jax.Array, n: int) -> jax.Array:
  return x if n == 1 else jnp.repeat(x, n, axis=0)


def build_completions(student, teacher, batch, rng, cfg: OPDConfig):
  """Chooses and produces each row's completion (steps 1 and the λ mix).

  Returns a dict of ``[R, ...]`` arrays: prompt_ids, prompt_mask, tokens,
  mask (completion), on_policy (bool rows), lengths, truncated.
  """
  n = cfg.sampling.num_samples
  prompt_ids = _repeat(batch["prompt_ids"], n)
  prompt_mask = _repeat(batch["prompt_mask"], n).astype(jnp.bool_)
  rows, big_n = prompt_ids.shape[0], cfg.sampling.max_new_tokens
  n_on = split_rows(rows, cfg.on_policy_fraction)
  k_sample, k_perm, k_teacher = jax.random.split(rng, 3)
  one = dataclasses.replace(cfg.sampling, num_samples=1)
  if n_on == rows:   # pure on-policy: rows keep prompt-grouped order
    out = sample(student, prompt_ids, prompt_mask, k_sample, one)
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=out.tokens,
                mask=out.mask.astype(jnp.bool_), on_policy=jnp.ones((rows,), jnp.bool_),
                lengths=out.lengths, truncated=out.truncated)

  perm = jax.random.permutation(k_perm, rows)
  on_rows, off_rows = perm[:n_on], perm[n_on:]
  tokens = jnp.zeros((rows, big_n), jnp.int32)
  mask = jnp.zeros((rows, big_n), jnp.bool_)
  lengths = jnp.zeros((rows,), jnp.int32)
  truncated = jnp.zeros((rows,), jnp.bool_)
  if n_on:
    out = sample(student, prompt_ids[on_rows], prompt_mask[on_rows], k_sample, one)
    tokens = tokens.at[on_rows].set(out.tokens)
    mask = mask.at[on_rows].set(out.mask.astype(jnp.bool_))
    lengths = lengths.at[on_rows].set(out.lengths)
    truncated = truncated.at[on_rows].set(out.truncated)
  if cfg.off_policy_source == "teacher":
    tcfg = dataclasses.replace(cfg.teacher_sampling or cfg.sampling, num_samples=1,
                               max_new_tokens=big_n)
    out = sample(teacher, prompt_ids[off_rows], prompt_mask[off_rows], k_teacher, tcfg)
    off_tokens, off_mask = out.tokens, out.mask.astype(jnp.bool_)
  else:
    if "completion_ids" not in batch:
      raise ValueError("on_policy_fraction < 1 with off_policy_source='dataset' needs "
                       "batch['completion_ids'] and batch['completion_mask']")
    comp = _pad_time(_repeat(batch["completion_ids"], n), big_n)[:, :big_n]
    comp_mask = _pad_time(_repeat(batch["completion_mask"], n), big_n)[:, :big_n]
    off_tokens, off_mask = comp[off_rows], comp_mask[off_rows].astype(jnp.bool_)
  tokens = tokens.at[off_rows].set(off_tokens.astype(jnp.int32))
  mask = mask.at[off_rows].set(off_mask)
  lengths = lengths.at[off_rows].set(off_mask.sum(-1).astype(jnp.int32))
  on_policy = jnp.zeros((rows,), jnp.bool_).at[on_rows].set(True)
  return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, mask=mask,
              on_policy=on_policy, lengths=lengths, truncated=truncated)


def make_opd_step(student_graphdef, teacher_graphdef, tx: optax.GradientTransformation,
                  schedule: optax.Schedule, cfg: OPDConfig, *, vocab_size: int,
                  sharder: Sharder, state_shardings=None, teacher_shardings=None,
                  batch_shardings=None, donate: bool = True):
  """Returns ``step(state, teacher_params, batch) -> (state, metrics)``, jitted
  once with explicit shardings, the train state donated.

  ``step.trace_count()`` says how often it was traced (1 in steady state);
  the token metrics come back as one vector ``metrics["token_metrics"]`` named
  by ``step.token_metric_names()`` (see :func:`host_metrics`).
  """
  loss_fn = losses_lib.get_loss(cfg.loss, dict(cfg.loss_kwargs))
  # Never sample ids outside the common vocabulary (padded embedding rows).
  run_cfg = dataclasses.replace(
      cfg, sampling=dataclasses.replace(cfg.sampling, vocab_size=vocab_size),
      teacher_sampling=None if cfg.teacher_sampling is None else dataclasses.replace(
          cfg.teacher_sampling, vocab_size=vocab_size))
  traces = [0]
  metric_names: list[tuple[str, ...]] = [()]

  def step(state: TrainState, teacher_params, batch):
    traces[0] += 1
    student = nnx.merge(student_graphdef, state.params)
    teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_params)
    rng, k_roll = jax.random.split(state.rng)
    comp = build_completions(student, teacher, batch, k_roll, run_cfg)
    comp = jax.tree.map(jax.lax.stop_gradient, comp)
    p = comp["prompt_ids"].shape[1]
    ids, mask, pos = full_sequence(comp["prompt_ids"], comp["prompt_mask"],
                                   comp["tokens"], comp["mask"])
    n = comp["tokens"].shape[1]
    # Position P-1+i predicts completion token i.
    h_t = w_t = None
    if teacher is not None:
      h_t, _ = teacher.hidden(ids, mask, pos)
      h_t = jax.lax.stop_gradient(h_t[:, p - 1:p - 1 + n])
      w_t = jax.lax.stop_gradient(teacher.unembedding())
    weights = losses_lib.aggregate_weights(comp["mask"].astype(jnp.float32),
                                           cfg.aggregation, cfg.normalizer)
    metric_mask = (comp["mask"] & comp["on_policy"][:, None]).astype(jnp.float32)

    def loss_of(params):
      model = nnx.merge(student_graphdef, params)
      h_s, _ = model.hidden(ids, mask, pos)
      return chunked_divergence(
          h_s[:, p - 1:p - 1 + n], model.unembedding(), h_t, w_t, comp["tokens"],
          weights, metric_mask, loss_fn=loss_fn, vocab=vocab_size, chunk=cfg.loss_chunk,
          metrics=cfg.metrics, top_k=cfg.metrics_top_k,
          position_chunk=cfg.position_chunk, sharder=sharder,
          chunk_budget_mib=cfg.loss_chunk_budget_mib)

    (loss, sums), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    on = comp["on_policy"].astype(jnp.float32)
    n_on = jnp.maximum(on.sum(), 1.0)
    out = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(state.step), jnp.float32),
        "num_tokens": comp["mask"].sum().astype(jnp.float32),
        "mean_response_length": (comp["lengths"] * on).sum() / n_on,
        "truncated_frac": (comp["truncated"] * on).sum() / n_on,
        "on_policy_frac": on.mean(),
    }
    if cfg.metrics:
      # One vector (fast to compile); names are static. See `host_metrics`.
      out["token_metrics"] = metrics_lib.finalize_array(sums)
      metric_names[0] = metrics_lib.finalize_names(sums)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng)
    return new_state, out

  jit_kwargs = {}
  if sharder.mesh is not None:
    rep = sharder.replicated()
    jit_kwargs = dict(in_shardings=(state_shardings, teacher_shardings, batch_shardings),
                      out_shardings=(state_shardings, rep))
  jitted = jax.jit(step, donate_argnums=(0,) if donate else (), **jit_kwargs)
  jitted.trace_count = lambda: traces[0]
  jitted.token_metric_names = lambda: metric_names[0]
  return jitted


def host_metrics(metrics: Mapping[str, Any], token_metric_names=()) -> dict[str, float]:
  """Step metrics -> flat dict of Python floats (unpacks ``token_metrics``)."""
  out = {}
  for k, v in metrics.items():
    v = np.asarray(jax.device_get(v))
    if k == "token_metrics":
      out.update({n: float(x) for n, x in zip(token_metric_names, v)})
    else:
      out[k] = v.item()
  return out


def optimizer_shardings(tx: optax.GradientTransformation, params, param_shardings,
                        replicated):
  """Shardings of ``tx.init(params)``: moments follow their parameters
  (``optax.tree_map_params``), counters and other state are replicated.
  ``params`` may be abstract (``jax.ShapeDtypeStruct`` s)."""
  return optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, params),
                               param_shardings, transform_non_params=lambda _: replicated)


def init_train_state(student, tx: optax.GradientTransformation, seed: int,
                     sharder: Sharder):
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
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=jax.jit(tx.init)(params), rng=rng)
    return state, None
  rep = sharder.replicated()
  p_shard = param_shardings(params, sharder)
  params = jax.device_put(params, p_shard)
  opt_shard = optimizer_shardings(tx, params, p_shard, rep)
  opt_state = jax.jit(tx.init, out_shardings=opt_shard)(params)
  shardings = TrainState(step=rep, params=p_shard, opt_state=opt_shard, rng=rep)
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=params,
                     opt_state=opt_state, rng=jax.device_put(rng, rep))
  return state, shardings
