"""Trains (or finds) the model organisms of the miniature reproduction.

  student       2x128, pattern A, easy levels 1-3 (+ 3% level-4 examples)
  teacher_new   4x128, pattern A, levels 1-4 (new capability: level 4)
  teacher_same  4x128, pattern A, the student's easy-level data (more capacity,
                nothing new)
  teacher_b     4x128, pattern B, levels 1-4 (capable, other thinking pattern)
  strong/weak pair for reverse distillation: teacher_new (strong student)
                distilled from student (weak teacher), see f5_weak_to_strong.py

All data is phrased (``Miniature.phrasings`` templates per step) and tokenized
by a BPE trained on it (``Miniature.bpe_vocab``); the settings that made the
organisms are recorded in ``organisms/miniature.json`` and a workdir made with
others is refused.

Each is SFT-trained by this repo's driver and exported in HF format under
``WORKDIR/organisms``; per-level accuracies go to ``results/organisms.json``
and ``figures/organisms.png``.

Calibration gate: each organism's per-level accuracy is checked against
``miniature.gates(smoke)`` (committed before the runs they judge); the result
is recorded under ``gates`` in organisms.json, and a failure stops the script
(and every finding, which reads the record) with one line per failed level:
organism, level, measured, required. ``--retrain-check`` also retrains every
organism with the same seeds under ``organisms/retrain/`` and gates the
per-level difference at ``retrain_tolerance``. ``--seeds`` is accepted for a
uniform CLI; the organisms do not depend on the OPD seeds.

  python experiments/organisms.py --workdir=runs/repro [--smoke] [--retrain-check]
"""

from __future__ import annotations

import json
import os

import miniature
import ml_collections
import repro_lib as R


def accuracies(sft_workdir: str, levels) -> dict[int, float]:
  """Per-level greedy accuracy of an organism's final SFT eval."""
  last = R.final_eval(sft_workdir)
  return {L: last[f"eval/all/acc/level_{L}"] for L in levels}


def accuracies_at(sft_workdir: str, per_level: int) -> dict[int, float]:
  """Per-level greedy accuracy of an organism's HF export on ``per_level``
  problems of each level of its run's eval (same task, levels, eval seed and
  sampler settings as the run's own, ``num_examples`` scaled): the gate's
  measurement when the run's eval is too coarse for it."""
  with open(os.path.join(sft_workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  levels = [int(x) for x in config.evals.all.levels.split("+")]
  config.evals.all.num_examples = per_level * len(levels)
  config.student.path = os.path.join(sft_workdir, "export_hf")
  res = R.ExportEvaluator(config)(config.student.path)
  return {L: res[f"eval/all/acc/level_{L}"] for L in levels}


def jobs(workdir: str, smoke: bool = False, seeds=None, retrain: bool = False) -> list:
  """Makes the data and tokenizer (here, once) and returns the SFT of every
  organism as :class:`repro_lib.Job` s (``retrain``: their retrainings under
  ``organisms/retrain/<name>``). Cost: SFT steps, x2 for a teacher."""
  m = miniature.miniature(smoke)
  assets = R.assets_dir(workdir)
  miniature.prepare_data(assets, m)
  out = []
  for name in miniature.ORGANISMS:
    teacher = miniature.ORGANISMS[name][0] != "student"
    cost = 2 * m.teacher_steps if teacher else m.student_steps
    d = os.path.join(assets, "retrain", name) if retrain else R.organism_workdir(workdir, name)
    kwargs = dict(assets=assets, m=m, name=name, out=d)
    marker = os.path.join(d, "export_hf", "config.json")
    out.append(R.Job(d, miniature.train_miniature_organism, kwargs, marker, cost))
  return out


def retrain_check(workdir: str, m: miniature.Miniature, tolerance: float, smoke: bool) -> dict:
  """Retrains every organism with its seeds under ``organisms/retrain/<name>``
  (in parallel, :func:`repro_lib.run_jobs`) and compares per-level
  accuracies with the first training."""
  assets = R.assets_dir(workdir)
  levels = sorted(set(m.levels) | set(m.pool_levels))
  R.run_jobs(workdir, jobs(workdir, smoke, retrain=True))
  first, second = {}, {}
  for name in miniature.ORGANISMS:
    out = os.path.join(assets, "retrain", name)
    first[name] = accuracies(R.organism_workdir(workdir, name), levels)
    second[name] = accuracies(out, levels)
  failures = miniature.check_retrain(first, second, tolerance)
  return {
    "status": "failed" if failures else "passed",
    "tolerance": tolerance,
    "failures": failures,
    "retrained": second,
  }


def main(workdir: str, smoke: bool = False, seeds=None, retrain: bool = False) -> dict:
  m = miniature.miniature(smoke)
  g = miniature.gates(smoke)
  miniature.prepare_miniature(R.assets_dir(workdir), m)
  levels = sorted(set(m.levels) | set(m.pool_levels))
  table = {}
  for name in miniature.ORGANISMS:
    last = R.final_eval(R.organism_workdir(workdir, name))
    table[name] = {
      "arch": R.arch_of(m, name),
      "pattern": miniature.ORGANISMS[name][1],
      "sft_data": miniature.ORGANISMS[name][2],
      "accuracy": {L: last[f"eval/all/acc/level_{L}"] for L in levels},
      "easy": R.level_mean(last, m.easy),
      "hard": R.level_mean(last, m.hard),
      "overall": R.level_mean(last, m.levels),
    }
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 3.2))
  width = 0.8 / len(table)
  for i, (name, row) in enumerate(table.items()):
    ax.bar(
      [L + (i - 1.5) * width for L in levels],
      [row["accuracy"][L] for L in levels],
      width,
      label=f"{name} ({row['arch']}, {row['pattern']})",
    )
  ax.set_xlabel("level (digits)")
  ax.set_ylabel("greedy accuracy")
  ax.set_title("Model organisms (levels above %d unseen by all)" % max(m.levels))
  ax.legend(fontsize=7)
  failures = miniature.check_organisms(m, g, {k: v["accuracy"] for k, v in table.items()})
  gates = {
    "status": "failed" if failures else "passed",
    "failures": failures,
    "spec": R.setting_dict(g),
  }
  if retrain:
    gates["retrain"] = retrain_check(workdir, m, g.retrain_tolerance, smoke)
    if gates["retrain"]["failures"]:
      gates["status"] = "failed"
      failures = failures + ["retraining: " + f for f in gates["retrain"]["failures"]]
      gates["failures"] = failures
  data = {"setting": R.setting_dict(m), "organisms": table, "gates": gates}
  R.save(workdir, "organisms", data, fig)
  R.require_gate(gates, "organisms", "organisms.py")
  return table


if __name__ == "__main__":
  p = R.parser(__doc__)
  p.add_argument("--retrain-check", action="store_true", help="retrain and gate reproducibility")
  args = p.parse_args()
  R.headless()
  R.setup_jax(args.workdir)
  R.run_jobs(args.workdir, jobs(args.workdir, args.smoke), args.workers)
  R.print_json(main(args.workdir, args.smoke, args.seeds, args.retrain_check))
