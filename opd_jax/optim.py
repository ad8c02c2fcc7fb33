"""Optimizer and learning-rate schedule from config (optax)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("adamw", "sgd", "adafactor")


def make_schedule(
  *,
  lr: float,
  schedule: str = "constant",
  warmup_steps: int = 0,
  total_steps: int = 0,
  end_lr_factor: float = 0.0,
) -> optax.Schedule:
  """Linear warmup to ``lr`` then constant / cosine / linear decay to
  ``lr * end_lr_factor`` at ``total_steps``."""
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown lr schedule {schedule!r}; valid: {SCHEDULES}")
  if schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    if total_steps <= warmup_steps:
      raise ValueError(
        f"{schedule} schedule needs total_steps > warmup_steps "
        f"(got {total_steps} <= {warmup_steps})"
      )
    decay = total_steps - warmup_steps
    main = (
      optax.cosine_decay_schedule(lr, decay, alpha=end_lr_factor)
      if schedule == "cosine"
      else optax.linear_schedule(lr, lr * end_lr_factor, decay)
    )
  if warmup_steps <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), main], [warmup_steps])


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices only (not norms / biases)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


class SkipNonfiniteState(NamedTuple):
  """State of :func:`skip_nonfinite`: the inner state and int32 counters."""

  inner_state: Any
  nonfinite_in_a_row: jax.Array  # skipped since the last applied update
  nonfinite_steps: jax.Array  # skipped in all


def skip_nonfinite(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` that skips an update whose gradients hold a NaN or inf: zero
  updates and ``tx``'s state kept (``optax.apply_if_finite`` without giving
  up after a number of errors, and without a state field the step never
  reads); the skipped steps are counted (:func:`nonfinite_metrics`)."""
  tx = optax.with_extra_args_support(tx)

  def init(params):
    zero = jnp.zeros([], jnp.int32)
    return SkipNonfiniteState(tx.init(params), zero, zero)

  def update(updates, state, params=None, **extra_args):
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(updates)]))
    updates, inner = jax.lax.cond(
      finite,
      lambda: tx.update(updates, state.inner_state, params, **extra_args),
      lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state),
    )
    bad = jnp.logical_not(finite).astype(jnp.int32)
    return updates, SkipNonfiniteState(
      inner, (state.nonfinite_in_a_row + 1) * bad, state.nonfinite_steps + bad
    )

  return optax.GradientTransformationExtraArgs(init, update)


def nonfinite_if(grads: Any, bad: jax.Array) -> Any:
  """``grads``, all NaN where the scalar ``bad`` holds (a non-finite loss is a
  non-finite step, even with finite gradients)."""
  return jax.tree.map(lambda g: jnp.where(bad, jnp.full_like(g, jnp.nan), g), grads)


def nonfinite_metrics(opt_state: Any) -> dict[str, jax.Array]:
  """``{"nonfinite_steps": skipped so far, "nonfinite_in_a_row": skipped
  since the last update}`` of a :func:`skip_nonfinite` state ({} without)."""
  if not isinstance(opt_state, SkipNonfiniteState):
    return {}
  return {
    "nonfinite_steps": opt_state.nonfinite_steps.astype(jnp.float32),
    "nonfinite_in_a_row": opt_state.nonfinite_in_a_row.astype(jnp.float32),
  }


def make_optimizer(cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """``cfg``: ConfigDict / mapping with name, lr, schedule, warmup_steps,
  total_steps, b1, b2, eps, weight_decay, grad_clip, decay_matrices_only,
  skip_nonfinite (default True: :func:`skip_nonfinite` around the rest)."""
  get = (
    (lambda k, d=None: cfg.get(k, d))
    if hasattr(cfg, "get")
    else (lambda k, d=None: getattr(cfg, k, d))
  )
  name = get("name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"unknown optimizer {name!r}; valid: {OPTIMIZERS}")
  sched = make_schedule(
    lr=float(get("lr", 1e-6)),
    schedule=get("schedule", "constant"),
    warmup_steps=int(get("warmup_steps", 0)),
    total_steps=int(get("total_steps", 0)),
    end_lr_factor=float(get("end_lr_factor", 0.0)),
  )
  if name == "adamw":
    mask = _decay_mask if get("decay_matrices_only", False) else None
    tx = optax.adamw(
      sched,
      b1=float(get("b1", 0.9)),
      b2=float(get("b2", 0.999)),
      eps=float(get("eps", 1e-8)),
      weight_decay=float(get("weight_decay", 0.01)),
      mask=mask,
    )
  elif name == "sgd":
    tx = optax.sgd(sched, momentum=get("momentum", None))
  else:
    tx = optax.adafactor(sched)
  clip = get("grad_clip", 1.0)
  if clip:
    tx = optax.chain(optax.clip_by_global_norm(float(clip)), tx)
  if get("skip_nonfinite", True):
    tx = skip_nonfinite(tx)
  return tx, sched
