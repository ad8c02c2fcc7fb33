"""Finding 5 (paper Fig. 1 middle): weak-to-strong reverse distillation. The
strong model (teacher_new: levels 1-4) is the *student*, and a weaker model is
the teacher: the student organism (easy levels, 2x128) or teacher_same (easy
levels, same size as the strong one). OPD pulls the strong student's accuracy
down toward the weak teacher's, whichever weak teacher.

  python experiments/f5_weak_to_strong.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import repro_lib as R

STRONG = "teacher_new"
WEAK = ("student", "teacher_same")


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: the strong student
  from each weak teacher, per seed."""
  return [dict(student=STRONG, teacher=w, seed=s) for w in WEAK for s in m.seeds]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  orgs = R.organisms_table(workdir)
  out = {
    "strong_student": STRONG,
    "strong_hard_accuracy": orgs[STRONG]["hard"],
    "strong_overall_accuracy": orgs[STRONG]["overall"],
    "weak_teachers": {},
  }
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for weak in WEAK:
    runs, first, last = R.seed_runs(workdir, smoke, m, student=STRONG, teacher=weak)
    before = [R.level_mean(e, m.hard) for e in first]
    after = [R.level_mean(e, m.hard) for e in last]
    out["weak_teachers"][weak] = {
      "runs": runs,
      "weak_teacher_hard_accuracy": orgs[weak]["hard"],
      "hard_before": R.mean_std(before),
      "hard_after": R.mean_std(after),
      "overall_after": R.mean_std([R.level_mean(e, m.levels) for e in last]),
      # share of the strong→weak gap the student lost (1 = fell to the teacher)
      "fall_toward_teacher": R.mean_std(
        [(b - a) / max(b - orgs[weak]["hard"], 1e-9) for b, a in zip(before, after)]
      ),
    }
    c = R.COLORS[weak]
    R.curve_band(ax, [R.accuracy_curve(r, m.hard) for r in runs], c, f"{STRONG} ← {weak}")
    ax.axhline(orgs[weak]["hard"], color=c, ls="--", lw=1)
  ax.set_xlabel("OPD step")
  ax.set_ylabel(f"strong student's accuracy, levels {list(m.hard)}")
  ax.set_title("Weak-to-strong reverse distillation\n(dashed: the weak teacher itself)", fontsize=9)
  ax.legend(fontsize=7)
  R.save(workdir, "f5_weak_to_strong", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
