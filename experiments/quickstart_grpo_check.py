"""OPD + outcome reward on the quickstart's organisms (issue #16; its teacher
at 600 SFT steps): for each seed and each α runs

  python -m opd_jax.train --config=configs/quickstart_grpo.py:seed=S,alpha=A,<args> \
    --workdir=<root>/seed_S/alpha_A

(a seed's organisms are made once, in its first run's workdir, and linked
into its other runs; ``--assets`` links existing assets dirs instead, with
``{seed}`` replaced by the seed: made by the same preparer, since the default
``organisms=quickstart_teacher600`` has a longer-trained teacher than the
quickstart's own assets) and prints, per seed and α, the outcome
reward (share of correct samples: the verifier's, inside the step) and the
share of GRPO groups with zero reward variance, each averaged over the first
and the last ``--window`` steps, and the greedy level-3 accuracy at the first
and last eval. α = 0 is the same run without the outcome term (same seed:
same organisms, prompts and first samples). With ``--keep`` a rerun reuses
the runs that finished there (wall s 0).

Claims checked (each printed; exit 1 unless both hold), on every seed: for
every α > 0 the outcome reward of the last window is above the first
window's; and, when α = 0 is among ``--alphas``, above α = 0's last window.

  python experiments/quickstart_grpo_check.py --seeds=0,1,2 --alphas=4,0 [--args=steps=80] \
    [--keep=DIR] [--assets=DIR/seed_{seed}/assets]
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


def finished(workdir: str) -> bool:
  """Whether ``workdir`` holds a finished run (``--keep``: a rerun skips it)."""
  paths = [os.path.join(workdir, f) for f in ("config.json", "metrics.jsonl")]
  if not all(map(os.path.exists, paths)):
    return False
  with open(paths[0]) as f:
    total = json.load(f)["total_steps"]
  with open(paths[1]) as f:
    steps = [json.loads(x).get("step", 0) for x in f if x.strip()]
  return bool(steps) and max(steps) >= total


def run(seed: int, alpha: float, root: str, args: str, window: int, assets, extra) -> dict:
  workdir = os.path.join(root, f"seed_{seed}", f"alpha_{alpha:g}")
  if finished(workdir):
    return dict(alpha=alpha, workdir=workdir, wall_s=0.0, **result_of(workdir, window))
  os.makedirs(workdir, exist_ok=True)
  if assets and not os.path.exists(os.path.join(workdir, "assets")):
    os.symlink(assets, os.path.join(workdir, "assets"))
  arg = ",".join(filter(None, [f"seed={seed}", f"alpha={alpha}", args]))
  cmd = [sys.executable, "-m", "opd_jax.train", f"--config=configs/quickstart_grpo.py:{arg}"]
  cmd += [f"--workdir={workdir}", "--config.progress_bar=False", *extra]
  t0 = time.time()
  with open(os.path.join(root, f"seed_{seed}_alpha_{alpha:g}.log"), "w") as log:
    proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise SystemExit(
      f"seed {seed}, alpha {alpha}: the run failed (rc {proc.returncode}); see {log.name}"
    )
  return dict(alpha=alpha, workdir=workdir, wall_s=time.time() - t0, **result_of(workdir, window))


def claims(rows: list[dict]) -> tuple[bool, bool]:
  """One seed's two claims: every α > 0 raises its outcome reward (last
  window > first), and every α > 0 ends above α = 0 (True when α = 0 was not
  run)."""
  pos = [r for r in rows if r["alpha"] > 0]
  base = [r["reward"][1] for r in rows if r["alpha"] == 0]
  rises = all(r["reward"][1] > r["reward"][0] for r in pos)
  above = all(r["reward"][1] > b for r in pos for b in base)
  return rises, above


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
  parser.add_argument("--alphas", default="4,0")
  parser.add_argument("--args", default="", help="more config args (steps=100,lr=1e-3)")
  parser.add_argument("--window", type=int, default=10, help="steps averaged at start / end")
  parser.add_argument("--keep", default="", help="run under this dir (default: a temp dir)")
  parser.add_argument(
    "--assets", default="", help="an assets dir to reuse (linked into each; {seed}: the seed)"
  )
  parser.add_argument("overrides", nargs="*", help="more driver flags (--config.X=Y)")
  a = parser.parse_args()
  root = a.keep or tempfile.mkdtemp(prefix="quickstart_grpo_check_")
  os.makedirs(root, exist_ok=True)
  print(f"runs under {root}; outcome metrics averaged over the first / last {a.window} steps")
  print(
    "| seed | α | outcome reward first → last | zero-variance groups first → last "
    "| greedy level 3 start → end | wall s |"
  )
  print("|---|---|---|---|---|---|", flush=True)
  all_rise = all_above = True
  for seed in [int(s) for s in a.seeds.split(",") if s]:
    rows = []
    assets = os.path.abspath(a.assets.format(seed=seed)) if a.assets else None
    for alpha in [float(x) for x in a.alphas.split(",") if x]:
      r = run(seed, alpha, root, a.args, a.window, assets, a.overrides)
      assets = assets or os.path.join(r["workdir"], "assets")
      rows.append(r)
      (r0, r1), (z0, z1), (e0, e1) = r["reward"], r["zero_var"], r["acc"]
      print(
        f"| {seed} | {alpha:g} | {r0:.3f} → {r1:.3f} | {100 * z0:.0f}% → {100 * z1:.0f}% "
        f"| {100 * e0:.1f}% → {100 * e1:.1f}% | {r['wall_s']:.0f} |",
        flush=True,
      )
    rises, above = claims(rows)
    all_rise, all_above = all_rise and rises, all_above and above
    say = lambda b: "holds" if b else "FAILS"
    print(f"seed {seed}: rises {say(rises)}; above α = 0 {say(above)}", flush=True)
  print(f"claim {'HOLDS' if all_rise else 'FAILS'}: on every seed every α > 0 raises the reward")
  print(f"claim {'HOLDS' if all_above else 'FAILS'}: on every seed every α > 0 ends above α = 0")
  return 0 if all_rise and all_above else 1


if __name__ == "__main__":
  sys.exit(main())
