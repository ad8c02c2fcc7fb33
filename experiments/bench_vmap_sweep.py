"""K sweep points in one vmapped program vs the same K points run one after
another (as K separate runs would), side by side in one process.

  PYTHONPATH=. python experiments/bench_vmap_sweep.py [--preset small] [--points 4]
      [--steps 8] [--threads 0|1]
  PYTHONPATH=. python experiments/bench_vmap_sweep.py --end-to-end
      [--sweep configs/sweeps/vmap_quickstart.py] [--total-steps 150] [--repeats 1]

``--end-to-end`` times what a user runs: the sweep file's K runs as K
sequential processes (``experiments/sweep.py --run``, each ``opd_jax.train``
run paying its start-up, loading, compiles, evals and checkpoints) vs the same
file with ``--vmap`` (one process, one program), alternating, on assets made
once beforehand and shared (each point's ``assets`` is a link to them, so no
run trains organisms inside the timing); throughput = point-steps per wall
second of the whole sweep, and the steady-state step of each side
(median logged ``step_time_s`` after the first 5 steps) beside it.

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
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

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
  ap.add_argument("--end-to-end", action="store_true", help="K processes vs one (a sweep file)")
  ap.add_argument("--sweep", default="configs/sweeps/vmap_quickstart.py")
  ap.add_argument("--total-steps", type=int, default=0, help="0: the sweep's own")
  ap.add_argument("--repeats", type=int, default=1, help="end-to-end: sweeps of each side")
  ap.add_argument("--root", default="", help="end-to-end: keep the runs here")
  args = ap.parse_args(argv)
  if args.end_to_end:
    return end_to_end(args)
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


def end_to_end(args):
  """The sweep file run as K processes vs one vmapped process (module doc)."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import sweep as sweep_lib

  root = os.path.abspath(args.root or tempfile.mkdtemp(prefix="bench_vmap_e2e_"))
  extra = [f"--config.total_steps={args.total_steps}"] if args.total_steps else []
  extra.append("--config.progress_bar=false")
  configs, _, names = sweep_lib.point_configs(args.sweep, root, extra)
  # --- Assets once (a preparer's: tokenizer, data, organisms), outside the timing.
  shared = os.path.join(root, "shared_assets_run")
  t0 = time.time()
  train_lib.resolve_config(configs[0], shared)
  print(f"assets made once in {time.time() - t0:.0f} s under {shared}/assets", flush=True)
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")]))
  steps = configs[0].total_steps
  k = len(names)

  def one_sweep(vmap: bool, rep: int) -> dict:
    sub = os.path.join(root, f"{'vmap' if vmap else 'seq'}{rep}")
    for name in names:  # every point reuses the shared assets
      os.makedirs(os.path.join(sub, name), exist_ok=True)
      os.symlink(os.path.join(shared, "assets"), os.path.join(sub, name, "assets"))
    cmd = [sys.executable, "experiments/sweep.py", f"--sweep={args.sweep}", f"--root={sub}"]
    cmd += ["--run"] + (["--vmap"] if vmap else []) + extra
    c0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall, c1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    step_times = []
    for name in names:
      with open(os.path.join(sub, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
      step_times += [r["step_time_s"] for r in rows if "step_time_s" in r and r["step"] > 5]
    cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    # Sequential: K runs' steps of one point each; vmapped: one step moves K points.
    per_round = float(np.median(step_times)) * (1 if vmap else k)
    return dict(wall=wall, cpu=cpu, round=per_round)

  results = {True: [], False: []}
  for rep in range(args.repeats):
    for vmap in (False, True):  # alternating: both see the same machine
      results[vmap].append(one_sweep(vmap, rep))
  print(f"machine: {bench.machine_load()}; jax {jax.__version__}")
  print(f"sweep {args.sweep}: {k} points ({', '.join(names)}), {steps} steps each")
  print(f"  {'':28s}{'wall s':>9s}{'point-steps/s':>15s}{'CPU s':>9s}{'steady s/round':>16s}")
  med = {}
  for vmap, label in ((False, f"{k} sequential processes"), (True, "1 vmapped process")):
    r = {key: float(np.median([x[key] for x in results[vmap]])) for key in ("wall", "cpu", "round")}
    med[vmap] = r
    print(
      f"  {label:28s}{r['wall']:9.1f}{k * steps / r['wall']:15.2f}{r['cpu']:9.1f}{r['round']:16.4f}"
    )
  print(
    f"  vmapped / sequential throughput: {med[False]['wall'] / med[True]['wall']:.2f}x wall "
    f"(target >= 1.5x), {med[False]['cpu'] / med[True]['cpu']:.2f}x CPU; steady-state step "
    f"{med[False]['round'] / med[True]['round']:.2f}x; {args.repeats} sweep(s) of each, medians"
  )
  if not args.root:
    shutil.rmtree(root, ignore_errors=True)
  return med


if __name__ == "__main__":
  np.set_printoptions(precision=4)
  main()
