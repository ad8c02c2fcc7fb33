"""Ahead-of-time check of a run's step: memory and FLOPs, no weights, no data.

    python -m opd_jax.aot --config=configs/<name>.py[:arg=value,...] \
        [--config.<key>=<value> ...] --devices=N [--num_layers=L] [--budget_gib=G]

The config (file, argument and overrides) is exactly what ``opd_jax.train``
takes. The step is built from the models' ``config.json`` files alone, sharded
over ``N`` simulated CPU devices (``jax_num_cpu_devices``), lowered and
compiled; no weights, tokenizer or data are read. Prints one JSON line with the
per-device sizes XLA's buffer assignment reports (``argument_bytes``,
``output_bytes``, ``temp_bytes``, ``alias_bytes``, and ``total_bytes =
argument + temp + output - alias``: outputs aliased to donated arguments are
not counted twice), ``compile_s``, the analytic model FLOPs of one step
(:mod:`opd_jax.flops`) and the run's shape (mesh, rows, lengths).

``--num_layers=L`` (0: the ``config.json`` depth) gives both models L layers:
a quick check of everything but depth (CI). ``--budget_gib=G`` exits with
status 1 and a message when ``total_bytes`` exceeds G GiB per device.
Buffer sizes come from XLA:CPU's compiler; an accelerator's compiler may lay
out and fuse differently, so treat them as an estimate of the same program.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from opd_jax import flops as flops_lib
from opd_jax import train as train_lib
from opd_jax.opd_step import TrainState, make_opd_step, optimizer_shardings
from opd_jax.sharding import Sharder

GIB = 2 ** 30


def _spec(x, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_params(cfg, sharder: Sharder):
  """``(graphdef, params, shardings)`` of a model: ``params`` are sharded
  ``ShapeDtypeStruct`` s (no memory)."""
  from opd_jax.models import abstract_model
  graphdef, state = nnx.split(abstract_model(cfg, sharder))
  shardings = sharder.tree_shardings(state)
  return graphdef, jax.tree.map(_spec, state, shardings), shardings


def abstract_train_state(tx, params, param_shardings, sharder: Sharder):
  """``(state, state_shardings)``: the :class:`TrainState` of abstract
  ``params`` (moments follow their parameters, ``optimizer_shardings``)."""
  rep = sharder.replicated()
  opt_shard = optimizer_shardings(tx, params, param_shardings, rep)
  opt_state = jax.tree.map(_spec, jax.eval_shape(tx.init, params), opt_shard)
  scalar = lambda dt, shape=(): jax.ShapeDtypeStruct(shape, dt, sharding=rep)
  state = TrainState(step=scalar(jnp.int32), params=params, opt_state=opt_state,
                     rng=scalar(jnp.uint32, (2,)))
  return state, TrainState(step=rep, params=param_shardings, opt_state=opt_shard, rng=rep)


@dataclasses.dataclass(frozen=True)
class AbstractStep:
  """The OPD phase's step of a config, with abstract arguments."""
  sharder: Sharder
  student_cfg: Any            # ModelConfig
  teacher_cfg: Any            # ModelConfig, or None (no teacher pass)
  vocab: int
  step_cfg: Any               # OPDConfig
  step_fn: Any                # jitted step(state, teacher_params, batch)
  args: tuple                 # (state, teacher_params, batch) as ShapeDtypeStructs

  def lower(self) -> jax.stages.Lowered:
    return self.step_fn.lower(*self.args)

  def flops(self) -> dict[str, int]:
    """Analytic model FLOPs of one step, all devices (``flops.step_flops``)."""
    batch = self.args[2]
    return flops_lib.step_flops(self.step_cfg, self.student_cfg, self.teacher_cfg,
                                batch_size=batch["prompt_ids"].shape[0],
                                prompt_len=batch["prompt_ids"].shape[1], vocab=self.vocab)


def build_abstract_step(config, *, vocab_size: int | None = None,
                        eos_ids: tuple[int, ...] = (), pad_id: int = 0,
                        num_layers: int = 0) -> AbstractStep:
  """The driver's set-up (``opd_jax.train``'s shared pieces) on abstract
  parameters, optimizer state and batch. ``vocab_size`` stands in for the
  tokenizer's size (default: the models' common vocabulary), ``eos_ids`` for
  the tokenizer's (default: the student's ``config.json``)."""
  sharder = train_lib.make_sharder(config)
  s_cfg = train_lib.model_config_of(config, "student", num_layers=num_layers)
  t_cfg = (train_lib.model_config_of(config, "teacher", num_layers=num_layers)
           if train_lib.needs_teacher(config) else None)
  train_lib.check_lengths(config, s_cfg, t_cfg)
  vocab = vocab_size or train_lib.vocab_of(s_cfg, t_cfg)
  s_graphdef, s_params, s_shard = abstract_params(s_cfg, sharder)
  t_graphdef = t_params = t_shard = None
  if t_cfg is not None:
    t_graphdef, t_params, t_shard = abstract_params(t_cfg, sharder)
  sampling = train_lib.sampling_config(config, eos_ids=eos_ids or s_cfg.eos_token_ids,
                                       pad_id=pad_id)
  step_cfg = train_lib.opd_config(config, sampling)
  tx, schedule = train_lib.make_optimizer(config)
  state, state_shardings = abstract_train_state(tx, s_params, s_shard, sharder)
  batch = train_lib.batch_specs(config, sharder)
  step_fn = make_opd_step(
      s_graphdef, t_graphdef, tx, schedule, step_cfg, vocab_size=vocab, sharder=sharder,
      state_shardings=state_shardings, teacher_shardings=t_shard,
      batch_shardings={k: v.sharding for k, v in batch.items()})
  return AbstractStep(sharder=sharder, student_cfg=s_cfg, teacher_cfg=t_cfg, vocab=vocab,
                      step_cfg=step_cfg, step_fn=step_fn, args=(state, t_params, batch))


