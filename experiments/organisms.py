"""Trains (or finds) the model organisms of the miniature reproduction.

  student       2x128, pattern A, easy levels 1-3
  teacher_new   4x128, pattern A, levels 1-4 (new capability: level 4)
  teacher_same  4x128, pattern A, the student's data (higher score, nothing new)
  teacher_b     4x128, pattern B, levels 1-4 (capable, other thinking pattern)
  strong/weak pair for reverse distillation: teacher_new (strong student)
                distilled from student (weak teacher), see f5_weak_to_strong.py

Each is SFT-trained by this repo's driver and exported in HF format under
``WORKDIR/organisms``; per-level accuracies go to ``results/organisms.json``
and ``figures/organisms.png``.

  python experiments/organisms.py --workdir=runs/repro [--smoke]
"""

from __future__ import annotations

import miniature
import repro_lib as R


def main(workdir: str, smoke: bool = False) -> dict:
  m = miniature.miniature(smoke)
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
  R.save(workdir, "organisms", {"setting": R.setting_dict(m), "organisms": table}, fig)
  return table


if __name__ == "__main__":
  R.cli(main, __doc__)
