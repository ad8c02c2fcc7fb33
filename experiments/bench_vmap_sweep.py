"""K sweep points in one vmapped program vs the same K points run one after
another (as K separate runs would), side by side in one process.

  PYTHONPATH=. python experiments/bench_vmap_sweep.py [--preset small] [--points 4]
      [--steps 8] [--threads 0|1]

The preset's student / teacher / prompts of ``bench_opd_step.py`` (random
checkpoints written as HF files and loaded back through ``train.build_run``);
the points differ in their learning rate. Per round: one call of the vmapped
program (all K points take a step) and K calls of the single-point compiled
step (each point takes a step), both blocked on their results, interleaved so
both see the same machine load; each side reads and places its batches inside
the timing. Throughput = point-steps per second; the
ratio is vmapped / sequential. Compile times are printed, not included.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

if __name__ == "__main__":
  _pre = argparse.ArgumentParser(add_help=False)
  _pre.add_argument("--threads", type=int, default=0)
  _ns, _ = _pre.parse_known_args()
  if _ns.threads == 1:
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    ).strip()

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_opd_step as bench  # noqa: E402

from opd_jax import configs_lib, vmap_sweep  # noqa: E402
from opd_jax import train as train_lib  # noqa: E402
from opd_jax.data import write_jsonl  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--preset", default="small", choices=sorted(bench.PRESETS))
  ap.add_argument("--points", type=int, default=4)
  ap.add_argument("--steps", type=int, default=8, help="timed rounds")
  ap.add_argument("--threads", type=int, default=0)
  ap.add_argument("--no-metrics", action="store_true")
  args = ap.parse_args(argv)
  preset = bench.PRESETS[args.preset]
  root = tempfile.mkdtemp(prefix="bench_vmap_")
  try:
    s_dir, t_dir = bench.make_checkpoints(preset, root)
    tok_dir = os.path.join(root, "tokenizer")
    bench.make_tokenizer(preset.vocab).save_pretrained(tok_dir)
    prompts_file = os.path.join(root, "prompts.jsonl")
    rows = bench.make_prompts(preset)
    write_jsonl(prompts_file, [{"prompt": " ".join(f"t{i}" for i in r)} for r in rows])
    opts = argparse.Namespace(loss_chunk=64, no_metrics=args.no_metrics, mesh="")
    base = bench.bench_config(preset, s_dir, t_dir, tok_dir, prompts_file, opts)
    lrs = [1e-6 * 3**k for k in range(args.points)]
    configs = [configs_lib.updated(base, {"optimizer.lr": lr}) for lr in lrs]
    workdirs = [os.path.join(root, f"lr{k}") for k in range(args.points)]

    t0 = bench.clock()
    run, points, _, vstep, values = vmap_sweep.build_vmapped(configs, workdirs)
    iters = [train_lib.build_data(p.settings, run.tokenizer)[1] for p in points]
    vstates = vmap_sweep.initial_states(run, points)
    phase = run.phases["opd"]

    def vbatch():
      return vmap_sweep._stack(
        [train_lib.global_batch(next(it), run.sharder, preset.batch) for it in iters]
      )

    vstates, m = vstep(vstates, phase.teacher, vbatch(), values)  # compiles
    jax.block_until_ready(m)
    v_compile = bench.clock() - t0
    t0 = bench.clock()
    single = train_lib.build_run(configs[0])
    s_compile = bench.clock() - t0
    sphase = single.phases["opd"]
    sstates = [single.state] + [
      jax.tree.map(lambda x: x.copy(), single.state) for _ in range(args.points - 1)
    ]
    v_d, s_d = [], []
    for _ in range(args.steps):
      # Both sides read and place their batches inside the timing (K points'
      # batches for the vmapped call, one per call for the sequential runs).
      t0 = bench.clock()
      vstates, m = vstep(vstates, phase.teacher, vbatch(), values)
      jax.block_until_ready(m)
      v_d.append(bench.clock() - t0)
      t0 = bench.clock()
      for k in range(args.points):
        batch = train_lib.global_batch(next(sphase.it), single.sharder, preset.batch)
        sstates[k], m = sphase.compiled(sstates[k], sphase.teacher, batch)
        jax.block_until_ready(m)
      s_d.append(bench.clock() - t0)
    v, s = bench.summarize(v_d), bench.summarize(s_d)
    k = args.points
    print(
      f"machine: {bench.machine_load()}; jax {jax.__version__}; threads "
      f"{args.threads or 'library default'}"
    )
    print(
      f"preset {preset.name}: {k} points (lr {', '.join(f'{x:g}' for x in lrs)}), "
      f"{preset.batch} prompts x {preset.new_tokens} new tokens per point-step"
    )
    print(f"  compile: vmapped {v_compile[0]:.1f} s (one program), single {s_compile[0]:.1f} s")
    print(f"  {'':34s}{'wall s/round':>13s}{'point-steps/s':>14s}{'CPU s/round':>12s}")
    for name, d in ((f"vmapped (1 call, {k} points)", v), (f"sequential ({k} calls)", s)):
      print(f"  {name:34s}{d['wall']:13.4f}{k / d['wall']:14.2f}{d['cpu']:12.4f}")
    print(
      f"  vmapped / sequential throughput: {s['wall'] / v['wall']:.2f}x wall, "
      f"{s['cpu'] / v['cpu']:.2f}x CPU time (target >= 1.5x); {args.steps} rounds, medians"
    )
    print(f"machine: {bench.machine_load()}")
    return dict(vmapped=v, sequential=s, ratio_wall=s["wall"] / v["wall"])
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