def lower_abstract(config, *, vocab_size: int | None = None, eos_ids: tuple[int, ...] = (),
                   pad_id: int = 0, compile: bool = False, num_layers: int = 0):
  """Builds, shards and lowers the step from ``config.json`` files alone.

  No weights, tokenizer or data are read: parameters, optimizer state and the
  batch are ``jax.ShapeDtypeStruct`` s carrying their shardings. Returns the
  ``jax.stages.Lowered`` (or ``Compiled`` with ``compile=True``); used to
  check paper-scale configs on a simulated mesh.
  """
  lowered = build_abstract_step(config, vocab_size=vocab_size, eos_ids=eos_ids,
                                pad_id=pad_id, num_layers=num_layers).lower()
  return lowered.compile() if compile else lowered


def _xla_flops(compiled) -> float | None:
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and ca.get("flops") is not None else None


def report(config, *, num_layers: int = 0) -> dict[str, Any]:
  """Compiles the abstract step; its per-device memory, model FLOPs, shape."""
  t0 = time.perf_counter()
  step = build_abstract_step(config, num_layers=num_layers)
  lowered = step.lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  arg, out, temp, alias = (int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                           int(m.temp_size_in_bytes), int(m.alias_size_in_bytes))
  total = arg + temp + out - alias
  fl = step.flops()
  mesh = step.sharder.mesh
  batch = step.args[2]
  b, p = batch["prompt_ids"].shape
  n_dev = mesh.size if mesh is not None else 1
  return dict(
      argument_bytes=arg, output_bytes=out, temp_bytes=temp, alias_bytes=alias,
      total_bytes=total, total_gib=round(total / GIB, 3),
      generated_code_bytes=int(m.generated_code_size_in_bytes),
      lower_s=round(t1 - t0, 2), compile_s=round(t2 - t1, 2),
      flops_per_step=fl["total"], flops_per_device=fl["total"] / n_dev,
      flops_sampling=fl["sampling"], flops_teacher=fl["teacher"],
      flops_student_fwd_bwd=fl["student_fwd_bwd"],
      xla_flops_per_device=_xla_flops(compiled),   # counts each loop body once
      devices=n_dev, mesh=dict(mesh.shape) if mesh is not None else {},
      batch_size=int(b), num_samples=step.step_cfg.sampling.num_samples,
      rows=int(b) * step.step_cfg.sampling.num_samples, prompt_len=int(p),
      new_tokens=step.step_cfg.sampling.max_new_tokens,
      micro_batches=int(config.get("micro_batches", 1)),
      student_layers=step.student_cfg.num_layers,
      teacher_layers=step.teacher_cfg.num_layers if step.teacher_cfg is not None else 0,
      vocab=step.vocab, loss=step.step_cfg.loss, remat=bool(step.student_cfg.remat),
      param_dtype=step.student_cfg.param_dtype, dtype=step.student_cfg.dtype)


def over_budget(rep: dict[str, Any], budget_gib: float) -> str | None:
  """The message when ``rep['total_bytes']`` exceeds ``budget_gib`` GiB (else None)."""
  if budget_gib <= 0 or rep["total_bytes"] <= budget_gib * GIB:
    return None
  parts = ", ".join(f"{k} {rep[k + '_bytes'] / GIB:.3f}"
                    for k in ("argument", "temp", "output", "alias"))
  return (f"over budget: total {rep['total_bytes'] / GIB:.3f} GiB per device > "
          f"--budget_gib={budget_gib:g} (GiB: {parts}; total = argument + temp + output "
          "- alias)")


def main(argv):
  del argv
  from absl import flags
  fl = flags.FLAGS
  # Before any device use: N simulated CPU devices.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", int(fl.devices))
  rep = report(fl.config, num_layers=int(fl.num_layers))
  print(json.dumps(rep), flush=True)
  msg = over_budget(rep, float(fl.budget_gib))
  if msg:
    print(msg, file=sys.stderr, flush=True)
    sys.exit(1)


def run():
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "config file (get_config(arg)), as for "
                                  "opd_jax.train", lock_config=True)
  flags.DEFINE_integer("devices", 8, "number of simulated CPU devices")
  flags.DEFINE_integer("num_layers", 0, "depth of both models (0: their config.json's)")
  flags.DEFINE_float("budget_gib", 0.0, "exit 1 when total_bytes per device exceeds this "
                     "(0: no budget)")
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
