"""Finding 2: thinking-pattern compatibility. teacher_b solves the hard levels
(pattern B), yet OPD from it brings the pattern-A student little or nothing;
OPD from teacher_new (pattern A, same capability) does. Answers are scored by
the shared ``ans=`` line, so a switch to pattern B would count as success.

  python experiments/f2_compatibility.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import repro_lib as R

TEACHERS = ("teacher_new", "teacher_b")


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each teacher per seed."""
  return [dict(teacher=t, seed=s) for t in TEACHERS for s in m.seeds]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  orgs = R.organisms_table(workdir)
  out = {"teachers": {}}
  curves = {}
  for teacher in TEACHERS:
    runs, first, last = R.seed_runs(workdir, smoke, m, teacher=teacher)
    out["teachers"][teacher] = {
      "runs": runs,
      "teacher_hard_accuracy": orgs[teacher]["hard"],
      "teacher_easy_accuracy": orgs[teacher]["easy"],
      "hard_before": R.mean_std([R.level_mean(e, m.hard) for e in first]),
      "hard_after": R.mean_std([R.level_mean(e, m.hard) for e in last]),
      "hard_gain": R.mean_std(
        [R.level_mean(b, m.hard) - R.level_mean(a, m.hard) for a, b in zip(first, last)]
      ),
      "easy_before": R.mean_std([R.level_mean(e, m.easy) for e in first]),
      "easy_after": R.mean_std([R.level_mean(e, m.easy) for e in last]),
      "reverse_kl_start": R.mean_std([R.window_mean(r, "reverse_kl", 0, 0.1) for r in runs]),
      "reverse_kl_end": R.mean_std([R.window_mean(r, "reverse_kl", 0.9, 1.0) for r in runs]),
    }
    curves[teacher] = runs

  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
  for teacher, runs in curves.items():
    c = R.COLORS[teacher]
    R.curve_band(axes[0], [R.accuracy_curve(r, m.hard) for r in runs], c, f"from {teacher}")
    axes[0].axhline(orgs[teacher]["hard"], color=c, ls="--", lw=1)
    R.curve_band(axes[1], [R.accuracy_curve(r, m.easy) for r in runs], c, f"from {teacher}")
    R.curve_band(
      axes[2], [R.metric_curve(r, "reverse_kl") for r in runs], c, f"from {teacher}", window=10
    )
  axes[0].set_ylabel(f"accuracy, hard levels {list(m.hard)}")
  axes[1].set_ylabel(f"accuracy, easy levels {list(m.easy)}")
  axes[2].set_ylabel("reverse KL per token (student samples)")
  axes[2].set_yscale("log")
  for ax in axes:
    ax.set_xlabel("OPD step")
  axes[0].legend(fontsize=7)
  fig.suptitle("Thinking-pattern compatibility (dashed: the teacher's own accuracy)")
  R.save(workdir, "f2_compatibility", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
