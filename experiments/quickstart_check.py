"""Checks the README's main job over seeds: each seed runs

  python -m opd_jax.train --config=configs/quickstart.py:seed=S --workdir=<fresh temp dir>

from scratch (organisms included: the first run's cost) and prints the student's
hard-level (level 3) greedy accuracy at the start and the end of OPD, the
teacher's, the gap recovered and the run's wall and CPU (user + sys) seconds.

Gate (written before the first three-seed run, commit "quickstart_check"):
gap recovery = (end - start) / (teacher - start) >= 50% on EVERY seed, and the
wall time of each run <= 180 s on an unloaded 2-core CPU (this script prints
the load average beside the times: on a shared machine they are inflated).
The script exits 1 when the accuracy gate fails on any seed.

  python experiments/quickstart_check.py --seeds=0,1,2 [--keep=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = 0.5
EVAL = "hard"


def result_of(workdir: str) -> dict:
  """start / end / teacher accuracy of ``eval/hard`` from ``metrics.jsonl``."""
  start = end = teacher = None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if f"eval/{EVAL}/accuracy" in r:
        end = r[f"eval/{EVAL}/accuracy"]
        start = end if start is None else start
      teacher = r.get(f"teacher/eval/{EVAL}/accuracy", teacher)
  gap = (end - start) / (teacher - start) if teacher is not None and teacher > start else None
  return dict(start=start, end=end, teacher=teacher, gap=gap)


def run_seed(seed: int, root: str, extra: list[str]) -> dict:
  workdir = os.path.join(root, f"seed_{seed}")
  cmd = [
    sys.executable,
    "-m",
    "opd_jax.train",
    f"--config=configs/quickstart.py:seed={seed}",
    f"--workdir={workdir}",
    *extra,
  ]
  load = os.getloadavg()[0]
  t0, r0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(os.path.join(root, f"seed_{seed}.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  wall, r1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)  # the run's user + sys
  if proc.returncode:
    raise SystemExit(f"seed {seed}: the run failed (rc {proc.returncode}); see {log.name}")
  load = (load + os.getloadavg()[0]) / 2
  return dict(seed=seed, wall_s=wall, cpu_s=cpu, load=load, **result_of(workdir))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--keep", default="", help="run under this dir (default: a temp dir)")
  parser.add_argument("overrides", nargs="*", help="more driver flags (--config.X=Y)")
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="quickstart_check_")
  os.makedirs(root, exist_ok=True)
  print(f"runs under {root}; gate: gap recovery >= {GATE:.0%} on every seed", flush=True)
  print("| seed | start | end | teacher | gap recovered | wall s | CPU s (user+sys) | load avg |")
  print("|---|---|---|---|---|---|---|---|", flush=True)
  rows = []
  for seed in [int(s) for s in args.seeds.split(",") if s]:
    r = run_seed(seed, root, args.overrides)
    rows.append(r)
    gap = "n/a" if r["gap"] is None else f"{100 * r['gap']:.0f}%"
    print(
      f"| {seed} | {100 * r['start']:.1f}% | {100 * r['end']:.1f}% | {100 * r['teacher']:.1f}% "
      f"| {gap} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['load']:.1f} |",
      flush=True,
    )
  ok = all(r["gap"] is not None and r["gap"] >= GATE for r in rows)
  print(f"gate {'PASSED' if ok else 'FAILED'}: gap recovery >= {GATE:.0%} on every seed")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
