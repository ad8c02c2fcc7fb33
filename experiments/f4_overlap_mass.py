"""Finding 4: in successful runs the shared top-k set S_t ∩ T_t (k = 16)
holds ≥ 97% of both models' probability mass: Σ_{S∩T} p_t (Eq. 9) and
Σ_{S∩T} q_t (Eq. 10), averaged over student-generated tokens, with each
model's own top-16 mass beside them. Reads the runs of findings 1 and 2.

  python experiments/f4_overlap_mass.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import repro_lib as R

TEACHERS = ("teacher_new", "teacher_same", "teacher_b")
KEYS = ("overlap_mass_student", "overlap_mass_teacher", "topk_mass_student", "topk_mass_teacher")


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each teacher per seed."""
  return [dict(teacher=t, seed=s) for t in TEACHERS for s in m.seeds]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  out = {"teachers": {}, "window": "last 10% of OPD steps (start: first 10%)"}
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(9, 3.3), sharey=True)
  for teacher in TEACHERS:
    runs = [R.run_opd(workdir, smoke, teacher=teacher, seed=s) for s in R.seeds_of(m)]
    row = {}
    for key in KEYS:
      row[f"{key}_start"] = R.mean_std([R.window_mean(r, key, 0.0, 0.1) for r in runs])
      row[f"{key}_end"] = R.mean_std([R.window_mean(r, key, 0.9, 1.0) for r in runs])
    out["teachers"][teacher] = row
    for ax, key in zip(axes, KEYS[:2]):
      R.curve_band(
        ax, [R.metric_curve(r, key) for r in runs], R.COLORS[teacher], f"from {teacher}", window=10
      )
  for ax, title in zip(axes, ("Σ_{S∩T} p (student mass)", "Σ_{S∩T} q (teacher mass)")):
    ax.axhline(0.97, color="k", ls=":", lw=1)
    ax.set_title(title)
    ax.set_xlabel("OPD step")
  axes[0].set_ylabel("overlap mass (10-step mean)")
  axes[0].legend(fontsize=7)
  R.save(workdir, "f4_overlap_mass", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
