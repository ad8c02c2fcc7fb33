"""The learnability bound (calibration gate of issue #14): SFT of the student
on teacher_new's data (its verified pattern-A solutions of levels 1-4) at
exactly the OPD budget — ``opd_steps`` steps of ``opd_batch x num_samples``
rows at the OPD learning rate and optimizer (configs/repro.py's AdamW,
constant lr, clip 1) — one run per OPD seed (the seed orders the data).

supervised share = (acc_after − acc_student) / (acc_teacher_new − acc_student)
on the hard levels, the gap recovery of finding 1 with supervision in place of
OPD: what the student can learn at this budget when told the answers. It must
reach ``miniature.gates(smoke).min_supervised_share`` (mean over seeds), or
the script stops and no finding gives a verdict; smoke mode reports it
ungated (the reason is recorded). Finding 1 reports its gap recovery beside it.

  python experiments/learnability.py --workdir=runs/repro [--smoke] [--seeds=3,4,5]
"""

from __future__ import annotations

import os

import miniature
import repro_lib as R


def bound_config(workdir: str, smoke: bool, m: miniature.Miniature, seed: int):
  """The SFT config: the student's export, teacher_new's SFT data, the OPD
  run's steps, rows, optimizer and eval schedule."""
  from opd_jax.organisms import sft_config

  paths = miniature.miniature_paths(R.assets_dir(workdir))
  opd = R.opd_config(workdir, smoke, {"seed": seed})
  c = sft_config(
    init=paths["student"],
    tokenizer=paths["tokenizer"],
    data_file=paths["teacher_sft"],
    steps=opd.total_steps,
    lr=opd.optimizer.lr,
    batch_size=opd.batch_size * opd.sampling.num_samples,
    max_prompt_len=m.max_prompt_len,
    max_new_tokens=m.max_new_tokens,
    seed=seed,
    evals={"all": miniature.miniature_eval(m)},
  )
  c.optimizer.update(opd.optimizer.to_dict())
  c.eval_every = opd.eval_every
  c.eval_at_start = True
  c.log_every = 1
  c.checkpoint_every = opd.checkpoint_every
  c.export_hf = False
  return c


def bound_rundir(workdir: str, seed: int) -> str:
  return os.path.join(os.path.abspath(workdir), "learnability", f"student-sft-teacher_sft_s{seed}")


def run_bound(workdir: str, smoke: bool, seed: int) -> str:
  """Runs (or resumes, or skips if done) the supervised-bound SFT of one seed."""
  from opd_jax.train import train

  m = miniature.miniature(smoke)
  return R.run_once(
    bound_rundir(workdir, seed), lambda: bound_config(workdir, smoke, m, seed), train
  )


def jobs(workdir: str, smoke: bool = False, seeds=None) -> list:
  """The SFT run of every seed as :class:`repro_lib.Job` s, after the
  student's SFT (the organisms' jobs)."""
  m = miniature.miniature(smoke, seeds)
  after = (R.organism_workdir(workdir, "student"),)
  return [
    R.Job(
      bound_rundir(workdir, s),
      run_bound,
      dict(workdir=workdir, smoke=smoke, seed=s),
      os.path.join(bound_rundir(workdir, s), "DONE"),
      m.opd_steps,
      after,
    )
    for s in m.seeds
  ]


def main(workdir: str, smoke: bool = False, seeds=None) -> dict:
  m = miniature.miniature(smoke, seeds)
  g = miniature.gates(smoke)
  R.require_gate(R.load(workdir, "organisms").get("gates"), "organisms", "organisms.py")
  orgs = R.organisms_table(workdir)
  teacher = orgs["teacher_new"]["hard"]
  runs = [run_bound(workdir, smoke, s) for s in m.seeds]
  before = [R.level_mean(R.final_eval_at(r, 0), m.hard) for r in runs]
  after = [R.level_mean(R.final_eval(r), m.hard) for r in runs]
  share = R.mean_std([R.gap_recovery(a, b, teacher) for a, b in zip(after, before)])
  if g.min_supervised_share is None:
    gate = {"status": "skipped", "reason": g.skip_reason, "failures": []}
  else:
    ok = share["mean"] >= g.min_supervised_share
    gate = {
      "status": "passed" if ok else "failed",
      "required": g.min_supervised_share,
      "failures": []
      if ok
      else [
        f"student SFT on teacher_sft at the OPD budget, levels {list(m.hard)}: measured "
        f"{100 * share['mean']:.1f}% of the gap, required ≥ {100 * g.min_supervised_share:.0f}%"
      ],
    }
  out = {
    "runs": runs,
    "steps": m.opd_steps,
    "rows_per_step": m.opd_batch * m.num_samples,
    "teacher_hard_accuracy": teacher,
    "hard_before": R.mean_std(before),
    "hard_after": R.mean_std(after),
    "easy_after": R.mean_std([R.level_mean(R.final_eval(r), m.easy) for r in runs]),
    "hard_gap_recovery": share,
    "gate": gate,
  }
  R.save(workdir, "learnability", out, None, m, smoke)
  R.require_gate(gate, "supervised bound", "learnability.py")
  return out


if __name__ == "__main__":
  R.cli(main, __doc__, jobs)
