"""Scheduled settings (progressive / dynamic distillation): a value per step.

``config.schedules`` is one string of ``target=spec`` entries separated by
``;``, e.g. ``"loss.beta=linear:1.0:1.5:0:500;loss.alpha=cosine:0.1:0.3:0:1000"``.
Specs (t the step, the train state's counter; s0 < s1 integers):

  constant:v              v
  linear:v0:v1:s0:s1      v0 + (v1 − v0)·f, f = clip((t − s0)/(s1 − s0), 0, 1)
  cosine:v0:v1:s0:s1      v0 + (v1 − v0)·½(1 − cos(π·f)), f as for linear
  step:v0:s1:v1:s2:v2...  v0 for t < s1, v1 for s1 ≤ t < s2, ... (increasing s_i)

The step evaluates each schedule from its own step counter as a float32
scalar (:func:`value`), so the values are traced, not static: one compiled
step for the whole run, the values logged every step (``schedule/<target>``)
and exact across resume (the counter is checkpointed). Targets, checked at
start-up (``opd_step.check_schedules``): ``loss.<numeric keyword>``,
``on_policy_fraction`` (λ; a traced per-row mask, see
``opd_step.lambda_scheduled``), ``sampling.temperature``,
``teacher_sampling.temperature``; and, host side in the data pipeline (a
weight per global batch, :func:`host_value`), ``data.mixture.<source>``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

KINDS = ("constant", "linear", "cosine", "step")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """One parsed schedule (hashable: it is part of the static step config)."""

  kind: str
  values: tuple[float, ...]
  steps: tuple[int, ...] = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"unknown schedule kind {self.kind!r}; valid: {list(KINDS)}")
    n_v, n_s = len(self.values), len(self.steps)
    ok = {
      "constant": n_v == 1 and n_s == 0,
      "linear": n_v == 2 and n_s == 2,
      "cosine": n_v == 2 and n_s == 2,
      "step": n_v >= 1 and n_s == n_v - 1,
    }[self.kind]
    if not ok:
      raise ValueError(
        f"schedule {self.kind!r} got {n_v} value(s) and {n_s} step(s); "
        "see opd_jax.schedules for the forms"
      )
    if not all(math.isfinite(v) for v in self.values):
      raise ValueError(f"schedule values must be finite, got {self.values}")
    if any(b <= a for a, b in zip(self.steps, self.steps[1:])) or any(s < 0 for s in self.steps):
      raise ValueError(f"schedule steps must be increasing and >= 0, got {self.steps}")


def parse(spec: str) -> Schedule:
  """``"linear:1.0:1.5:0:500"`` -> :class:`Schedule` (ValueError if malformed)."""
  kind, *args = spec.strip().split(":")
  try:
    nums = [float(a) for a in args]
  except ValueError:
    raise ValueError(f"schedule {spec!r}: arguments must be numbers") from None
  if kind in ("linear", "cosine") and len(nums) == 4:
    values, steps = nums[:2], nums[2:]
  elif kind == "step":
    values, steps = nums[0::2], nums[1::2]
  else:
    values, steps = nums, []
  if any(s != int(s) for s in steps):
    raise ValueError(f"schedule {spec!r}: steps must be integers")
  return Schedule(kind, tuple(values), tuple(int(s) for s in steps))


def parse_all(text: str) -> tuple[tuple[str, Schedule], ...]:
  """``"a=spec;b=spec"`` -> sorted ((target, Schedule), ...); "" -> ()."""
  out = {}
  for item in filter(None, (x.strip() for x in (text or "").split(";"))):
    if "=" not in item:
      raise ValueError(f"schedules entry {item!r} is not target=spec")
    target, spec = (x.strip() for x in item.split("=", 1))
    if target in out:
      raise ValueError(f"schedules: target {target!r} given twice")
    try:
      out[target] = parse(spec)
    except ValueError as e:
      raise ValueError(f"schedules: {target}: {e}") from None
  return tuple(sorted(out.items()))


def value(schedule: Schedule, step) -> jnp.ndarray:
  """The schedule at ``step`` (a Python int or a traced int scalar) as a
  float32 scalar."""
  t = jnp.asarray(step, jnp.float32)
  v = schedule.values
  if schedule.kind == "constant":
    return jnp.full((), v[0], jnp.float32)
  if schedule.kind == "step":
    out = jnp.full((), v[0], jnp.float32)
    for s, vi in zip(schedule.steps, v[1:]):
      out = jnp.where(t >= s, jnp.float32(vi), out)
    return out
  s0, s1 = schedule.steps
  frac = jnp.clip((t - s0) / (s1 - s0), 0.0, 1.0)
  if schedule.kind == "cosine":
    frac = 0.5 * (1.0 - jnp.cos(jnp.pi * frac))
  return (jnp.float32(v[0]) + (jnp.float32(v[1]) - jnp.float32(v[0])) * frac).astype(jnp.float32)


def host_value(schedule: Schedule, step: int) -> float:
  """:func:`value` on the host (numpy float32 arithmetic, no device call):
  for host-side schedules such as data mixture weights."""
  f32, t, v = np.float32, np.float32(step), schedule.values
  if schedule.kind == "constant":
    return float(f32(v[0]))
  if schedule.kind == "step":
    out = f32(v[0])
    for s, vi in zip(schedule.steps, v[1:]):
      out = f32(vi) if t >= s else out
    return float(out)
  s0, s1 = schedule.steps
  frac = np.clip((t - f32(s0)) / f32(s1 - s0), f32(0), f32(1))
  if schedule.kind == "cosine":
    frac = f32(0.5) * (f32(1) - np.cos(f32(np.pi) * frac))
  return float(f32(v[0]) + (f32(v[1]) - f32(v[0])) * frac)


def values(schedules, step) -> dict[str, jnp.ndarray]:
  """{target: float32 scalar} for ((target, Schedule), ...) at ``step``."""
  return {target: value(s, step) for target, s in schedules}
