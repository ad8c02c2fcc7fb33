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

import json
import sys
import time
from typing import Any

import jax

from opd_jax import flops as flops_lib
from opd_jax import train as train_lib

GIB = 2**30


def lower_abstract(
  config,
  *,
  vocab_size: int | None = None,
  eos_ids: tuple[int, ...] = (),
  pad_id: int = 0,
  compile: bool = False,
  num_layers: int = 0,
):
  """Builds, shards and lowers the OPD step from ``config.json`` files alone
  (``train.build_run(config, abstract=True)``).

  No weights, tokenizer or data are read: parameters, optimizer state and the
  batch are ``jax.ShapeDtypeStruct`` s carrying their shardings. Returns the
  ``jax.stages.Lowered`` (or ``Compiled`` with ``compile=True``); used to
  check paper-scale configs on a simulated mesh.
  """
  run = train_lib.build_run(
    config,
    abstract=True,
    num_layers=num_layers,
    vocab_size=vocab_size,
    eos_ids=eos_ids,
    pad_id=pad_id,
  )
  phase = run.phases["opd"]
  lowered = phase.fn.lower(*phase.args(run.state))
  return lowered.compile() if compile else lowered


def xla_flops(compiled) -> float | None:
  """XLA's cost-analysis FLOPs of ``compiled`` (None when it has none); a
  loop's body counts once."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  return float(ca["flops"]) if ca and ca.get("flops") is not None else None


def _as_tuple(x) -> tuple:
  """A multi-teacher run's teacher configs (a tuple) or the one teacher's."""
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def report(config, *, num_layers: int = 0) -> dict[str, Any]:
  """Compiles the abstract step; its per-device memory, model FLOPs, shape."""
  t0 = time.perf_counter()
  run = train_lib.build_run(config, abstract=True, num_layers=num_layers)
  phase = run.phases["opd"]
  lowered = phase.fn.lower(*phase.args(run.state))
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  m = compiled.memory_analysis()
  arg, out, temp, alias = (
    int(m.argument_size_in_bytes),
    int(m.output_size_in_bytes),
    int(m.temp_size_in_bytes),
    int(m.alias_size_in_bytes),
  )
  total = arg + temp + out - alias
  b, p = phase.batch["prompt_ids"].shape
  fl = flops_lib.step_flops(
    phase.cfg,
    run.student_cfg,
    run.teacher_cfg,
    batch_size=int(b),
    prompt_len=int(p),
    vocab=run.vocab,
  )
  mesh, sampling = run.sharder.mesh, phase.cfg.sampling
  n_dev = mesh.size if mesh is not None else 1
  return dict(
    argument_bytes=arg,
    output_bytes=out,
    temp_bytes=temp,
    alias_bytes=alias,
    total_bytes=total,
    total_gib=round(total / GIB, 3),
    generated_code_bytes=int(m.generated_code_size_in_bytes),
    lower_s=round(t1 - t0, 2),
    compile_s=round(t2 - t1, 2),
    flops_per_step=fl["total"],
    flops_per_device=fl["total"] / n_dev,
    flops_sampling=fl["sampling"],
    flops_teacher=fl["teacher"],
    flops_student_fwd_bwd=fl["student_fwd_bwd"],
    xla_flops_per_device=xla_flops(compiled),  # counts each loop body once
    devices=n_dev,
    mesh=dict(mesh.shape) if mesh is not None else {},
    batch_size=int(b),
    num_samples=sampling.num_samples,
    rows=int(b) * sampling.num_samples,
    prompt_len=int(p),
    new_tokens=sampling.max_new_tokens,
    micro_batches=phase.cfg.micro_batches,
    student_layers=run.student_cfg.num_layers,
    teacher_layers=max(
      (c.num_layers for c in _as_tuple(run.teacher_cfg) if c is not None), default=0
    ),
    vocab=run.vocab,
    loss=phase.cfg.loss,
    remat=run.student_cfg.remat,
    param_dtype=run.student_cfg.param_dtype,
    dtype=run.student_cfg.dtype,
  )


def over_budget(rep: dict[str, Any], budget_gib: float) -> str | None:
  """The message when ``rep['total_bytes']`` exceeds ``budget_gib`` GiB (else None)."""
  if budget_gib <= 0 or rep["total_bytes"] <= budget_gib * GIB:
    return None
  parts = ", ".join(
    f"{k} {rep[k + '_bytes'] / GIB:.3f}" for k in ("argument", "temp", "output", "alias")
  )
  return (
    f"over budget: total {rep['total_bytes'] / GIB:.3f} GiB per device > "
    f"--budget_gib={budget_gib:g} (GiB: {parts}; total = argument + temp + output "
    "- alias)"
  )


def main(argv):
  del argv
  from absl import flags

  fl = flags.FLAGS
  # Before any device use: N simulated CPU devices.
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", fl.devices)
  rep = report(fl.config, num_layers=fl.num_layers)
  print(json.dumps(rep), flush=True)
  msg = over_budget(rep, fl.budget_gib)
  if msg:
    print(msg, file=sys.stderr, flush=True)
    sys.exit(1)


def run():
  from absl import app, flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file(
    "config", None, "config file (get_config(arg)), as for opd_jax.train", lock_config=True
  )
  flags.DEFINE_integer("devices", 8, "number of simulated CPU devices")
  flags.DEFINE_integer("num_layers", 0, "depth of both models (0: their config.json's)")
  flags.DEFINE_float(
    "budget_gib", 0.0, "exit 1 when total_bytes per device exceeds this (0: no budget)"
  )
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  run()
