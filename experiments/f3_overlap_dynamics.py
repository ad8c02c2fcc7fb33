"""Finding 3 (paper Fig. 1 right): the top-k overlap ratio |S_t ∩ T_t| / k
(Eq. 6, k = 16, averaged over student-generated tokens) rises during a
successful OPD run (from teacher_new) and stays flat or falls in failing ones
(teacher_same, teacher_b). Reads the runs of findings 1 and 2.

  python experiments/f3_overlap_dynamics.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import repro_lib as R

TEACHERS = ("teacher_new", "teacher_same", "teacher_b")


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each teacher per seed."""
  return [dict(teacher=t, seed=s) for t in TEACHERS for s in m.seeds]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  out = {"teachers": {}}
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for teacher in TEACHERS:
    runs = [R.run_opd(workdir, smoke, teacher=teacher, seed=s) for s in R.seeds_of(m)]
    start = [R.window_mean(r, "overlap_ratio", 0.0, 0.1) for r in runs]
    end = [R.window_mean(r, "overlap_ratio", 0.9, 1.0) for r in runs]
    out["teachers"][teacher] = {
      "overlap_ratio_start": R.mean_std(start),
      "overlap_ratio_end": R.mean_std(end),
      "change": R.mean_std([b - a for a, b in zip(start, end)]),
    }
    R.curve_band(
      ax,
      [R.metric_curve(r, "overlap_ratio") for r in runs],
      R.COLORS[teacher],
      f"from {teacher}",
      window=10,
    )
  ax.set_xlabel("OPD step")
  ax.set_ylabel("overlap ratio |S∩T|/16 (10-step mean)")
  ax.set_title("Top-16 overlap ratio over training")
  ax.legend(fontsize=7)
  out["window"] = "first and last 10% of OPD steps"
  R.save(workdir, "f3_overlap_dynamics", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
