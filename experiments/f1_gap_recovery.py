"""Finding 1 (paper Fig. 1 left): a teacher with genuinely new capability
(teacher_new) lets OPD recover a large share of the student→teacher gap on the
hard levels; a teacher with a higher score but nothing new (teacher_same)
recovers far less.

gap recovery = (acc_after − acc_student) / (acc_teacher − acc_student), on the
hard levels against teacher_new's accuracy (the capability the student lacks),
and — the paper's own definition — on all levels against each teacher's own
accuracy. Reverse KL (full vocabulary), ``seeds`` seeds each; plus one seed
(the first) per teacher at 2x the steps, to see whether the outcome is a
matter of budget. Beside it: the supervised bound of ``learnability.py`` (SFT
on teacher_new's data at the same budget), the share of the gap supervision
clears.

  python experiments/f1_gap_recovery.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import numpy as np
import repro_lib as R

TEACHERS = ("teacher_new", "teacher_same")
# Budget sensitivity: one seed at 2x the OPD steps (4x of the earlier 150-step
# budget; 4x of today's 450 steps would cost more than the whole rest).
LONG_BUDGET = 2


def runs(m) -> list[dict]:
  """:func:`repro_lib.run_opd` arguments of every run: each teacher per seed,
  and at 2x the steps on the first seed."""
  return [dict(teacher=t, seed=s) for t in TEACHERS for s in m.seeds] + [
    dict(teacher=t, seed=m.seeds[0], steps=LONG_BUDGET * m.opd_steps) for t in TEACHERS
  ]


jobs = R.stage_jobs(runs)


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = R.setting(workdir, smoke, seeds)
  orgs = R.organisms_table(workdir)
  bound = R.load(workdir, "learnability", m, smoke)
  out = {"teachers": {}, "supervised_bound": bound["hard_gap_recovery"]}
  curves = {}
  for teacher in TEACHERS:
    runs, first, last = R.seed_runs(workdir, smoke, m, teacher=teacher)
    hard_before = [R.level_mean(e, m.hard) for e in first]
    hard_after = [R.level_mean(e, m.hard) for e in last]
    all_before = [R.level_mean(e, m.levels) for e in first]
    all_after = [R.level_mean(e, m.levels) for e in last]
    t_hard = orgs["teacher_new"]["hard"]
    t_all = orgs[teacher]["overall"]
    out["teachers"][teacher] = {
      "runs": runs,
      "teacher_hard_accuracy": orgs[teacher]["hard"],
      "teacher_overall_accuracy": t_all,
      "student_hard_accuracy": R.mean_std(hard_before),
      "hard_accuracy_after": R.mean_std(hard_after),
      "easy_accuracy_after": R.mean_std([R.level_mean(e, m.easy) for e in last]),
      "hard_gap_recovery": R.mean_std(
        [R.gap_recovery(a, b, t_hard) for a, b in zip(hard_after, hard_before)]
      ),
      "overall_gap_recovery": R.mean_std(
        [R.gap_recovery(a, b, t_all) for a, b in zip(all_after, all_before)]
      ),
    }
    curves[teacher] = [R.accuracy_curve(r, m.hard) for r in runs]
  long_curves = {}
  for teacher in TEACHERS:
    steps = LONG_BUDGET * m.opd_steps
    run = R.run_opd(workdir, smoke, teacher=teacher, seed=m.seeds[0], steps=steps)
    before, after = (
      R.level_mean(R.final_eval_at(run, 0), m.hard),
      R.level_mean(R.final_eval(run), m.hard),
    )
    out.setdefault("long_budget", {})[teacher] = {
      "run": run,
      "steps": steps,
      "seed": m.seeds[0],
      "hard_before": before,
      "hard_after": after,
      "hard_gap_recovery": R.gap_recovery(after, before, orgs["teacher_new"]["hard"]),
    }
    long_curves[teacher] = R.accuracy_curve(run, m.hard)

  import matplotlib.pyplot as plt

  fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(13, 3.4), gridspec_kw={"width_ratios": [2, 1, 2]})
  for teacher, cs in curves.items():
    steps = np.array(cs[0][0])
    ys = np.array([c[1] for c in cs])
    mu, sd = ys.mean(0), ys.std(0)
    ax.plot(steps, mu, color=R.COLORS[teacher], label=f"OPD from {teacher}")
    ax.fill_between(steps, mu - sd, mu + sd, color=R.COLORS[teacher], alpha=0.2)
  ax.axhline(
    orgs["teacher_new"]["hard"],
    color=R.COLORS["teacher_new"],
    ls="--",
    lw=1,
    label="teacher_new itself",
  )
  ax.axhline(
    orgs["teacher_same"]["hard"],
    color=R.COLORS["teacher_same"],
    ls="--",
    lw=1,
    label="teacher_same itself",
  )
  ax.set_xlabel("OPD step")
  ax.set_ylabel(f"accuracy, hard levels {list(m.hard)}")
  ax.legend(fontsize=7)
  for i, teacher in enumerate(TEACHERS):
    for j, key in enumerate(("hard_gap_recovery", "overall_gap_recovery")):
      g = out["teachers"][teacher][key]
      bx.bar(
        i + 0.4 * j,
        100 * np.nan_to_num(g["mean"]),
        0.38,
        yerr=100 * g["std"],
        color=R.COLORS[teacher],
        alpha=1.0 if j == 0 else 0.5,
        label=("hard levels vs teacher_new" if j == 0 else "all levels vs own teacher")
        if i == 0
        else None,
      )
  for teacher, (steps, acc) in long_curves.items():
    cx.plot(steps, acc, "o-", ms=3, color=R.COLORS[teacher], label=f"OPD from {teacher}")
  cx.axhline(orgs["teacher_new"]["hard"], color=R.COLORS["teacher_new"], ls="--", lw=1)
  cx.set_xlabel("OPD step")
  cx.set_title(f"{LONG_BUDGET}x budget, seed {m.seeds[0]}", fontsize=9)
  cx.legend(fontsize=7)
  bx.set_xticks([0.2, 1.2], TEACHERS)
  bx.set_ylabel("gap recovery (%)")
  bx.legend(fontsize=7)
  fig.suptitle(f"Gap recovery ({len(R.seeds_of(m))} seeds, mean ± std)")
  R.save(workdir, "f1_gap_recovery", out, fig, m, smoke)
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
