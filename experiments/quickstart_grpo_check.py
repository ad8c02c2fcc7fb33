"""OPD + outcome reward on quickstart-sized organisms (issue #16): runs

  python -m opd_jax.train --config=configs/quickstart_grpo.py:alpha=A,<args> \
    --workdir=<root>/alpha_A

for each α (the organisms are made once, in the first run's workdir, and
linked into the others; ``--assets`` links an existing assets dir instead)
and prints, per α, the outcome reward (share of correct samples: the
verifier's, inside the step) and the share of GRPO groups with zero reward
variance, each averaged over the first and the last ``--window`` steps, and
the greedy level-3 accuracy at the first and last eval. α = 0 is the same
run without the outcome term.

Claim checked (exit 1 otherwise): for every α > 0 the outcome reward of the
last window is above the first window's.

  python experiments/quickstart_grpo_check.py --alphas=1,0 [--args=steps=80] [--keep=DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def result_of(workdir: str, window: int) -> dict:
  """Window means of the outcome metrics and the first / last greedy eval."""
  steps, evals = [], []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line) if line.strip() else {}
      if "outcome/reward_mean" in r:
        steps.append(r)
      if "eval/hard/accuracy" in r:
        evals.append(r["eval/hard/accuracy"])
  mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
  first, last = steps[:window], steps[-window:]
  return dict(
    steps=len(steps),
    reward=(mean(first, "outcome/reward_mean"), mean(last, "outcome/reward_mean")),
    zero_var=(
      mean(first, "outcome/zero_variance_groups"),
      mean(last, "outcome/zero_variance_groups"),
    ),
    acc=(evals[0], evals[-1]),
  )


def run(alpha: float, root: str, args: str, window: int, assets: str | None, extra) -> dict:
  workdir = os.path.join(root, f"alpha_{alpha:g}")
  os.makedirs(workdir, exist_ok=True)
  if assets and not os.path.exists(os.path.join(workdir, "assets")):
    os.symlink(assets, os.path.join(workdir, "assets"))
  arg = ",".join(filter(None, [f"alpha={alpha}", args]))
  cmd = [sys.executable, "-m", "opd_jax.train", f"--config=configs/quickstart_grpo.py:{arg}"]
  cmd += [f"--workdir={workdir}", "--config.progress_bar=False", *extra]
  t0 = time.time()
  with open(os.path.join(root, f"alpha_{alpha:g}.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(f"alpha {alpha}: the run failed (rc {proc.returncode}); see {log.name}")
  return dict(alpha=alpha, workdir=workdir, wall_s=time.time() - t0, **result_of(workdir, window))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--alphas", default="1,0")
  parser.add_argument("--args", default="", help="more config args (steps=100,lr=1e-3)")
  parser.add_argument("--window", type=int, default=20, help="steps averaged at start / end")
  parser.add_argument("--keep", default="", help="run under this dir (default: a temp dir)")
  parser.add_argument("--assets", default="", help="an assets dir to reuse (linked into each)")
  parser.add_argument("overrides", nargs="*", help="more driver flags (--config.X=Y)")
  a = parser.parse_args()
  root = a.keep or tempfile.mkdtemp(prefix="quickstart_grpo_check_")
  os.makedirs(root, exist_ok=True)
  print(f"runs under {root}; outcome metrics averaged over the first / last {a.window} steps")
  print(
    "| α | outcome reward first → last | zero-variance groups first → last "
    "| greedy level 3 start → end | wall s |"
  )
  print("|---|---|---|---|---|", flush=True)
  rows, assets = [], os.path.abspath(a.assets) if a.assets else None
  for alpha in [float(x) for x in a.alphas.split(",") if x]:
    r = run(alpha, root, a.args, a.window, assets, a.overrides)
    assets = assets or os.path.join(r["workdir"], "assets")
    rows.append(r)
    (r0, r1), (z0, z1), (e0, e1) = r["reward"], r["zero_var"], r["acc"]
    print(
      f"| {alpha:g} | {r0:.3f} → {r1:.3f} | {100 * z0:.0f}% → {100 * z1:.0f}% "
      f"| {100 * e0:.1f}% → {100 * e1:.1f}% | {r['wall_s']:.0f} |",
      flush=True,
    )
  ok = all(r["reward"][1] > r["reward"][0] for r in rows if r["alpha"] > 0)
  print(f"claim {'HOLDS' if ok else 'FAILS'}: the outcome reward rises for every α > 0")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
