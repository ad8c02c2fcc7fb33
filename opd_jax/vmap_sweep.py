"""Vmapped sweeps: K students of one architecture trained in ONE compiled
program (``jax.vmap`` over their train states and per-point values) against
a single copy of the teacher's weights.

Points may differ only in values the step can take as traced scalars:

  optimizer.lr                  the update is scaled by lr_k / lr_0 (optax's
                                adamw / sgd / adafactor end with ``-lr ·``, so
                                this is the update at lr_k, weight decay too)
  seed                          the point's sampling RNG and data order
  on_policy_fraction            λ (a traced per-row mask)
  sampling.temperature,
  teacher_sampling.temperature
  loss.<numeric keyword>        e.g. JSD β, skew α, top-k weight

Each swept target other than lr / seed becomes a ``constant`` schedule of the
shared step config (so the step reads it as a traced value,
``opd_step.check_schedules`` says whether the loss can) and each point passes
its own value (``step(..., point)``). Anything else that differs between the
points (loss name, architecture, batch size, lengths, ...) is a ValueError
naming the setting: those need separate programs (``experiments/sweep.py``
without ``--vmap``).

Every point writes its own workdir exactly as a single run does (the resolved
config, ``metrics.jsonl``, TensorBoard, checkpoints with its data state,
evals) and the sweep resumes from the points' newest common checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from opd_jax import checkpointing, configs_lib
from opd_jax import train as train_lib
from opd_jax.data import restore_iterator_state, save_iterator_state
from opd_jax.logging_utils import MetricWriter
from opd_jax.opd_step import make_opd_step

# Settings whose values may differ between the points of one program.
TRACED_TARGETS = (
  "on_policy_fraction",
  "sampling.temperature",
  "teacher_sampling.temperature",
)
HOST_KEYS = ("optimizer.lr", "seed")
# Per point by construction, never compared.
PER_POINT_KEYS = ("workdir",)


def _flat(config: ml_collections.ConfigDict) -> dict[str, Any]:
  out = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, ml_collections.ConfigDict):
        walk(v, f"{prefix}{k}.")
      else:
        out[f"{prefix}{k}"] = v

  walk(config, "")
  return out


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class SweepPlan:
  """What varies over the K points: ``values[target][k]``."""

  targets: tuple[str, ...]  # traced targets (schedule names), sorted
  values: dict[str, tuple[float, ...]]  # target / optimizer.lr / seed -> K values
  num_points: int


def plan_sweep(configs: Sequence[ml_collections.ConfigDict], names: Sequence[str]) -> SweepPlan:
  """Checks that ``configs`` differ only in vmappable settings; their values."""
  if len(configs) < 1:
    raise ValueError("a vmapped sweep needs at least one point")
  flats = [_flat(c) for c in configs]
  keys = sorted(set().union(*flats))
  varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
  targets, values = [], {}
  for key in varying:
    vals = [f.get(key) for f in flats]
    traced = key in TRACED_TARGETS or (
      key.startswith("loss.") and key not in ("loss.name",) + _loss_step_keys()
    )
    if key not in HOST_KEYS and not traced or not all(_is_number(v) for v in vals):
      shown = ", ".join(f"{n}: {v!r}" for n, v in zip(names, vals))
      raise ValueError(
        f"vmapped sweep: {key} differs between the points ({shown}); one vmapped program can "
        f"only vary {', '.join(HOST_KEYS + TRACED_TARGETS)} and numeric loss keywords "
        "(loss.<name>): run the others as separate processes (experiments/sweep.py without "
        "--vmap)"
      )
    if traced:
      targets.append(key)
    values[key] = tuple(float(v) if key != "seed" else int(v) for v in vals)
  scheduled = {t for t, _ in _schedule_entries(configs[0])}
  both = sorted(scheduled & set(targets))
  if both:
    raise ValueError(f"vmapped sweep: {both} both follow config.schedules and vary by point")
  return SweepPlan(tuple(sorted(targets)), values, len(configs))


def _loss_step_keys() -> tuple[str, ...]:
  return tuple(f"loss.{k}" for k in configs_lib.LOSS_STEP_KEYS)


def _schedule_entries(config) -> list[tuple[str, str]]:
  text = str(config.get("schedules", ""))
  return [tuple(e.split("=", 1)) for e in text.split(";") if e.strip()]


def shared_config(
  config: ml_collections.ConfigDict, plan: SweepPlan, point: int = 0
) -> ml_collections.ConfigDict:
  """``config`` with a ``constant`` schedule (at point ``point``'s value) on
  every traced target: the step then reads them as traced values (the shared
  step's, replaced per point; or one point's run alone, the same program)."""
  entries = [f"{t}=constant:{plan.values[t][point]!r}" for t in plan.targets]
  text = ";".join(filter(None, [str(config.get("schedules", ""))] + entries))
  return configs_lib.updated(config, {"schedules": text}) if entries else config


@dataclasses.dataclass(frozen=True)
class Point:
  """One point of the sweep: its workdir, resolved config and typed settings."""

  name: str
  workdir: str
  config: ml_collections.ConfigDict
  settings: Any  # train.Settings


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stacked_shardings(state):
  """Shardings of K stacked copies of ``state``: each leaf's own, with the
  points axis (leading, unsharded) in front."""

  def of(x):
    sh = x.sharding
    if isinstance(sh, jax.sharding.NamedSharding):
      return jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(None, *sh.spec))
    return sh

  return jax.tree.map(of, state)


def stack_states(run, states):
  """K per-point states -> one stacked state placed on
  :func:`stacked_shardings` (the vmapped step's input and output shardings,
  so its first call's program is the only one)."""
  return jax.device_put(_stack(states), stacked_shardings(run.state))


def _index(tree, k: int):
  return jax.tree.map(lambda x: x[k], tree)


def build_vmapped(configs, workdirs, names=None):
  """Resolves every point, builds the shared run once (weights, teacher,
  tokenizer; :func:`train.build_run` without compiling its single-point
  step) and the vmapped step. Returns ``(run, points, plan, vstep, point_values)``."""
  names = list(names or [os.path.basename(os.path.normpath(w)) for w in workdirs])
  if len(configs) != len(workdirs):
    raise ValueError("one workdir per point")
  # $WORKDIR is each point's own; a preparer's assets (config.prepare) are
  # made once, under the first point's workdir, and shared.
  first = os.path.abspath(workdirs[0])
  resolved = [
    train_lib.resolve_config(configs_lib.expand_workdir(c, os.path.abspath(w)), first)
    for c, w in zip(configs, workdirs)
  ]
  # $WORKDIR expansion differs per point by design: compare the loaded configs.
  plan = plan_sweep(configs, names)
  base = shared_config(resolved[0], plan)
  run = train_lib.build_run(base, compile_phases=False)
  if run.settings.cold_start.steps:
    raise ValueError("vmapped sweep: config.cold_start is not supported (one phase only)")
  points = [
    Point(n, os.path.abspath(w), c, train_lib.settings_of(shared_config(c, plan, k)))
    for k, (n, w, c) in enumerate(zip(names, workdirs, resolved))
  ]
  lr0 = run.settings.optimizer.lr
  point_values = {t: jnp.asarray(plan.values[t], jnp.float32) for t in plan.targets}
  if "optimizer.lr" in plan.values:
    point_values["lr_scale"] = jnp.asarray(
      [v / lr0 for v in plan.values["optimizer.lr"]], jnp.float32
    )
  single = vmappable_step(run)

  shardings = stacked_shardings(run.state)

  def vstep(states, teacher, batches, values):
    return jax.vmap(lambda s, b, v: single.step_fn(s, teacher, b, v), axis_name=POINTS_AXIS)(
      states, batches, values
    )

  # The states go in and come out on the same shardings (stack_states places
  # the first ones there): one compiled program, however the outputs would
  # otherwise be normalised (on a 1-device mesh XLA reports every spec as P()).
  jitted = jax.jit(
    vstep,
    donate_argnums=(0,),
    in_shardings=(shardings, None, None, None),
    out_shardings=(shardings, None),
  )
  jitted.trace_count, jitted.token_metric_names = single.trace_count, single.token_metric_names
  # The phase's step is the vmapped program's (its metric names and trace count).
  phases = {**run.phases, "opd": dataclasses.replace(run.phases["opd"], fn=single)}
  return dataclasses.replace(run, phases=phases), points, plan, jitted, point_values


POINTS_AXIS = "points"


def vmappable_step(run):
  """The run's OPD step (``make_opd_step``: ``.step_fn`` is the function to
  vmap, ``.trace_count`` / ``.token_metric_names`` as usual) with its
  samplers' decode loops in lockstep over the points
  (``SamplingConfig.loop_axis_name``)."""
  phase = run.phases["opd"]
  lockstep = lambda sc: None if sc is None else dataclasses.replace(sc, loop_axis_name=POINTS_AXIS)
  cfg = dataclasses.replace(
    phase.cfg,
    sampling=lockstep(phase.cfg.sampling),
    teacher_sampling=lockstep(phase.cfg.teacher_sampling),
  )
  fn = make_opd_step(
    run.student_graphdef,
    run.teacher_graphdef,
    run.tx,
    run.schedule,
    cfg,
    vocab_size=run.vocab,
    sharder=run.sharder,
    state_shardings=run.state_shardings,
  )
  return fn


def initial_states(run, points):
  """K copies of the run's initial state, each with its point's RNG."""
  states = [dataclasses.replace(run.state, rng=jax.random.PRNGKey(p.settings.seed)) for p in points]
  return stack_states(run, states)


def train_vmapped(
  configs: Sequence[ml_collections.ConfigDict], workdirs: Sequence[str], names=None
) -> list[dict[str, Any]]:
  """Trains (or resumes) every point of the sweep in one program; returns
  each point's final logged metrics (``status``, ``trace_count`` as
  :func:`train.train`)."""
  run, points, plan, vstep, values = build_vmapped(configs, workdirs, names)
  s, k_points = run.settings, len(points)
  is_main = jax.process_index() == 0
  iters = [train_lib.build_data(p.settings, run.tokenizer)[1] for p in points]
  for p in points:
    train_lib.save_config(p.config, p.workdir)
  ckpts = [
    checkpointing.Checkpointer(
      os.path.join(p.workdir, "checkpoints"),
      save_every=s.checkpoint_every,
      max_to_keep=s.keep_checkpoints,
    )
    for p in points
  ]
  # --- Restore: the newest step every point has.
  states, start = initial_states(run, points), 0
  abstract = checkpointing.abstract_like(run.state)
  common = set.intersection(*(set(c.manager.all_steps()) for c in ckpts))
  if common:
    start = max(common)
    restored = [c.restore(abstract, start) for c in ckpts]
    states = stack_states(run, [r[0] for r in restored])
    for it, r in zip(iters, restored):
      restore_iterator_state(it, r[1]["opd"])
  writers = [MetricWriter(p.workdir) for p in points]
  for w in writers:
    w.truncate_after(start if start else -1)
    if is_main and start == 0:
      w.write(0, {f"data/{k}": v for k, v in run.data_stats.items()})
  from tqdm import tqdm

  bar = tqdm(
    total=s.total_steps,
    initial=start,
    disable=not (is_main and s.progress_bar),
    desc=f"opd x{k_points} (vmap)",
    dynamic_ncols=True,
  )
  phase, last = run.phases["opd"], [{"step": start} for _ in points]
  preempt, t_prev = checkpointing.PreemptionFlag(), time.time()
  status = "finished"
  try:
    for step in range(start + 1, s.total_steps + 1):
      batches = _stack(
        [train_lib.global_batch(next(it), run.sharder, s.batch_size) for it in iters]
      )
      t0 = time.time()
      states, metrics = vstep(states, phase.teacher, batches, values)
      metrics = jax.device_get(metrics)  # every point's, in one transfer
      now = time.time()
      if step == start + 1:
        compile_s = now - t0  # the first call compiles the vmapped program
      dt, t_prev = now - t_prev, now
      evals = s.evals and ((s.eval_every and step % s.eval_every == 0) or step == s.total_steps)
      save = ckpts[0].should_save(step) or step == s.total_steps or preempt.requested()
      host = [
        train_lib.step_metrics(run, phase, _index(metrics, k), dt, None) for k in range(k_points)
      ]
      for k, (p, m) in enumerate(zip(points, host)):
        m["points_per_program"] = float(k_points)
        if step == start + 1:
          m["compile_time_s"] = compile_s
        if evals:
          m.update(
            train_lib.run_evals(
              p.settings, run.evals, run.student(_index(states, k)), run.tokenizer
            )
          )
        if step % s.log_every == 0 or step == s.total_steps or evals:
          writers[k].write(step, m)
        if save and not m.get("nonfinite_in_a_row", 0):
          ckpts[k].save(
            step,
            _index(states, k),
            {"opd": save_iterator_state(iters[k])},
            {"step": step, "time": time.time(), "point": p.name},
            force=True,
          )
        last[k] = {"step": step, **m}
      bar.update(1)
      bar.set_postfix(loss="/".join(f"{m['loss']:.3f}" for m in host), refresh=False)
      if preempt.requested():
        status = "preempted"
        break
  finally:
    bar.close()
    preempt.restore_handler()
    for c in ckpts:
      c.close()
    for w in writers:
      w.close()
  # Programs compiled for the vmapped step (1: no recompilation after the
  # first call, e.g. from inputs placed differently from its outputs).
  compiles = vstep._cache_size()
  return [
    {**m, "status": status, "trace_count": vstep.trace_count(), "compile_count": compiles}
    for m in last
  ]
