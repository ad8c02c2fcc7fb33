"""Finding 6: off-policy cold start. SFT the student on verified teacher_b
rollouts (``cold_start`` steps; rollouts rejection-filtered by answer
correctness, as in the paper), then OPD from teacher_b for the same number of
OPD steps as the plain run of finding 2. Compares the hard-level accuracy of
plain OPD from teacher_b, the cold-start checkpoint (end of SFT) and cold
start + OPD.

  python experiments/f6_cold_start.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import repro_lib as R

TEACHER = "teacher_b"


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: plain OPD and cold
  start + OPD from teacher_b, per seed."""
  n = m.cold_start_steps
  return [dict(teacher=TEACHER, seed=s) for s in m.seeds] + [
    dict(teacher=TEACHER, seed=s, cold_start=n, steps=m.opd_steps + n) for s in m.seeds
  ]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  orgs = R.organisms_table(workdir)
  n = m.cold_start_steps
  plain = [R.run_opd(workdir, smoke, teacher=TEACHER, seed=s) for s in R.seeds_of(m)]
  cold = [
    R.run_opd(workdir, smoke, teacher=TEACHER, seed=s, cold_start=n, steps=m.opd_steps + n)
    for s in R.seeds_of(m)
  ]
  out = {
    "teacher": TEACHER,
    "teacher_hard_accuracy": orgs[TEACHER]["hard"],
    "cold_start_steps": n,
    "opd_steps": m.opd_steps,
    "cold_runs": cold,
    "plain_runs": plain,
  }
  for label, runs, at in (
    ("plain_opd", plain, m.opd_steps),
    ("after_sft", cold, n),
    ("cold_start_then_opd", cold, n + m.opd_steps),
  ):
    evals = [R.final_eval_at(r, at) for r in runs]
    out[label] = {
      "hard": R.mean_std([R.level_mean(e, m.hard) for e in evals]),
      "easy": R.mean_std([R.level_mean(e, m.easy) for e in evals]),
    }
  out["overlap_ratio_opd_start"] = {
    "plain": R.mean_std([R.window_mean(r, "overlap_ratio", 0, 0.1) for r in plain]),
    "cold_start": R.mean_std([R.window_mean(r, "overlap_ratio", 0, 0.1) for r in cold]),
  }

  import matplotlib.pyplot as plt

  fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.3))
  R.curve_band(ax, [R.accuracy_curve(r, m.hard) for r in plain], "tab:red", "plain OPD")
  shifted = []
  for r in cold:
    steps, acc = R.accuracy_curve(r, m.hard)
    shifted.append(([s - n for s in steps], acc))
  R.curve_band(ax, shifted, "tab:purple", "cold start (SFT), then OPD")
  ax.axvline(0, color="k", lw=0.8)
  ax.axhline(orgs[TEACHER]["hard"], color="tab:red", ls="--", lw=1, label="teacher_b itself")
  ax.set_xlabel("OPD step (cold-start SFT steps < 0)")
  ax.set_ylabel(f"accuracy, hard levels {list(m.hard)}")
  ax.legend(fontsize=7)
  R.curve_band(
    bx, [R.metric_curve(r, "overlap_ratio") for r in plain], "tab:red", "plain OPD", window=10
  )
  R.curve_band(
    bx,
    [R.metric_curve(r, "overlap_ratio") for r in cold],
    "tab:purple",
    "after cold start",
    window=10,
  )
  bx.set_xlabel("step")
  bx.set_ylabel("overlap ratio (10-step mean)")
  bx.legend(fontsize=7)
  fig.suptitle("Off-policy cold start recovers OPD from an incompatible teacher?")
  R.save(workdir, "f6_cold_start", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
